// The single-sequence decoding loop that joins the models and the Decoder: prompts (reusing what
// each model's KV cache already holds), one token per step, the lazy guide, a guide with its own
// tokenizer, speculative verification, statistics.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "decoder.h"
#include "lease.h"
#include "model.h"
#include "params.h"
#include "retokenizer.h"
#include "vocab_bridge.h"

namespace blendin {

enum Role { kBase = 0, kGuide = 1, kAnti = 2, kRoles = 3 };
const char* role_name(int role);
// A model's prompt must be non-empty, in its vocabulary, and leave room for a token.
void check_prompt(int role, const Model& model, const std::vector<Token>& prompt);
// A bridged guide's target: its prompt, then the text so far read through its tokenizer (`rt`),
// within `ctx` tokens.
void read_text(Retokenizer& rt, const Decoder& d, const std::vector<Token>& prompt, int ctx, std::vector<Token>& target);

struct Stats {
    long tokens = 0, interventions = 0, capped = 0, drafted = 0, accepted = 0;
    double intervention_rate = 0, mean_alpha = 0, acceptance_rate = 0;
    long prompt_tokens[kRoles] = {}, reused_tokens[kRoles] = {};
    long long decode_calls[kRoles] = {}, decoded_tokens[kRoles] = {};
    double prefill_s = 0, generate_s = 0, tokens_per_s = 0;
    std::string finish_reason, warning;
};
// A sequence's own counts (tokens, interventions, alpha, finish reason, warning), from its decoder.
Stats decoder_stats(const Decoder& d);

// Sequences that decide their next token together, and where their models' rows come from: a
// single generation (a batch of one), the server's batch (Scheduler), best-of-N's candidates and
// scoring all decide through decide_tokens, so the phases of a token are written once.
class Sequences {
public:
    virtual ~Sequences() = default;
    // Sequence i's decoder; nullptr once it has left (an error ended it).
    virtual Decoder* decoder(int i) = 0;
    virtual bool uses(int i, int role) const = 0;
    // Bring model `role`'s rows of sequences `which` up to date, in one batched decode.
    virtual void fetch(int role, const std::vector<int>& which) = 0;
    virtual const float* row(int i, int role) = 0;  // a bridged guide's: probabilities on the base vocabulary
    virtual float unmatched(int /*i*/) const { return 0.0f; }  // of a bridged guide's last row
    // Run one sequence's decision: an error ends that sequence alone where the caller can (the
    // server's batch), else it propagates.
    virtual void guard(int /*i*/, const std::function<void()>& decide) { decide(); }
};
// Decide the next token of each of `live` (decoder.h's phases; one fetch per model and phase):
// the naive loop's reads, nudged words, the gates on the base's rows, the consulted guides and
// antis. Each decoder's decided() then holds its token, to emit or follow.
void decide_tokens(Sequences& seqs, const std::vector<int>& live);

// One generation's place in the models: its Decoder, what each model is to have read (its prompt
// and the generated tokens it follows; the Model records what its KV cache holds), a bridged
// guide's prompt and tokenizer, its counts. The Engine runs one, the Scheduler one per slot, with
// the same rules for starting, fitting and following a token.
struct Sequence {
    int seq = 0;                  // the models' KV sequence
    int ctx[kRoles] = {};         // the tokens each model may hold for it
    bool use[kRoles] = {};        // the models its method reads
    std::unique_ptr<Decoder> decoder;
    std::vector<Token> target[kRoles];
    std::vector<Token> guide_prompt;           // a bridged guide's
    std::unique_ptr<Retokenizer> retokenizer;  // a bridged guide reads the text through it
    float unmatched = 0;                       // of a bridged guide's last row
    long prompt[kRoles] = {}, reused[kRoles] = {};
    long long calls0[kRoles] = {}, tokens0[kRoles] = {};

    // A new generation: its decoder, each used model's prompt as its target (and how much of it the
    // sequence already holds), the models' counters now.
    void start(Model* const* models, const std::vector<Token>* const* prompts, const GenParams& p,
               const TokenFacts& facts, bool bridged);
    bool room(Token next, const TokenFacts& facts, bool bridged) const;  // every model can read `next`
    // Account for a decided token (`in_kv`: an accepted draft every model has read). True when the
    // generation ends with it; else each used model is to read it (a bridged guide follows the text).
    bool emit(Step& step, const TokenFacts& facts, bool bridged, bool in_kv = false);
    void count(Stats& s, Model* const* models) const;  // prompt, reused and decoded tokens, decode calls
};

class Engine {
public:
    // guide and anti may be null (base alone; anti only for proxy). A guide with another
    // vocabulary goes through a VocabBridge; the anti must share the base's.
    Engine(Model* base, Model* guide, Model* anti);

