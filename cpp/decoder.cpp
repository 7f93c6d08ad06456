#include "decoder.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>

#include "error.h"
#include "text.h"

namespace blendin {

TokenFacts::TokenFacts(const Model& b, const Model* guide) : base(&b) {
    const int n = b.n_vocab();
    eog.resize(n);
    starts_word.resize(n);
    for (Token t = 0; t < n; ++t) {
        // the final distribution lives on the base vocabulary, so its tokens decide
        eog[t] = b.is_eog(t) || (guide && guide->is_eog(t));
        std::string_view piece = b.text_piece(t);
        // a word starts at whitespace; control tokens (and empty pieces) end a word too
        starts_word[t] = piece.empty() || b.is_control(t) || std::isspace(static_cast<unsigned char>(piece[0]));
    }
}

Decoder::Decoder(const GenParams& params, const TokenFacts& facts, uint64_t seed, bool bridged)
    : params_(params),
      facts_(facts),
      policy_(params.policy, static_cast<int>(facts.eog.size()), params.ignore_eos ? nullptr : &facts.eog),
      sampler_([&] {
          SamplingParams s = params.sampling;
          s.seed = seed;
          return s;
      }()),
      penalties_(params.repeat, static_cast<int>(facts.eog.size()), [&](Token t) { return facts.base->text_piece(t); }),
      bridged_(bridged) {
    for (const auto& s : params.stop) longest_stop_ = std::max(longest_stop_, s.size());
}

size_t Decoder::readable_text() const { return utf8_boundary(text_, 0, text_.size()); }

const std::vector<float>& Decoder::without_eog(const std::vector<float>& p) {
    if (!params_.ignore_eos) return p;
    no_eog_ = p;
    double sum = 0;
    for (size_t i = 0; i < no_eog_.size(); ++i) {
        if (facts_.eog[i]) no_eog_[i] = 0;
        sum += no_eog_[i];
    }
    if (!(sum > 0)) throw ValueError("ignore_eos: the policy gives all its probability to end tokens");
    for (auto& x : no_eog_) x = static_cast<float>(x / sum);
    return no_eog_;
}

const float* Decoder::penalize(const float* row, std::vector<float>& buf, bool probs) const {
    if (!row || !penalties_.active()) return row;
    buf.assign(row, row + facts_.eog.size());
    penalties_.apply(buf.data(), static_cast<int>(buf.size()), probs);
    return buf.data();
}

Token Decoder::pick(const std::vector<float>& p) {
    return forced_ >= 0 ? forced_ : sampler_.pick(p.data(), static_cast<int>(p.size()));
}

void Decoder::finalize(Token t, const std::vector<float>& p, Step& out) {
    forced_ = -1;
    out = Step{};
    out.token = t;
    out.info = info_;
    out.logprob = std::log(p[t]);
    if (params_.top_logprobs > 0)
        for (int i : top_k(p.data(), static_cast<int>(p.size()), params_.top_logprobs))
            out.top_logprobs.emplace_back(i, std::log(p[i]));
    guide_read_ = false;
}

bool Decoder::in_word() {
    // a nudged word ends where the text cannot be read by the guide, or where the cap is reached
    if (in_word_ && (guide_blocked() || !policy_.within_cap(tokens_, interventions_))) in_word_ = false;
    return in_word_;
}

bool Decoder::continue_word(const float* lg, float unmatched) {
    policy_.gate(nullptr, tokens_, interventions_, info_);
    policy_.read_guide(penalize(lg, guide_row_, bridged_), bridged_);
    guide_read_ = true;
    const auto& p = without_eog(policy_.combine(true, nullptr, info_));
    info_.unmatched = unmatched;
    const Token t = pick(p);
    if (!facts_.starts_word[t]) {
        finalize(t, p, step_);
        return true;
    }
    in_word_ = false;  // the guide would start a new word: the base decides this token
    return false;
}

bool Decoder::gate(const float* lb) {
    const Penalties* loops = params_.repeat.loop_gate > 0 ? &penalties_ : nullptr;
    // guide_ends asks the guide at the end of each sentence or line (spaces after it aside): where
    // an assistant's answer ends, and cheap for a lazy guide, which reads a sentence in one batch
    const size_t last = text_.find_last_not_of(' ');
    const bool sentence_end = last != std::string::npos && std::strchr(".!?\n", text_[last]) != nullptr;
    consult_ = policy_.gate(penalize(lb, base_row_), tokens_, interventions_, info_, loops, sentence_end) &&
               !(lb && guide_blocked());
    return consult_;
}

void Decoder::decide(const float* lg, const float* la, float unmatched) {
    if (consult_ && lg) {
        policy_.read_guide(penalize(lg, guide_row_, bridged_), bridged_);
        guide_read_ = true;
    }
    BLENDIN_CHECK(!consult_ || guide_read_);
    const auto& p = without_eog(policy_.combine(consult_, la, info_));
    if (consult_) info_.unmatched = unmatched;
    const Token t = pick(p);
    in_word_ = params_.policy.method == Method::NudgingWord && info_.intervened;
    finalize(t, p, step_);
}

bool Decoder::verify(const float* lg, const float* la, Token draft, const float* q, Step& out) {
    if (consult_) policy_.read_guide(penalize(lg, guide_row_, bridged_), bridged_);
    const auto& p = without_eog(policy_.combine(consult_, consult_ ? la : nullptr, info_));
    const int n = static_cast<int>(p.size());
    Token choice = draft;
    bool accept;
    if (sampler_.greedy()) {
        choice = argmax(p.data(), n);
        accept = choice == draft;
    } else {
        target_ = sampler_.shape(p.data(), n);
        const float qd = q ? q[draft] : 1.0f;
        accept = sampler_.uniform() * qd < target_[draft];  // probability min(1, P(d) / Q(d))
        if (!accept) choice = sampler_.residual(target_.data(), q, draft, n);
    }
    finalize(choice, p, out);
    return accept;
}

void Decoder::count(const Step& step) {
    const StepInfo& info = step.info;
    penalties_.push(step.token);
    ++tokens_;
    if (info.intervened) ++interventions_;
    if (info.capped) ++capped_;
    if (info.intervened && std::isfinite(info.alpha)) {
        alpha_sum_ += info.alpha;
        ++n_alpha_;
    }
}

void Decoder::follow(const Step& step) {
    count(step);
    text_ += facts_.base->text_piece(step.token);  // nothing for an end token
}

bool Decoder::emit(Step& step, bool room) {
    count(step);
    if (facts_.eog[step.token]) {
        finish("stop", step);
        return true;
    }
    std::string_view piece = facts_.base->text_piece(step.token);
    text_ += piece;
    // stop strings: a match must end inside the new piece (earlier ones ended the generation)
    if (longest_stop_ > 0) {
        const size_t reach = piece.size() + longest_stop_ - 1;
        const size_t from = std::max(released_, text_.size() > reach ? text_.size() - reach : 0);
        size_t cut = std::string::npos;
        for (const auto& s : params_.stop) cut = std::min(cut, text_.find(s, from));
        if (cut != std::string::npos) {
            text_.resize(cut);
            finish("stop", step);
            return true;
        }
    }
    if (tokens_ >= params_.max_tokens) {
        finish("length", step);
        return true;
    }
    if (!room) {
        finish("context", step);
        return true;
    }
    release(step, false);
    return false;
}

void Decoder::release(Step& out, bool all) {
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

void Decoder::finish(const std::string& reason, Step& step) {
    release(step, true);
    step.finish_reason = reason;
    finish_reason_ = reason;
}

std::string Decoder::warning() const {
    const double rate = tokens_ ? static_cast<double>(interventions_) / tokens_ : 0;
    // ensemble, proxy and DeRa consult the guide at every token by design: no signal there
    if (!policy_.gated() || tokens_ < 16 || !(rate > params_.warn_intervention_rate)) return "";
    return "the guide wrote " + std::to_string(static_cast<int>(std::lround(100 * rate))) +
           "% of the tokens: the base is rarely confident here, so the guide's reliability decides the output "
           "(BlendIn's excessive-intervention signal). Consider a lower gamma, another guide, or "
           "max_intervention_rate.";
}

}  // namespace blendin
