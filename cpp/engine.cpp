#include "engine.h"

#include <algorithm>
#include <cmath>

#include "error.h"

namespace blendin {

namespace {
const char* kRoleNames[kRoles] = {"base", "guide", "anti"};

double seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Length of the longest proper prefix of a stop string that `text` ends with (held back from the
// stream until we know whether the stop string completes).
size_t stop_prefix_held(const std::string& text, size_t from, const std::vector<std::string>& stops) {
    size_t held = 0;
    for (const auto& s : stops)
        for (size_t len = std::min(s.size() - 1, text.size() - from); len > held; --len)
            if (text.compare(text.size() - len, len, s, 0, len) == 0) {
                held = len;
                break;
            }
    return held;
}

// Move `end` back so that text[..end) does not end inside a UTF-8 character.
size_t utf8_boundary(const std::string& text, size_t begin, size_t end) {
    for (size_t back = 1; back <= 4 && back <= end - begin; ++back) {
        unsigned char c = static_cast<unsigned char>(text[end - back]);
        if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
        size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
        return back < need ? end - back : end;
    }
    return end;
}
}  // namespace

// ---- Track ----
void Engine::Track::prefill(const std::vector<Token>& p) {
    size_t common = 0;
    while (common < cached.size() && common < p.size() && cached[common] == p[common]) ++common;
    if (common == p.size()) --common;  // the last prompt token is decoded again for its logits
    model->truncate(0, static_cast<int>(common));
    cached.resize(common);
    pending.assign(p.begin() + common, p.end());
    reused = static_cast<long>(common);
    prompt = static_cast<long>(p.size());
}

const float* Engine::Track::logits() {
    if (!pending.empty()) {
        int pos = static_cast<int>(cached.size());
        // record first: if the decode fails, the cache is truncated back to `cached` next time
        model->decode_run(pending.data(), static_cast<int>(pending.size()), pos, 0);
        cached.insert(cached.end(), pending.begin(), pending.end());
        pending.clear();
    }
    return model->logits(0);
}

// ---- Engine ----
Engine::Engine(Model* base, Model* guide, Model* anti) {
    BLENDIN_CHECK(base != nullptr);
    Model* models[kRoles] = {base, guide, anti};
    n_vocab_ = base->n_vocab();
    for (int r = 1; r < kRoles; ++r) {
        Model* m = models[r];
        if (!m) continue;
        if (m == base || (r == kAnti && m == guide))
            throw ValueError(std::string("the ") + kRoleNames[r] + " must be a separate Model object (each keeps its own KV cache)");
        if (m->n_vocab() != n_vocab_)
            throw ValueError(std::string("the base and the ") + kRoleNames[r] + " do not share a vocabulary: " +
                             std::to_string(n_vocab_) + " vs " + std::to_string(m->n_vocab()) +
                             " tokens (blending across tokenizers is not supported yet)");
        for (Token t = 0; t < n_vocab_; ++t) {
            std::string a = base->piece(t, true), b = m->piece(t, true);
            if (a != b)
                throw ValueError(std::string("the base and the ") + kRoleNames[r] +
                                 " do not share a vocabulary: token " + std::to_string(t) + " is '" + a +
                                 "' in the base and '" + b + "' in the " + kRoleNames[r] +
                                 " (blending across tokenizers is not supported yet)");
        }
    }
    for (int r = 0; r < kRoles; ++r) tracks_[r].model = models[r];
    eog_.resize(n_vocab_);
    starts_word_.resize(n_vocab_);
    for (Token t = 0; t < n_vocab_; ++t) {
        eog_[t] = base->is_eog(t) || (guide && guide->is_eog(t));
        Model* w = guide ? guide : base;
        std::string piece = w->piece(t, false);
        // a word starts at whitespace; control tokens (and empty pieces) end a word too
        starts_word_[t] = piece.empty() || w->is_control(t) || std::isspace(static_cast<unsigned char>(piece[0]));
    }
}

void Engine::reset() {
    for (auto& tr : tracks_) {
        if (!tr.model) continue;
        tr.model->truncate(-1, 0);
        tr.cached.clear();
        tr.pending.clear();
    }
    active_ = false;
}

void Engine::start(const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt, const GenParams& p) {
    Policy policy(p.policy, n_vocab_);  // validates the parameters before anything changes
    Sampler sampler(p.sampling);
    if (p.max_tokens <= 0) throw ValueError("max_tokens must be >= 1");
    if (p.top_logprobs < 0 || p.top_logprobs > 100) throw ValueError("top_logprobs must be in 0..100");
    for (auto& s : p.stop)
        if (s.empty()) throw ValueError("stop strings must not be empty");
    bool use[kRoles] = {policy.uses_base(), policy.uses_guide(), policy.uses_anti()};
    const std::vector<Token>* prompts[kRoles] = {&base_prompt, &guide_prompt, &guide_prompt};
    for (int r = 0; r < kRoles; ++r) {
        if (!use[r]) continue;
        Model* m = tracks_[r].model;
        if (!m)
            throw ValueError(std::string("method '") + method_name(p.policy.method) + "' needs a " + kRoleNames[r] +
                             " model" + (r == kAnti ? " (the guide's untuned sibling, for proxy-tuning)" : ""));
        const auto& pr = *prompts[r];
        if (pr.empty()) throw ValueError(std::string("the ") + kRoleNames[r] + " prompt is empty");
        m->check_tokens(pr);
        if (static_cast<int>(pr.size()) >= m->n_ctx())
            throw ValueError(std::string("the ") + kRoleNames[r] + " prompt has " + std::to_string(pr.size()) +
                             " tokens, which leaves no room in its context of " + std::to_string(m->n_ctx()) +
                             " tokens (shorten the prompt or raise n_ctx)");
    }
    params_ = p;
    policy_ = std::move(policy);
    sampler_ = std::move(sampler);
    tokens_ = interventions_ = capped_ = n_alpha_ = 0;
    alpha_sum_ = 0;
    text_.clear();
    released_ = 0;
    finish_reason_.clear();
    in_word_ = false;

    t_start_ = std::chrono::steady_clock::now();
    for (int r = 0; r < kRoles; ++r) {
        Track& tr = tracks_[r];
        if (!tr.model) continue;
        tr.calls0 = tr.model->decode_calls();
        tr.tokens0 = tr.model->decoded_tokens();
        tr.reused = tr.prompt = 0;
        if (!use[r]) continue;
        tr.prefill(*prompts[r]);
        // the base is needed at once; a lazy guide reads its prompt the first time it is asked
        if (r == kBase || !p.lazy) tr.logits();
    }
    t_first_ = std::chrono::steady_clock::now();
    active_ = true;
}

bool Engine::step(Step& out) {
    if (!active_) return false;
    out = Step{};
    StepInfo& info = out.info;
    const Method method = params_.policy.method;
    Track& base = tracks_[kBase];
    Track& guide = tracks_[kGuide];
    Track& anti = tracks_[kAnti];
    const bool naive = !params_.lazy;

    Token token = -1;
    const std::vector<float>* final_p = nullptr;
    // word-level nudging: inside a nudged word the guide keeps writing until it starts a new word
    if (in_word_) {
        policy_.gate(nullptr, tokens_, interventions_, info);
        const auto& p = policy_.combine(guide.logits(), nullptr, info);
        Token t = sampler_.pick(p.data(), n_vocab_);
        if (!starts_word_[t]) {
            token = t;
            final_p = &p;
        }
        in_word_ = token >= 0;
        if (naive && token >= 0) base.logits();
    }
    if (token < 0) {
        const float* lb = policy_.uses_base() ? base.logits() : nullptr;
        bool consult = policy_.gate(lb, tokens_, interventions_, info);
        const float* lg = nullptr;
        const float* la = nullptr;
        if (policy_.uses_guide() && (consult || naive)) lg = guide.logits();
        if (policy_.uses_anti() && (consult || naive)) la = anti.logits();
        const auto& p = policy_.combine(consult ? lg : nullptr, la, info);
        token = sampler_.pick(p.data(), n_vocab_);
        final_p = &p;
        in_word_ = method == Method::NudgingWord && info.intervened;
    }
    out.logprob = std::log((*final_p)[token]);
    if (params_.top_logprobs > 0)
        for (int i : top_k(final_p->data(), n_vocab_, params_.top_logprobs))
            out.top_logprobs.emplace_back(i, std::log((*final_p)[i]));

    out.token = token;
    ++tokens_;
    if (info.intervened) ++interventions_;
    if (info.capped) ++capped_;
    if (info.intervened && std::isfinite(info.alpha)) {
        alpha_sum_ += info.alpha;
        ++n_alpha_;
    }

    if (eog_[token]) {
        finish("stop", out);
        return true;
    }
    text_ += base.model->piece(token, false);
    // stop strings: the earliest match in the text not yet released ends the generation there
    size_t cut = std::string::npos;
    for (const auto& s : params_.stop) cut = std::min(cut, text_.find(s, released_));
    if (cut != std::string::npos) {
        text_.resize(cut);
        finish("stop", out);
        return true;
    }
    if (tokens_ >= params_.max_tokens) {
        finish("length", out);
        return true;
    }
    for (int r = 0; r < kRoles; ++r) {
        Track& tr = tracks_[r];
        bool used = r == kBase ? policy_.uses_base() : r == kGuide ? policy_.uses_guide() : policy_.uses_anti();
        if (!used) continue;
        if (static_cast<int>(tr.length()) >= tr.model->n_ctx()) {
            finish("context", out);
            return true;
        }
        tr.pending.push_back(token);
    }
    release_text(out, false);
    return true;
}

void Engine::release_text(Step& out, bool all) {
    size_t end = text_.size();
    if (!all) {
        end -= stop_prefix_held(text_, released_, params_.stop);
        end = utf8_boundary(text_, released_, end);
    }
    if (end > released_) {
        out.text.append(text_, released_, end - released_);
        released_ = end;
    }
}

void Engine::finish(const std::string& reason, Step& out) {
    release_text(out, true);
    out.finish_reason = reason;
    finish_reason_ = reason;
    active_ = false;
    t_end_ = std::chrono::steady_clock::now();
}

Stats Engine::stats() const {
    Stats s;
    s.tokens = tokens_;
    s.interventions = interventions_;
    s.capped = capped_;
    s.intervention_rate = tokens_ ? static_cast<double>(interventions_) / tokens_ : 0;
    s.mean_alpha = n_alpha_ ? alpha_sum_ / n_alpha_ : 0;
    for (int r = 0; r < kRoles; ++r) {
        const Track& tr = tracks_[r];
        if (!tr.model) continue;
        s.prompt_tokens[r] = tr.prompt;
        s.reused_tokens[r] = tr.reused;
        s.decode_calls[r] = tr.model->decode_calls() - tr.calls0;
        s.decoded_tokens[r] = tr.model->decoded_tokens() - tr.tokens0;
    }
    auto end = active_ ? std::chrono::steady_clock::now() : t_end_;
    s.prefill_s = seconds(t_first_ - t_start_);
    s.generate_s = seconds(end - t_first_);
    s.tokens_per_s = s.generate_s > 0 ? tokens_ / s.generate_s : 0;
    s.finish_reason = finish_reason_;
    if (tokens_ >= 16 && s.intervention_rate > params_.warn_intervention_rate)
        s.warning = "the guide wrote " + std::to_string(static_cast<int>(std::lround(100 * s.intervention_rate))) +
                    "% of the tokens: the base is rarely confident here, so the guide's reliability decides the "
                    "output (BlendIn's excessive-intervention signal). Consider a lower gamma, another guide, "
                    "or max_intervention_rate.";
    return s;
}

}  // namespace blendin
