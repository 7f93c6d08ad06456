// The state of one generated sequence, whoever schedules its decodes: the policy and sampler, the
// nudged-word flag, the counters, the text with its stop strings and streaming. Every sequence (a
// single generation, the server's requests, best-of-N's candidates) is one Decoder, so every rule
// (the gate, the cap, word nudging, end tokens, stop strings, the context) is written once.
//
// One token is decided in up to three phases, each fed the logits it needs (decide_tokens in
// engine.h runs them for any number of sequences, one batched read per model and phase):
//   if (d.in_word()) decided = d.continue_word(guide logits);     // a nudged word goes on
//   if (!decided) { consult = d.gate(base logits); d.decide(guide logits if consult, anti logits); }
// then d.emit(step, room) accounts for it.
//
// Scoring (teacher forcing) drives the same phases with d.force(token) first, so that the token is
// the given one instead of a sampled one, and d.follow(step) in place of emit: the policy, the gate,
// the cap and the nudged-word state are the decoding's own.
#pragma once

#include <string>
#include <vector>

#include "model.h"
#include "params.h"
#include "penalties.h"
#include "policy.h"
#include "sampler.h"

namespace blendin {

struct Step {
    Token token = -1;
    std::string text;           // the bytes this step releases (whole UTF-8 characters)
    StepInfo info;
    float logprob = 0;          // log p(token) under the final (temperature 1) distribution
    std::vector<std::pair<Token, float>> top_logprobs;  // the most likely alternatives, best first
    std::string finish_reason;  // "" while generation goes on; "stop", "length" or "context"
};

// Facts about the base vocabulary's tokens that every decoder of a pair needs, computed once.
struct TokenFacts {
    const Model* base = nullptr;
    std::vector<char> eog;          // ends the generation (the base's end tokens, and a same-vocabulary guide's)
    std::vector<char> starts_word;  // begins a new word (whitespace first, or a control token)
    // `guide`: a guide on the base's vocabulary, whose end tokens end a generation too.
    TokenFacts(const Model& base, const Model* guide);
};

class Decoder {
public:
    // `bridged`: the guide has its own vocabulary. It re-reads the text through its tokenizer, so
    // it cannot be consulted while the text ends inside a UTF-8 character, and its rows are
    // probabilities mapped onto the base vocabulary (not logits).
    Decoder(const GenParams& params, const TokenFacts& facts, uint64_t seed, bool bridged);

    const GenParams& params() const { return params_; }
    const Policy& policy() const { return policy_; }
    bool finished() const { return !finish_reason_.empty(); }

    // ---- deciding one token ----
    // Inside a nudged word (and within the cap) the guide is asked first.
    bool in_word();
    // The guide's row (base vocabulary) for the word's next token; true when the guide wrote
    // it, false when the word is over (the base decides this token: go on with gate()).
    bool continue_word(const float* guide_logits, float unmatched);
    // The base's logits (nullptr for the guide alone): whether the guide (and the anti) must be
    // consulted for this token.
    bool gate(const float* base_logits);
    // The guide's and anti's logits where consulted (guide nullptr: not consulted, or already read
    // by continue_word this step). Decides the token.
    void decide(const float* guide_logits, const float* anti_logits, float unmatched);
    // The decided token (valid after continue_word returned true or after decide).
    Step& decided() { return step_; }

    // Whether the guide's logits were already read for this token (continue_word ended a word).
    bool guide_read() const { return guide_read_; }

    // Speculative verification at a drafted position, after gate() there (the guide's and anti's
    // logits where it consults them): the policy's decision from the models' logits. Greedy:
    // accepted iff the policy's argmax is the draft. Sampling (`q`: the distribution the draft
    // was drawn from; nullptr for a deterministic draft, Q = 1 at the draft): accept with
    // probability min(1, P(d)/Q(d)), else draw from norm(max(0, P - Q)) (Sampler::residual).
    // Either way the emitted token follows the policy exactly. Returns whether the draft was
    // accepted; `out` is the token to emit.
    bool verify(const float* guide_logits, const float* anti_logits, Token draft, const float* q, Step& out);
    // The sampler, shared with a guide that drafts (its draws come from the same seeded stream).
    Sampler& sampler() { return sampler_; }

    // ---- teacher forcing (scoring) ----
    // The next decision (continue_word, or decide) takes `token` instead of sampling one.
    void force(Token token) { forced_ = token; }
    // Account for a forced token as emit does (counters, text), without ending the sequence: an end
    // token inside a scored continuation is one more token.
    void follow(const Step& step);

    // ---- emitting ----
    // Account for a decided token and release its text into `step.text`. `room`: every model can
    // read one more token. Returns true when the generation ends with this token (its
    // finish_reason is then set).
    bool emit(Step& step, bool room);

    long tokens() const { return tokens_; }
    long interventions() const { return interventions_; }
    long capped() const { return capped_; }
    double mean_alpha() const { return n_alpha_ ? alpha_sum_ / n_alpha_ : 0; }
    const std::string& finish_reason() const { return finish_reason_; }
    const std::string& text() const { return text_; }
    // The text the guide may read: whole UTF-8 characters only.
    size_t readable_text() const;
    // BlendIn's excessive-intervention signal (gated methods only), or "".
    std::string warning() const;

private:
    const std::vector<float>& without_eog(const std::vector<float>& p);  // for ignore_eos
    void finalize(Token t, const std::vector<float>& p, Step& out);
    Token pick(const std::vector<float>& p);  // the forced token, or the sampler's
    void count(const Step& step);             // a decided token in the counters and the penalties' answer
    // A model's row with the repetition controls applied (a copy in `buf`), or the row itself
    // when none is on. `probs`: a bridged guide's probabilities.
    const float* penalize(const float* row, std::vector<float>& buf, bool probs = false) const;
    bool guide_blocked() const { return bridged_ && readable_text() != text_.size(); }
    void release(Step& out, bool all);
    void finish(const std::string& reason, Step& step);

    GenParams params_;
    const TokenFacts& facts_;
    Policy policy_;
    Sampler sampler_;
    Penalties penalties_;
    bool bridged_;
    bool in_word_ = false, consult_ = false, guide_read_ = false;
    StepInfo info_;
    Step step_;
    std::vector<float> no_eog_, target_, base_row_, guide_row_;
    Token forced_ = -1;
    long tokens_ = 0, interventions_ = 0, capped_ = 0, n_alpha_ = 0;
    double alpha_sum_ = 0;
    std::string text_;      // generated bytes so far
    size_t released_ = 0;   // bytes of text_ handed out
    size_t longest_stop_ = 0;
    std::string finish_reason_;
};

}  // namespace blendin
