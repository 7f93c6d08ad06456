// One step's decision for each method (docs/design.md section 3): the gate, then the combination of
// the base and guide distributions into the final one. Plain vectors only: no llama.cpp here.
#pragma once

#include <vector>

#include "distribution.h"
#include "params.h"
#include "penalties.h"

namespace blendin {

// Which models a method reads.
inline bool uses_base(Method m) { return m != Method::Guide; }
inline bool uses_guide(Method m) { return m != Method::Base; }
inline bool uses_anti(Method m) { return m == Method::Proxy; }

enum class Source { Base, Blend, Guide };
const char* source_name(Source s);

// Per-token diagnostics. NaN where a quantity was not computed (e.g. pg_max when the guide was
// not consulted).
struct StepInfo {
    Source source = Source::Base;
    bool intervened = false;
    bool capped = false;  // the gate said intervene, the intervention cap said no
    bool looped = false;  // the loop-aware gate consulted the guide: the base's top token would repeat an n-gram
    float pb_max = 0, pg_max = 0, alpha = 0, agree = 0;
    // With diagnostics on, where the guide was consulted: the top-10 overlap of the two
    // distributions, the rank (1 = top) of the guide's top token in the base distribution and the
    // base mass above it (BlendIn's vocabulary analysis: inside the base's top-p 0.9 iff < 0.9),
    // and the share of guide mass with no exact base counterpart.
    float overlap = 0;
    int guide_rank = 0;
    float mass_above = 0, unmatched = 0;
};

class Policy {
public:
    static constexpr int kOverlapK = 10;

    // `ends`: the tokens that end an answer (for guide_ends).
    Policy(const PolicyParams& params, int n_vocab, const std::vector<char>* ends = nullptr);

    const PolicyParams& params() const { return params_; }
    bool uses_base() const { return blendin::uses_base(params_.method); }
    bool uses_guide() const { return blendin::uses_guide(params_.method); }
    bool uses_anti() const { return blendin::uses_anti(params_.method); }
    // gated methods consult the guide only where the base is unsure; the others at every token
    bool gated() const;

    // Phase 1, from the base logits (nullptr when the guide alone writes): computes p_base and
    // decides whether the guide is consulted. `tokens` and `interventions` so far feed the cap.
    // `loops` (the answer's penalties, with loop_gate on): a base that is confident but whose top
    // token would repeat an n-gram of the answer is not reliable there, so the guide is consulted
    // and, in BlendIn, trusted (alpha 1).
    // `sentence_end` (with guide_ends: the text ends a sentence or a line): the guide is asked
    // whether the answer ends here, even where the base is confident; if its top token does not
    // end it, the base's distribution stands (an end check is no intervention).
    bool gate(const float* base_logits, long tokens, long interventions, StepInfo& info,
              const Penalties* loops = nullptr, bool sentence_end = false);
    // Whether one more intervention stays within the cap.
    bool within_cap(long tokens, long interventions) const;

    // The guide at this position, on the base vocabulary: its logits (kept for proxy and DeRa,
    // which combine raw logits in the same step), or with `probs` its probabilities (a guide with
    // another vocabulary, mapped by the bridge; renormalised here).
    void read_guide(const float* guide, bool probs = false);

    // Phase 2: the final distribution (probabilities over the vocabulary). `consulted`: the guide
    // was read this step (read_guide); the anti's logits are needed by proxy only.
    const std::vector<float>& combine(bool consulted, const float* anti_logits, StepInfo& info);

private:
    PolicyParams params_;
    int n_;
    const std::vector<char>* ends_;
    bool end_check_ = false;  // consulted at a sentence end only to ask whether the answer ends
    const float* lb_ = nullptr;
    const float* lg_ = nullptr;
    Peak peak_b_, peak_g_;
    std::vector<float> pb_, pg_, out_;
};

}  // namespace blendin
