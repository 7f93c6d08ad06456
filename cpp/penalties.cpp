#include "penalties.h"

#include <algorithm>
#include <cmath>

namespace blendin {

namespace {
// DRY's penalty grows exponentially with the repeated length. Past this many logits a token's
// probability is 0 in float arithmetic anyway; the bound keeps the logits finite, so that logit
// arithmetic (proxy, DeRa extrapolating) never meets an infinity.
constexpr double kMaxDryPenalty = 1e4;
// Repeated lengths are counted up to this: beyond it the penalty is at its bound for any base > 1.05.
constexpr int kMaxDryLength = 256;
}  // namespace

bool Penalties::active() const {
    const RepeatParams& p = params_;
    return p.presence_penalty != 0 || p.frequency_penalty != 0 || (p.repeat_penalty != 1 && p.repeat_last_n != 0) ||
           p.dry_multiplier > 0;
}

void Penalties::push(Token t) {
    answer_.push_back(t);
    ++counts_[t];
}

std::vector<std::pair<Token, int>> Penalties::dry_lengths() const {
    std::vector<std::pair<Token, int>> out;
    const long n = static_cast<long>(answer_.size());
    if (n < 2 || breaks(answer_[n - 1])) return out;
    std::unordered_map<Token, int> longest;
    // every earlier place where the answer's last token occurred: how far back the two agree
    for (long i = n - 2; i >= 0; --i) {
        if (answer_[i] != answer_[n - 1]) continue;
        const Token next = answer_[i + 1];
        if (breaks(next)) continue;
        int len = 0;
        while (len < kMaxDryLength && i - len >= 0 && answer_[i - len] == answer_[n - 1 - len] &&
               !breaks(answer_[i - len]))
            ++len;
        int& best = longest[next];
        best = std::max(best, len);
    }
    out.assign(longest.begin(), longest.end());
    return out;
}

void Penalties::apply(float* x, int n, bool probs) const {
    const RepeatParams& p = params_;
    struct Touch {
        bool recent = false;  // inside repeat_penalty's window
        int count = 0;        // in the whole answer
        int dry = -1;         // the repeated length this token would extend (-1: none)
    };
    std::unordered_map<Token, Touch> touched;
    if (p.repeat_penalty != 1 && p.repeat_last_n != 0) {
        const size_t window = p.repeat_last_n < 0 ? answer_.size()
                                                  : std::min(answer_.size(), static_cast<size_t>(p.repeat_last_n));
        for (size_t i = answer_.size() - window; i < answer_.size(); ++i) touched[answer_[i]].recent = true;
    }
    if (p.frequency_penalty != 0 || p.presence_penalty != 0)
        for (const auto& [t, c] : counts_) touched[t].count = c;
    if (p.dry_multiplier > 0)
        for (const auto& [t, len] : dry_lengths()) touched[t].dry = len;
    for (const auto& [t, k] : touched) {
        if (t < 0 || t >= n) continue;
        double l = probs ? std::log(static_cast<double>(x[t])) : x[t];
        if (k.recent) l = l > 0 ? l / p.repeat_penalty : l * p.repeat_penalty;
        if (k.count > 0) l -= p.frequency_penalty * k.count + p.presence_penalty;
        if (k.dry >= p.dry_allowed_length)
            l -= std::min(kMaxDryPenalty, p.dry_multiplier * std::pow(static_cast<double>(p.dry_base),
                                                                       k.dry - p.dry_allowed_length));
        x[t] = static_cast<float>(probs ? std::exp(l) : l);
    }
}

bool Penalties::would_loop(Token t) const {
    const long g = params_.loop_gate, n = static_cast<long>(answer_.size());
    if (g <= 0 || n < g) return false;  // the n-gram must have occurred before, in full
    // the candidate n-gram: the answer's last g - 1 tokens, then t
    for (long k = 0; k + g <= n; ++k) {
        if (answer_[k + g - 1] != t) continue;
        bool same = true;
        for (long j = 0; j < g - 1 && same; ++j) same = answer_[k + j] == answer_[n - g + 1 + j];
        if (same) return true;
    }
    return false;
}

}  // namespace blendin
