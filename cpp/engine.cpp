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

std::vector<const float*> Engine::Track::verify(const std::vector<Token>& drafts, std::vector<float>& row0) {
    std::vector<BatchItem> batch;
    std::vector<const float*> rows;
    int pos = static_cast<int>(cached.size());
    if (pending.empty()) {
        const float* cur = model->logits(0);  // the last decode's row: copy it, the next decode replaces it
        row0.assign(cur, cur + model->n_vocab());
    } else {
        model->decode_run(pending.data(), static_cast<int>(pending.size()) - 1, pos, 0, false);
        pos += static_cast<int>(pending.size()) - 1;
        batch.push_back({pending.back(), pos++, 0, true});
    }
    for (Token d : drafts) batch.push_back({d, pos++, 0, true});
    model->decode(batch);
    if (pending.empty()) rows.push_back(row0.data());
    for (int i = 0; i < model->n_logits(); ++i) rows.push_back(model->logits(i));
    cached.insert(cached.end(), pending.begin(), pending.end());
    cached.insert(cached.end(), drafts.begin(), drafts.end());
    pending.clear();
    return rows;
}

void Engine::Track::keep(size_t n) {
    if (n < cached.size()) {
        model->truncate(0, static_cast<int>(n));
        cached.resize(n);
        pending.clear();
    } else if (n < length()) {
        pending.resize(n - cached.size());
    }
}

// ---- Engine ----
Engine::Engine(Model* base, Model* guide, Model* anti) {
    BLENDIN_CHECK(base != nullptr);
    Model* models[kRoles] = {base, guide, anti};
    n_vocab_ = base->n_vocab();
    for (int r = 1; r < kRoles; ++r)
        if (models[r] && (models[r] == base || (r == kAnti && models[r] == guide)))
            throw ValueError(std::string("the ") + kRoleNames[r] + " must be a separate Model object (each keeps its own KV cache)");
    if (guide) bridge_ = std::make_unique<VocabBridge>(*base, *guide);
    if (anti) {  // proxy-tuning subtracts logits token by token: the anti must share the base's tokens
        VocabBridge check(*base, *anti, "anti");
        if (!check.identity())
            throw ValueError("the base and the anti do not share a vocabulary: " + check.first_difference());
    }
    for (int r = 0; r < kRoles; ++r) tracks_[r].model = models[r];
    eog_.resize(n_vocab_);
    starts_word_.resize(n_vocab_);
    for (Token t = 0; t < n_vocab_; ++t) {
        // the final distribution lives on the base vocabulary, so its tokens decide
        eog_[t] = base->is_eog(t) || (guide && !bridged() && guide->is_eog(t));
        std::string piece = base->piece(t, false);
        // a word starts at whitespace; control tokens (and empty pieces) end a word too
        starts_word_[t] = piece.empty() || base->is_control(t) || std::isspace(static_cast<unsigned char>(piece[0]));
    }
    if (bridged()) {
        guide_p_.resize(guide->n_vocab());
        guide_mapped_.resize(n_vocab_);
    }
}

// The guide's next-token logits on the base vocabulary. A guide with its own tokenizer reads
// the generated text through that tokenizer first (re-tokenised in full, so that text the guide
// would merge differently is merged its way), then its distribution is mapped by the bridge.
const float* Engine::guide_logits() {
    Track& g = tracks_[kGuide];
    if (!bridged()) return g.logits();
    std::vector<Token> target = guide_prompt_;
    std::vector<Token> text = g.model->tokenize(text_.substr(0, utf8_boundary(text_, 0, text_.size())), false, false);
    target.insert(target.end(), text.begin(), text.end());
    size_t common = 0;
    const size_t have = g.length();
    auto at = [&g](size_t i) { return i < g.cached.size() ? g.cached[i] : g.pending[i - g.cached.size()]; };
    while (common < have && common < target.size() && at(common) == target[common]) ++common;
    if (common == target.size() && common == have && g.pending.empty() && common > 0) {
        // nothing new since the last decode: its logits are still current
    } else {
        if (common == target.size()) --common;  // re-read the last token for its logits
        g.keep(common);
        g.pending.insert(g.pending.end(), target.begin() + static_cast<long>(g.length()), target.end());
    }
    softmax(g.logits(), g.model->n_vocab(), guide_p_.data());
    unmatched_ = bridge_->map_log_probs(guide_p_.data(), guide_mapped_.data(), n_vocab_);
    return guide_mapped_.data();
}

std::vector<Token> Engine::tokens(int role) const {
    if (role < 0 || role >= kRoles) throw ValueError("role must be 0 (base), 1 (guide) or 2 (anti)");
    std::vector<Token> out = tracks_[role].cached;
    out.insert(out.end(), tracks_[role].pending.begin(), tracks_[role].pending.end());
    return out;
}

