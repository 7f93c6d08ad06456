#include "batch.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "decoder.h"
#include "engine.h"
#include "error.h"
#include "vocab_bridge.h"

namespace blendin {

namespace {

// Sequences 1.. hold nothing: their cells are free for the next group, or for a single generation.
void free_extra_sequences(Model& m) {
    for (int s = 1; s < m.n_seq_max(); ++s) m.truncate(s, 0);
}

// Sequence 0 holds the prompt (reusing what it held), sequences 1..n-1 share it; returns the
// logits after the prompt.
std::vector<float> share_prompt(Model& m, const std::vector<Token>& prompt, int n) {
    free_extra_sequences(m);
    const float* row = m.sync(0, prompt);
    std::vector<float> out(row, row + m.n_vocab());
    for (int s = 1; s < n; ++s) m.copy_seq(0, s, static_cast<int>(prompt.size()));
    return out;
}

// One group of candidates, candidate c in sequence c of every model it uses.
class Group : public Sequences {
public:
    Group(Model* const* models, const std::vector<Token>* const* prompts, const GenParams& params,
          const TokenFacts& facts, const std::vector<uint64_t>& seeds)
        : facts_(facts), n_(static_cast<int>(seeds.size())) {
        for (int r = 0; r < kRoles; ++r) {
            models_[r] = models[r];
            if (!models[r]) continue;
            rows_[r].resize(n_);
            const std::vector<float> first = share_prompt(*models[r], *prompts[r], n_);
            targets_[r].assign(n_, *prompts[r]);
            for (auto& row : rows_[r]) row = first;
            fresh_[r].assign(n_, 1);
        }
        for (int c = 0; c < n_; ++c) decoders_.push_back(std::make_unique<Decoder>(params, facts, seeds[c], false));
    }

    std::vector<Candidate> run() {
        std::vector<Candidate> out(n_);
        std::vector<int> live(n_);
        for (int c = 0; c < n_; ++c) live[c] = c;
        while (!live.empty()) {
            decide_tokens(*this, live);
            // emit; a finished candidate leaves the group
            std::vector<int> next;
            for (int c : live) {
                Decoder& d = *decoders_[c];
                Step& s = d.decided();
                bool room = true;
                for (int r = 0; r < kRoles; ++r)
                    if (models_[r] && static_cast<int>(targets_[r][c].size()) >= models_[r]->n_ctx_seq()) room = false;
                const bool finished = d.emit(s, room);
                if (!facts_.eog[s.token]) out[c].tokens.push_back(s.token);
                if (!finished) {
                    for (int r = 0; r < kRoles; ++r)
                        if (models_[r]) {
                            targets_[r][c].push_back(s.token);
                            fresh_[r][c] = 0;
                        }
                    next.push_back(c);
                    continue;
                }
                out[c].text = d.text();
                out[c].finish_reason = d.finish_reason();
                out[c].interventions = d.interventions();
            }
            live = std::move(next);
        }
        return out;
    }