    // Throws ValueError if these parameters cannot run on this engine's models: out of range,
    // a method whose model is missing, or what a guide with another vocabulary cannot do (be
    // mixed in logit space, draft, be verified token by token). Blender checks its settings with
    // it when they are set; start() checks every generation's.
    void check(const GenParams& params) const;
    // Check the parameters and read both prompts (each model keeps the longest prefix its KV
    // cache already holds).
    void start(const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt, const GenParams& params);
    // One token. Returns false once the generation has finished (nothing was written to `out`).
    bool step(Step& out);
    // Teacher forcing: the policy's step for each token of `continuation` (base vocabulary) after the
    // prompts, as decoding would compute it at temperature 1 (gate, cap, nudged words, the
    // bridged guide reading the text), with `logprob` the log-probability of the given token.
    // Both models' logits come from batched passes over prompt + continuation (a guide with its
    // own vocabulary re-reads the text where it is consulted, as in decoding). Ends any generation
    // in progress; stats() then describes the scored tokens.
    std::vector<Step> score(const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt,
                            const std::vector<Token>& continuation, const GenParams& params);
    // A copy of the statistics (a read: see Lease::Read).
    Stats stats() const;
    void reset();  // empty the models' KV caches
    int n_vocab() const { return n_vocab_; }
    bool bridged() const { return bridge_ && !bridge_->identity(); }
    // Whether a token ends a generation: the one definition of an end token, used by every
    // decoder of this engine's models (the base's end tokens, and a same-vocabulary guide's).
    bool is_end(Token t) const;
    // What a model has read or will read next (the engine's view of its sequence), a copy (a read).
    std::vector<Token> tokens(int role) const;

private:
    friend class Scheduler;  // runs many generations on this engine's models (scheduler.h)
    class One;               // the engine's sequence as Sequences (a batch of one)

    const float* logits(int role) { return models_[role]->sync(0, seq_.target[role]); }
    // Read a model's target and the drafts in one batch: rows[i] = the logits after i drafts (the
    // current row is copied into `row0` first when it is already there).
    std::vector<const float*> verify(int role, const std::vector<Token>& drafts, std::vector<float>& row0);
    bool used(int role) const;
    // The checks start and score share: the parameters, each used model's prompt, the methods a
    // bridged guide cannot serve.
    void check_prompts(const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt, const GenParams& p);
    // Scoring: the logits after prompt + continuation[:i] for i in [a, b), as rows of `rows`.
    void read_rows(int role, const std::vector<Token>& prompt, const std::vector<Token>& continuation, size_t a,
                   size_t b, std::vector<float>& rows);
    bool can_speculate() const;
    void plain_step();
    int draft_length();
    double round_cost(int k, double acceptance);
    void speculate(int k);
    std::vector<Token> draft_with_guide(int k);
    std::vector<Token> draft_from_context(int k) const;
    // Account for a decided token (`in_kv`: an accepted draft, already read by every model).
    bool emit(Step& s, bool in_kv);

    const float* guide_logits();  // on the base vocabulary (mapped through the bridge if needed)
    // the share of the guide's mass with no exact base token, at its last reading
    float unmatched() const { return bridged() ? seq_.unmatched : 0.0f; }

    Model* models_[kRoles] = {};
    std::unique_ptr<VocabBridge> bridge_;
    std::unique_ptr<TokenFacts> facts_;
    std::vector<float> guide_p_, guide_mapped_;
    int n_vocab_ = 0;

    Sequence seq_;  // sequence 0 of every model
    bool active_ = false;
    std::deque<Step> queue_;  // emitted by a speculative round, handed out one per step()
    int draft_len_ = 4;        // speculative on: the next draft's length
    long plain_steps_ = 0;     // since the last speculative round
    double accept_ema_ = 0.8;  // recent share of drafted positions accepted
    int could_pay_ = -1;       // speculative auto: some draft length could pay (-1: not yet known)
    struct Pace {              // recent seconds per emitted token
        double seconds = 0;
        int n = 0;
        void add(double s) { seconds = n++ ? 0.8 * seconds + 0.2 * s : s; }
    };
    Pace plain_pace_, spec_pace_;
    long drafted_ = 0, accepted_ = 0;
    std::vector<std::vector<float>> guide_rows_, draft_q_;
    std::vector<float> base_row0_, guide_row0_, anti_row0_;
    std::chrono::steady_clock::time_point t_start_, t_first_, t_end_;
    mutable Lease lease_;
};

}  // namespace blendin