bool Engine::guide_blocked() const { return bridged() && utf8_boundary(text_, 0, text_.size()) != text_.size(); }

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
    if (p.draft_max < 1 || p.draft_max > 64) throw ValueError("draft_max must be in 1..64");
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
    if (bridged() && (p.policy.method == Method::Proxy || p.policy.method == Method::DeRa))
        throw ValueError(std::string("method '") + method_name(p.policy.method) +
                         "' combines logits token by token and needs a guide that shares the base's vocabulary: " +
                         bridge_->first_difference());
    params_ = p;
    policy_ = std::move(policy);
    guide_prompt_ = guide_prompt;
    sampler_ = std::move(sampler);
    tokens_ = interventions_ = capped_ = n_alpha_ = 0;
    alpha_sum_ = 0;
    text_.clear();
    released_ = 0;
    finish_reason_.clear();
    in_word_ = false;
    queue_.clear();
    queue_pos_ = 0;
    draft_len_ = std::min(4, std::max(1, p.draft_max));
    drafted_ = accepted_ = 0;
    spec_pause_ = 0;
    accept_ema_ = 1.0;

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

bool Engine::used(int role) const {
    return role == kBase ? policy_.uses_base() : role == kGuide ? policy_.uses_guide() : policy_.uses_anti();
}

bool Engine::step(Step& out) {
    if (!active_) return false;
    if (queue_pos_ == queue_.size()) {
        queue_.clear();
        queue_pos_ = 0;
        if (can_speculate() && spec_pause_ == 0) {
            speculate();
        } else {
            queue_.push_back(decide_one());
            if (spec_pause_ > 0) --spec_pause_;
        }
    }
    return emit(queue_[queue_pos_++], out);
}

Engine::Decision Engine::decision(Token token, const StepInfo& info, const std::vector<float>& p) const {
    Decision d;
    d.step.token = token;
    d.step.info = info;
    d.step.logprob = std::log(p[token]);
    if (params_.top_logprobs > 0)
        for (int i : top_k(p.data(), n_vocab_, params_.top_logprobs)) d.step.top_logprobs.emplace_back(i, std::log(p[i]));
    return d;
}

const std::vector<float>& Engine::without_eog(const std::vector<float>& p) {
    if (!params_.ignore_eos) return p;
    no_eog_ = p;
    double sum = 0;
    for (int i = 0; i < n_vocab_; ++i) {
        if (eog_[i]) no_eog_[i] = 0;
        sum += no_eog_[i];
    }
    if (!(sum > 0)) throw Error("ignore_eos: the policy gives all its probability to end tokens");
    for (auto& x : no_eog_) x = static_cast<float>(x / sum);
    return no_eog_;
}

// One token the plain way: gate on the base, consult the (lazy) guide if needed, combine, pick.
Engine::Decision Engine::decide_one() {
    Track& base = tracks_[kBase];
    Track& guide = tracks_[kGuide];
    Track& anti = tracks_[kAnti];
    const bool naive = !params_.lazy;
    StepInfo info;
    // word-level nudging: inside a nudged word the guide keeps writing until it starts a new word
    if (in_word_ && !guide_blocked()) {
        policy_.gate(nullptr, tokens_, interventions_, info);
        const auto& p = without_eog(policy_.combine(guide_logits(), nullptr, info));
        info.unmatched = bridged() ? unmatched_ : 0.0f;
        Token t = sampler_.pick(p.data(), n_vocab_);
        if (!starts_word_[t]) {
            if (naive) base.logits();
            return decision(t, info, p);
        }
    }
    in_word_ = false;
    const float* lb = policy_.uses_base() ? base.logits() : nullptr;
    bool consult = policy_.gate(lb, tokens_, interventions_, info) && !(lb && guide_blocked());
    const float* lg = nullptr;
    const float* la = nullptr;
    if (policy_.uses_guide() && (consult || naive)) lg = guide_logits();
    if (policy_.uses_anti() && (consult || naive)) la = anti.logits();
    const auto& p = without_eog(policy_.combine(consult ? lg : nullptr, la, info));
    if (consult && lg) info.unmatched = bridged() ? unmatched_ : 0.0f;
    Token t = sampler_.pick(p.data(), n_vocab_);
    in_word_ = params_.policy.method == Method::NudgingWord && info.intervened;
    return decision(t, info, p);
}

bool Engine::can_speculate() const {
    if (!params_.speculative || !params_.lazy || bridged() || params_.ignore_eos) return false;
    switch (params_.policy.method) {
        case Method::Nudging: case Method::BlendIn: case Method::Ensemble: case Method::Proxy: case Method::DeRa:
            return true;
        default:  // base and guide alone need no second opinion; a nudged word is the guide's anyway
            return false;
    }
}