    Decoder* decoder(int c) override { return decoders_[c].get(); }
    bool uses(int, int role) const override { return models_[role] != nullptr; }
    const float* row(int c, int role) override { return rows_[role][c].data(); }
    // Bring the candidates' sequences of model r up to their targets and copy their rows.
    void fetch(int r, const std::vector<int>& cands) override {
        if (!models_[r] || cands.empty()) return;
        std::vector<Model::SyncRequest> requests;
        std::vector<int> owner;
        for (int c : cands)
            if (!fresh_[r][c]) {
                requests.push_back({c, &targets_[r][c]});
                owner.push_back(c);
            }
        const int nv = models_[r]->n_vocab();
        models_[r]->sync_all(requests, [&](size_t i, const float* row) {
            rows_[r][owner[i]].assign(row, row + nv);
            fresh_[r][owner[i]] = 1;
        });
    }

private:
    const TokenFacts& facts_;
    int n_;
    Model* models_[kRoles] = {};
    std::vector<std::vector<Token>> targets_[kRoles];
    std::vector<std::vector<float>> rows_[kRoles];
    std::vector<char> fresh_[kRoles];  // the copied row is the logits after the target
    std::vector<std::unique_ptr<Decoder>> decoders_;
};

}  // namespace

std::vector<Candidate> generate_candidates(Model& base, Model* guide, Model* anti, const std::vector<Token>& bp,
                                           const std::vector<Token>& gp, const GenParams& params,
                                           const std::vector<uint64_t>& seeds) {
    if (seeds.empty()) throw ValueError("best-of-N needs at least one candidate");
    // the models are this call's from the first prompt read to the last freed sequence: another
    // thread's generation on them gets the busy error instead of truncating the candidates
    Holding hold;
    for (Model* m : {&base, guide, anti})
        if (m) hold.add(m->lease(), m->name());
    validate(params);
    const Method m = params.policy.method;
    const bool use[kRoles] = {uses_base(m), uses_guide(m), uses_anti(m)};
    Model* given[kRoles] = {&base, guide, anti};
    const std::vector<Token>* prompts[kRoles] = {&bp, &gp, &gp};
    for (int r = 0; r < kRoles; ++r) {
        if (!use[r]) continue;
        if (!given[r]) throw ValueError(std::string("method '") + method_name(m) + "' needs a " + role_name(r) + " model");
        check_prompt(r, *given[r], *prompts[r]);
    }
    bool identity = true;
    if (guide) {
        VocabBridge bridge(base, *guide);
        identity = bridge.identity();
        if (!identity && use[kGuide])
            throw ValueError("best-of-N with method '" + std::string(method_name(m)) +
                             "' needs a guide that shares the base's vocabulary: " + bridge.first_difference());
    }
    Model* models[kRoles] = {};
    int width = static_cast<int>(seeds.size());
    for (int r = 0; r < kRoles; ++r)
        if (use[r]) {
            models[r] = given[r];
            width = std::min(width, given[r]->n_seq_max());  // each sequence has its own cells
        }
    const TokenFacts facts(base, guide && identity ? guide : nullptr);
    std::vector<Candidate> out;
    for (size_t start = 0; start < seeds.size(); start += width) {
        std::vector<uint64_t> group(seeds.begin() + start, seeds.begin() + std::min(seeds.size(), start + width));
        auto cands = Group(models, prompts, params, facts, group).run();
        out.insert(out.end(), std::make_move_iterator(cands.begin()), std::make_move_iterator(cands.end()));
    }
    for (Model* mm : models)
        if (mm) free_extra_sequences(*mm);
    return out;
}

std::vector<double> score_continuations(Model& m, const std::vector<Token>& prompt,
                                        const std::vector<std::vector<Token>>& conts, bool normalize) {
    const int nv = m.n_vocab();
    Lease::Scope hold(m.lease(), m.name());  // the whole scoring: no other thread truncates its sequences meanwhile
    if (prompt.empty()) throw ValueError("the scoring prompt is empty");
    m.check_tokens(prompt);
    const long room = m.n_ctx_seq() - static_cast<long>(prompt.size());
    for (size_t i = 0; i < conts.size(); ++i) {
        m.check_tokens(conts[i]);
        // the last token is scored, not read: a continuation needs len - 1 cells after the prompt
        if (static_cast<long>(conts[i].size()) - 1 > room)
            throw ValueError("continuation " + std::to_string(i) + " has " + std::to_string(conts[i].size()) +
                             " tokens, which do not fit the context of " + std::to_string(m.n_ctx_seq()) +
                             " after the " + std::to_string(prompt.size()) + "-token prompt (raise n_ctx)");
    }
    auto logp = [nv](const float* row, Token t) {
        float mx = *std::max_element(row, row + nv);
        double sum = 0;
        for (int i = 0; i < nv; ++i) sum += std::exp(row[i] - mx);
        return row[t] - mx - std::log(sum);
    };
    std::vector<double> out(conts.size(), 0.0);
    for (size_t g0 = 0; g0 < conts.size();) {
        // a group: n_seq_max sequences, each in its own cells
        const size_t g1 = std::min(conts.size(), g0 + static_cast<size_t>(m.n_seq_max()));
        const std::vector<float> row0 = share_prompt(m, prompt, static_cast<int>(g1 - g0));
        std::vector<BatchItem> items;
        std::vector<std::pair<size_t, size_t>> target;  // (continuation, index of the token the row predicts)
        for (size_t c = g0; c < g1; ++c) {
            const auto& y = conts[c];
            if (y.empty()) continue;
            out[c] += logp(row0.data(), y[0]);
            for (size_t i = 0; i + 1 < y.size(); ++i) {
                items.push_back({y[i], static_cast<int>(c - g0), true});
                target.emplace_back(c, i + 1);
            }
        }
        m.decode_all(items, [&](size_t i, const float* row) {
            const auto [c, k] = target[i];
            out[c] += logp(row, conts[c][k]);
        });
        g0 = g1;
    }
    free_extra_sequences(m);
    if (normalize)
        for (size_t c = 0; c < conts.size(); ++c)
            if (!conts[c].empty()) out[c] /= static_cast<double>(conts[c].size());
    return out;
}

}  // namespace blendin
