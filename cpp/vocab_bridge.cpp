#include "vocab_bridge.h"

#include <unordered_map>

namespace blendin {

VocabBridge::VocabBridge(const Model& base, const Model& guide, const std::string& role) {
    const int nb = base.n_vocab(), ng = guide.n_vocab();
    std::unordered_map<std::string, Token> by_bytes, by_special;
    size_t longest = 0;
    for (Token t = 0; t < nb; ++t) {
        if (base.is_control(t)) {
            by_special.emplace(base.piece(t, true), t);
            continue;
        }
        std::string b = base.piece(t, false);
        if (b.empty()) continue;
        by_bytes.emplace(b, t);  // the first (lowest id) token wins among duplicates
        longest = std::max(longest, b.size());
    }
    Token base_end = base.eos() >= 0 ? base.eos() : base.eot();
    map_.assign(ng, -1);
    exact_.assign(ng, false);
    for (Token g = 0; g < ng; ++g) {
        if (identity_ && (g >= nb || guide.piece(g, true) != base.piece(g, true))) {
            identity_ = false;
            first_difference_ = g >= nb ? "the " + role + " has " + std::to_string(ng) + " tokens, the base " +
                                              std::to_string(nb)
                                        : "token " + std::to_string(g) + " is '" + base.piece(g, true) +
                                              "' in the base and '" + guide.piece(g, true) + "' in the " + role;
        }
        if (guide.is_eog(g)) {
            map_[g] = base_end;
            exact_[g] = true;
            continue;
        }
        if (guide.is_control(g)) {
            auto it = by_special.find(guide.piece(g, true));
            if (it != by_special.end()) {
                map_[g] = it->second;
                exact_[g] = true;
            }
            continue;
        }
        std::string b = guide.piece(g, false);
        if (auto it = by_bytes.find(b); it != by_bytes.end()) {
            map_[g] = it->second;
            exact_[g] = true;
            continue;
        }
        for (size_t len = std::min(longest, b.size()); len > 0; --len)
            if (auto it = by_bytes.find(b.substr(0, len)); it != by_bytes.end()) {
                map_[g] = it->second;
                break;
            }
    }
    if (identity_ && ng != nb) {
        identity_ = false;
        first_difference_ = "the base has " + std::to_string(nb) + " tokens, the " + role + " " + std::to_string(ng);
    }
}

float VocabBridge::map_probs(const float* pg, float* out, int n_base) const {
    std::fill(out, out + n_base, 0.0f);
    double unmatched = 0;
    for (size_t g = 0; g < map_.size(); ++g) {
        if (!exact_[g]) unmatched += pg[g];
        if (map_[g] >= 0) out[map_[g]] += pg[g];
    }
    return static_cast<float>(unmatched);
}

}  // namespace blendin