// Speculative verification (DESIGN.md section 4): the guide drafts up to k tokens, the base (and
// the anti) score them in one batch, and the policy decides each drafted position from both
// models' logits there. Greedy: accept while the policy's argmax is the draft, then emit the
// policy's own choice. Sampling: accept draft d with probability min(1, P(d)/Q(d)), else draw
// from norm(max(0, P - Q)) (P: the policy's sampling distribution, Q: the guide's draft
// distribution); each emitted token follows the policy exactly. All accepted: one bonus token.
void Engine::speculate() {
    Track& base = tracks_[kBase];
    Track& guide = tracks_[kGuide];
    Track& anti = tracks_[kAnti];
    const bool greedy = sampler_.greedy();
    size_t before[kRoles];
    for (int r = 0; r < kRoles; ++r) before[r] = tracks_[r].length();

    int k = std::min(draft_len_, static_cast<int>(params_.max_tokens - tokens_) - 1);
    for (int r = 0; r < kRoles; ++r)
        if (used(r)) k = std::min(k, tracks_[r].model->n_ctx() - 1 - static_cast<int>(tracks_[r].length()));
    k = std::min(k, base.model->n_batch() - 1);
    if (k < 1) {
        queue_.push_back(decide_one());
        return;
    }
    if (guide_rows_.size() < static_cast<size_t>(k)) {
        guide_rows_.resize(k, std::vector<float>(n_vocab_));
        draft_q_.resize(k, std::vector<float>(n_vocab_));
    }
    std::vector<Token> drafts;
    for (int j = 0; j < k; ++j) {
        const float* lg = guide.logits();
        std::copy(lg, lg + n_vocab_, guide_rows_[j].begin());
        Token d;
        if (greedy) {
            d = static_cast<Token>(std::max_element(lg, lg + n_vocab_) - lg);
        } else {
            softmax(lg, n_vocab_, draft_q_[j].data());
            draft_q_[j] = sampler_.shape(draft_q_[j].data(), n_vocab_);
            d = sampler_.draw(draft_q_[j].data(), n_vocab_);
        }
        drafts.push_back(d);
        guide.pending.push_back(d);
        if (eog_[d]) break;
    }
    k = static_cast<int>(drafts.size());
    std::vector<const float*> lb = base.verify(drafts, base_row0_);
    std::vector<const float*> la;
    if (used(kAnti)) la = anti.verify(drafts, anti_row0_);
    drafted_ += k;

    long t = tokens_, iv = interventions_;
    int accepted = 0;
    for (int j = 0; j < k; ++j) {
        StepInfo info;
        bool consult = policy_.gate(lb[j], t, iv, info);
        const auto& p = policy_.combine(consult ? guide_rows_[j].data() : nullptr,
                                        consult && !la.empty() ? la[j] : nullptr, info);
        const Token d = drafts[j];
        Token choice = d;
        bool accept;
        if (greedy) {
            choice = static_cast<Token>(std::max_element(p.begin(), p.end()) - p.begin());
            accept = choice == d;
        } else {
            target_ = sampler_.shape(p.data(), n_vocab_);
            const auto& q = draft_q_[j];
            accept = sampler_.uniform() * q[d] < target_[d];  // probability min(1, P(d) / Q(d))
            if (!accept) {
                for (int i = 0; i < n_vocab_; ++i) target_[i] = std::max(0.0f, target_[i] - q[i]);
                double sum = 0;
                for (float x : target_) sum += x;
                for (auto& x : target_) x = static_cast<float>(x / sum);
                choice = sampler_.draw(target_.data(), n_vocab_);
            }
        }
        queue_.push_back(decision(choice, info, p));
        queue_.back().in_kv = accept;
        ++t;
        iv += info.intervened;
        if (!accept) break;
        ++accepted;
        if (eog_[d]) break;
    }
    accepted_ += accepted;
    if (accepted == k && !eog_[drafts.back()]) {  // the bonus token after the last draft
        StepInfo info;
        bool consult = policy_.gate(lb[k], t, iv, info);
        const auto& p = policy_.combine(consult ? guide.logits() : nullptr,
                                        consult && !la.empty() ? la[k] : nullptr, info);
        queue_.push_back(decision(sampler_.pick(p.data(), n_vocab_), info, p));
    }
    for (int r = 0; r < kRoles; ++r)
        if (used(r)) tracks_[r].keep(before[r] + accepted);
    // adapt: a fully accepted draft may grow, a rejection shrinks to what was accepted
    draft_len_ = accepted == k ? std::min(2 * draft_len_, params_.draft_max) : std::max(1, accepted + 1);
    // a draft that is mostly rejected costs more guide decodes than it saves base decodes: when
    // the recent acceptance is low, decode plainly for a while, then try drafting again
    accept_ema_ = 0.7 * accept_ema_ + 0.3 * (static_cast<double>(accepted) / k);
    if (accept_ema_ < 0.5) {
        spec_pause_ = 16;
        accept_ema_ = 0.5;  // the next round starts neutral
    }
}

bool Engine::emit(Decision& d, Step& out) {
    out = std::move(d.step);
    const StepInfo& info = out.info;
    const Token token = out.token;
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
    text_ += tracks_[kBase].model->piece(token, false);
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
    if (!d.in_kv) {
        for (int r = 0; r < kRoles; ++r) {
            if (!used(r) || (r == kGuide && bridged())) continue;  // a bridged guide follows the text
            Track& tr = tracks_[r];
            if (static_cast<int>(tr.length()) >= tr.model->n_ctx()) {
                finish("context", out);
                return true;
            }
            tr.pending.push_back(token);
        }
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
    s.drafted = drafted_;
    s.accepted = accepted_;
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
