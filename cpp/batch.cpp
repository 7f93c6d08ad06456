#include "batch.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <memory>

#include "distribution.h"
#include "error.h"
#include "vocab_bridge.h"

namespace blendin {

namespace {

// Prefill `prompt` once in sequence 0, share it with sequences 1..n-1, return its last logits row.
std::vector<float> prefill_shared(Model& m, const std::vector<Token>& prompt, int n) {
    m.truncate(-1, 0);
    m.decode_run(prompt.data(), static_cast<int>(prompt.size()), 0, 0);
    const float* row = m.logits(0);
    std::vector<float> out(row, row + m.n_vocab());
    for (int s = 1; s < n; ++s) m.copy_seq(0, s, static_cast<int>(prompt.size()));
    return out;
}

// Decode `items` (possibly more than one batch) and copy the logits row of each item that asked
// for one into rows[owner[i]].
void decode_into(Model& m, const std::vector<BatchItem>& items, const std::vector<int>& owner,
                 std::vector<std::vector<float>>& rows) {
    const int nb = m.n_batch();
    for (size_t start = 0; start < items.size(); start += nb) {
        size_t end = std::min(items.size(), start + nb);
        std::vector<BatchItem> chunk(items.begin() + start, items.begin() + end);
        m.decode(chunk);
        int r = 0;
        for (size_t i = start; i < end; ++i)
            if (items[i].logits) {
                const float* row = m.logits(r++);
                rows[owner[i]].assign(row, row + m.n_vocab());
            }
    }
}

void check_model(Model* m, const char* role, int n, size_t prompt, int max_tokens) {
    if (m->n_seq_max() < n)
        throw ValueError(std::string("best-of-N with ") + std::to_string(n) + " candidates needs the " + role +
                         " model loaded with n_seq_max >= " + std::to_string(n) + " (it has " +
                         std::to_string(m->n_seq_max()) + ")");
    if (prompt == 0) throw ValueError(std::string("the ") + role + " prompt is empty");
    // the sequences share the cache's cells: the prompt once, then every candidate's tokens
    long need = static_cast<long>(prompt) + static_cast<long>(n) * max_tokens;
    if (need > m->n_ctx())
        throw ValueError(std::to_string(n) + " candidates of up to " + std::to_string(max_tokens) + " tokens after a " +
                         std::to_string(prompt) + "-token prompt need " + std::to_string(need) +
                         " KV cells, but the " + role + " model's context holds " + std::to_string(m->n_ctx()) +
                         " (raise n_ctx, or lower n or max_tokens)");
}

}  // namespace

std::vector<Candidate> generate_candidates(Model& base, Model* guide, Model* anti, const std::vector<Token>& bp,
                                           const std::vector<Token>& gp, const GenParams& params,
                                           const std::vector<uint64_t>& seeds) {
    const int n = static_cast<int>(seeds.size());
    if (n < 1) throw ValueError("best-of-N needs at least one candidate");
    const int nv = base.n_vocab();
    Policy probe(params.policy, nv);  // validates the parameters
    if (params.max_tokens <= 0) throw ValueError("max_tokens must be >= 1");
    if (params.ignore_eos) throw ValueError("ignore_eos is not available for best-of-N candidates");
    const bool use_base = probe.uses_base(), use_guide = probe.uses_guide(), use_anti = probe.uses_anti();
    if (use_guide && !guide) throw ValueError("this method needs a guide model");
    if (use_anti && !anti) throw ValueError("method 'proxy' needs an anti model");
    if (guide) {
        VocabBridge bridge(base, *guide);
        if (!bridge.identity())
            throw ValueError("best-of-N needs a guide that shares the base's vocabulary: " + bridge.first_difference());
    }
    if (use_base) check_model(&base, "base", n, bp.size(), params.max_tokens);
    if (use_guide) check_model(guide, "guide", n, gp.size(), params.max_tokens);
    if (use_anti) check_model(anti, "anti", n, gp.size(), params.max_tokens);
    base.check_tokens(bp);
    if (guide) guide->check_tokens(gp);
    const bool naive = !params.lazy;
    const bool word = params.policy.method == Method::NudgingWord;

    std::vector<bool> eog(nv), starts_word(nv);
    for (Token t = 0; t < nv; ++t) {
        eog[t] = base.is_eog(t) || (guide && guide->is_eog(t));
        Model* w = guide ? guide : &base;
        std::string piece = w->piece(t, false);
        starts_word[t] = piece.empty() || w->is_control(t) || std::isspace(static_cast<unsigned char>(piece[0]));
    }

    // per candidate: its policy scratch, sampler, current logits rows, lengths, lazy pending tokens
    std::vector<std::unique_ptr<Policy>> policy;
    std::vector<Sampler> sampler;
    for (int c = 0; c < n; ++c) {
        policy.push_back(std::make_unique<Policy>(params.policy, nv));
        SamplingParams sp = params.sampling;
        sp.seed = seeds[c];
        sampler.emplace_back(sp);
    }
    std::vector<std::vector<float>> row_b(n), row_g(n), row_a(n);
    if (use_base) row_b.assign(n, prefill_shared(base, bp, n));
    if (use_guide) row_g.assign(n, prefill_shared(*guide, gp, n));
    if (use_anti) row_a.assign(n, prefill_shared(*anti, gp, n));
    std::vector<int> len_b(n, static_cast<int>(bp.size())), len_g(n, static_cast<int>(gp.size()));
    std::vector<std::vector<Token>> pending(n);  // tokens the guide (and anti) have yet to read
    std::vector<Candidate> out(n);
    std::vector<bool> live(n, true), in_word(n, false), consult(n, false);
    std::vector<StepInfo> info(n);

    auto catch_up = [&](Model* m, std::vector<std::vector<float>>& rows, const std::vector<bool>& need) {
        std::vector<BatchItem> items;
        std::vector<int> owner;
        for (int c = 0; c < n; ++c) {
            if (!need[c] || pending[c].empty()) continue;
            for (size_t i = 0; i < pending[c].size(); ++i) {
                items.push_back({pending[c][i], len_g[c] + static_cast<int>(i), c, i + 1 == pending[c].size()});
                owner.push_back(c);
            }
        }
        decode_into(*m, items, owner, rows);
    };

    while (std::count(live.begin(), live.end(), true) > 0) {
        // 1. gates, from each candidate's base row
        std::vector<bool> need_guide(n, false);
        for (int c = 0; c < n; ++c) {
            if (!live[c]) continue;
            bool cons = in_word[c] ? policy[c]->gate(nullptr, out[c].steps, out[c].interventions, info[c])
                                   : policy[c]->gate(use_base ? row_b[c].data() : nullptr, out[c].steps,
                                                     out[c].interventions, info[c]);
            consult[c] = cons;
            need_guide[c] = use_guide && (cons || naive);
        }
        // 2. lazy catch-up of the guides (and antis) that are consulted, all in one batch
        if (use_guide) catch_up(guide, row_g, need_guide);
        if (use_anti) catch_up(anti, row_a, need_guide);
        for (int c = 0; c < n; ++c)
            if (need_guide[c]) {
                len_g[c] += static_cast<int>(pending[c].size());
                pending[c].clear();
            }
        // 3. combine and pick
        std::vector<BatchItem> items;
        std::vector<int> owner;
        for (int c = 0; c < n; ++c) {
            if (!live[c]) continue;
            Candidate& cand = out[c];
            const float* lg = consult[c] ? row_g[c].data() : nullptr;
            const float* la = consult[c] && use_anti ? row_a[c].data() : nullptr;
            Token t;
            if (in_word[c]) {
                const auto& p = policy[c]->combine(lg, nullptr, info[c]);
                t = sampler[c].pick(p.data(), nv);
                if (starts_word[t]) {  // the nudged word is over: the base decides this token
                    // (the guide was consulted this step, so its row is current)
                    consult[c] = policy[c]->gate(row_b[c].data(), cand.steps, cand.interventions, info[c]);
                    const auto& p2 = policy[c]->combine(consult[c] ? row_g[c].data() : nullptr, nullptr, info[c]);
                    t = sampler[c].pick(p2.data(), nv);
                    in_word[c] = word && info[c].intervened;
                }
            } else {
                const auto& p = policy[c]->combine(lg, la, info[c]);
                t = sampler[c].pick(p.data(), nv);
                in_word[c] = word && info[c].intervened;
            }
            ++cand.steps;
            cand.interventions += info[c].intervened;
            // 4. stop conditions
            std::string reason;
            if (eog[t]) {
                reason = "stop";
            } else {
                cand.tokens.push_back(t);
                cand.text += base.piece(t, false);
                for (const auto& s : params.stop) {
                    size_t at = cand.text.find(s);
                    if (at != std::string::npos) {
                        cand.text.resize(at);
                        reason = "stop";
                    }
                }
                if (reason.empty() && cand.steps >= params.max_tokens) reason = "length";
                if (reason.empty() && ((use_base && len_b[c] + 1 >= base.n_ctx()) ||
                                       (use_guide && len_g[c] + static_cast<int>(pending[c].size()) + 1 >= guide->n_ctx())))
                    reason = "context";
            }
            if (!reason.empty()) {
                cand.finish_reason = reason;
                live[c] = false;
                continue;
            }
            if (use_base) {
                items.push_back({t, len_b[c]++, c, true});
                owner.push_back(c);
            }
            if (use_guide) pending[c].push_back(t);
        }
        // 5. the base reads every live candidate's token in one batch
        if (use_base) decode_into(base, items, owner, row_b);
        if (naive && use_guide) {
            std::vector<bool> all(live.begin(), live.end());
            catch_up(guide, row_g, all);
            if (use_anti) catch_up(anti, row_a, all);
            for (int c = 0; c < n; ++c)
                if (all[c]) {
                    len_g[c] += static_cast<int>(pending[c].size());
                    pending[c].clear();
                }
        }
    }
    for (Model* m : {&base, guide, anti})
        if (m) m->truncate(-1, 0);
    return out;
}

std::vector<double> score_continuations(Model& m, const std::vector<Token>& prompt,
                                        const std::vector<std::vector<Token>>& conts, bool normalize) {
    const int nv = m.n_vocab();
    if (prompt.empty()) throw ValueError("the scoring prompt is empty");
    m.check_tokens(prompt);
    for (auto& c : conts) {
        m.check_tokens(c);
        if (static_cast<int>(prompt.size() + c.size()) > m.n_ctx())
            throw ValueError("a continuation of " + std::to_string(c.size()) + " tokens does not fit the context of " +
                             std::to_string(m.n_ctx()) + " after the prompt");
    }
    auto logp = [nv](const float* row, Token t) {
        float mx = *std::max_element(row, row + nv);
        double sum = 0;
        for (int i = 0; i < nv; ++i) sum += std::exp(row[i] - mx);
        return row[t] - mx - std::log(sum);
    };
    std::vector<double> out(conts.size(), 0.0);
    const int group = m.n_seq_max();
    const int p = static_cast<int>(prompt.size());
    for (size_t g0 = 0; g0 < conts.size(); g0 += group) {
        size_t g1 = std::min(conts.size(), g0 + group);
        std::vector<float> row0 = prefill_shared(m, prompt, static_cast<int>(g1 - g0));
        // rows to score: (candidate, index of the token the row predicts)
        std::vector<BatchItem> items;
        std::vector<std::pair<size_t, size_t>> target;
        for (size_t c = g0; c < g1; ++c) {
            const auto& y = conts[c];
            if (y.empty()) continue;
            out[c] += logp(row0.data(), y[0]);
            for (size_t i = 0; i + 1 < y.size(); ++i) {
                items.push_back({y[i], p + static_cast<int>(i), static_cast<int>(c - g0), true});
                target.emplace_back(c, i + 1);
            }
        }
        const int nb = m.n_batch();
        for (size_t start = 0; start < items.size(); start += nb) {
            size_t end = std::min(items.size(), start + nb);
            m.decode(std::vector<BatchItem>(items.begin() + start, items.begin() + end));
            for (size_t i = start; i < end; ++i) {
                auto [c, k] = target[i];
                out[c] += logp(m.logits(static_cast<int>(i - start)), conts[c][k]);
            }
        }
        m.truncate(-1, 0);
    }
    if (normalize)
        for (size_t c = 0; c < conts.size(); ++c)
            if (!conts[c].empty()) out[c] /= static_cast<double>(conts[c].size());
    return out;
}

}  // namespace blendin
