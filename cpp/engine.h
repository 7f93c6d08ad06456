// The decoding loop that joins the models and the policy: prompts (with KV prefix reuse), one
// token per step, lazy guide catch-up, stop conditions, streaming text, statistics.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "model.h"
#include "policy.h"
#include "sampler.h"
#include "vocab_bridge.h"

namespace blendin {

struct GenParams {
    PolicyParams policy;
    SamplingParams sampling;
    int max_tokens = 256;
    std::vector<std::string> stop;     // stop strings (not included in the text)
    bool lazy = true;                  // false: the naive loop, every model decodes every token
    bool speculative = false;          // the guide drafts, the base verifies a batch (needs lazy)
    int draft_max = 8;                 // longest draft (the length adapts between 1 and this)
    float warn_intervention_rate = 0.5f;
    int top_logprobs = 0;              // alternatives reported per step (0 = none)
    bool ignore_eos = false;           // end-of-generation tokens get probability 0 (as llama.cpp's --ignore-eos)
};

struct Step {
    Token token = -1;
    std::string text;           // the bytes this step releases (whole UTF-8 characters)
    StepInfo info;
    float logprob = 0;          // log p(token) under the final (temperature 1) distribution
    std::vector<std::pair<Token, float>> top_logprobs;  // the most likely alternatives, best first
    std::string finish_reason;  // "" while generation goes on; "stop", "length" or "context"
};

enum Role { kBase = 0, kGuide = 1, kAnti = 2, kRoles = 3 };

struct Stats {
    long tokens = 0, interventions = 0, capped = 0, drafted = 0, accepted = 0;
    double intervention_rate = 0, mean_alpha = 0;
    long prompt_tokens[kRoles] = {}, reused_tokens[kRoles] = {};
    long long decode_calls[kRoles] = {}, decoded_tokens[kRoles] = {};
    double prefill_s = 0, generate_s = 0, tokens_per_s = 0;
    std::string finish_reason, warning;
};

class Engine {
public:
    // guide and anti may be null (base alone; anti only for proxy). The models must share one
    // vocabulary: the first difference is reported.
    Engine(Model* base, Model* guide, Model* anti);

    // Prefill both prompts (reusing whatever prefix each KV cache already holds).
    void start(const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt, const GenParams& params);
    // One token. Returns false once the generation has finished (nothing was written to `out`).
    bool step(Step& out);
    Stats stats() const;
    void reset();  // forget the KV caches (after adapter scales change, say)
    int n_vocab() const { return n_vocab_; }
    bool bridged() const { return bridge_ && !bridge_->identity(); }
    // What a model has read or will read next (its KV cache and pending tokens), for tests.
    std::vector<Token> tokens(int role) const;

private:
    // A decided token: emitted in order by step(). `in_kv`: already in every model's cache (an
    // accepted draft), so it is not queued for decoding again.
    struct Decision {
        Step step;
        bool in_kv = false;
    };

    // One model's view of the conversation: what its KV cache holds and what it has yet to read.
    struct Track {
        Model* model = nullptr;
        std::vector<Token> cached, pending;
        long reused = 0, prompt = 0;
        long long calls0 = 0, tokens0 = 0;
        void prefill(const std::vector<Token>& prompt_tokens);
        const float* logits();  // catches up on pending tokens in one batch
        // Decode pending tokens and drafts in one batch; rows[i] = logits after i drafts (the
        // current row is copied into `row0` first when nothing is pending).
        std::vector<const float*> verify(const std::vector<Token>& drafts, std::vector<float>& row0);
        void keep(size_t n);  // roll the sequence back to its first n tokens
        size_t length() const { return cached.size() + pending.size(); }
    };

    bool used(int role) const;
    bool can_speculate() const;
    Decision decide_one();
    void speculate();
    Decision decision(Token token, const StepInfo& info, const std::vector<float>& p) const;
    const std::vector<float>& without_eog(const std::vector<float>& p);  // for ignore_eos
    bool emit(Decision& d, Step& out);

    void finish(const std::string& reason, Step& out);
    void release_text(Step& out, bool all);

    const float* guide_logits();  // on the base vocabulary (mapped through the bridge if needed)
    bool guide_blocked() const;    // a cross-vocabulary guide cannot read half a character

    Track tracks_[kRoles];
    std::unique_ptr<VocabBridge> bridge_;
    std::vector<Token> guide_prompt_;
    std::vector<float> guide_p_, guide_mapped_;
    float unmatched_ = 0;
    int n_vocab_ = 0;
    std::vector<bool> starts_word_;  // guide tokens that begin a new word (nudging_word)
    std::vector<bool> eog_;

    GenParams params_;
    Policy policy_{PolicyParams{}, 1};
    Sampler sampler_{SamplingParams{}};
    bool active_ = false, in_word_ = false;
    std::vector<Decision> queue_;  // decided by a speculative round, not yet emitted
    size_t queue_pos_ = 0;
    int draft_len_ = 4;
    int spec_pause_ = 0;       // plain steps left before drafting again
    double accept_ema_ = 1.0;  // recent share of drafted tokens accepted
    long drafted_ = 0, accepted_ = 0;
    std::vector<std::vector<float>> guide_rows_, draft_q_;
    std::vector<float> base_row0_, anti_row0_, target_, no_eog_;
    long tokens_ = 0, interventions_ = 0, capped_ = 0, n_alpha_ = 0;
    double alpha_sum_ = 0;
    std::string text_;     // generated bytes so far
    size_t released_ = 0;  // bytes of text_ handed out
    std::string finish_reason_;
    std::chrono::steady_clock::time_point t_start_, t_first_, t_end_;
};

}  // namespace blendin
