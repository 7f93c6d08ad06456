// One step's decision for each method (DESIGN.md section 3): the gate, then the combination of
// the base and guide distributions into the final one. Plain vectors only: no llama.cpp here.
#pragma once

#include <string>
#include <vector>

#include "distribution.h"

namespace blendin {

enum class Method { Base, Guide, Nudging, NudgingWord, BlendIn, Ensemble, Proxy, DeRa };

Method method_from_name(const std::string& name);  // throws ValueError naming the choices
const char* method_name(Method m);

enum class Source { Base, Blend, Guide };
const char* source_name(Source s);

struct PolicyParams {
    Method method = Method::BlendIn;
    float gamma = 0.4f;               // intervene iff max p_base < gamma (nudging, blendin)
    float alpha = -1.0f;              // blendin mixing weight in [0, 1]; negative = auto
    float beta = 1.0f;                // proxy: l_b + beta * (l_g - l_anti)
    float lambda = 0.5f;              // dera: (1 - lambda) l_b + lambda l_g
    float max_intervention_rate = 1;  // cap on interventions / tokens (1 = no cap)
    int overlap_k = 10;               // top-k overlap diagnostic (0 = off)
};

// Per-token diagnostics. NaN where a quantity was not computed (e.g. pg_max when the guide was
// not consulted).
struct StepInfo {
    Source source = Source::Base;
    bool intervened = false;
    bool capped = false;  // the gate said intervene, the intervention cap said no
    float pb_max = 0, pg_max = 0, alpha = 0, agree = 0, overlap = 0;
    // BlendIn's vocabulary analysis, where the guide was consulted: the rank (1 = top) of the
    // guide's top token in the base distribution, the base mass above it (inside the base's
    // top-p 0.9 iff < 0.9), and the share of guide mass with no exact base counterpart.
    int guide_rank = 0;
    float mass_above = 0, unmatched = 0;
};

class Policy {
public:
    Policy(const PolicyParams& params, int n_vocab);

    const PolicyParams& params() const { return params_; }
    bool uses_base() const { return params_.method != Method::Guide; }
    bool uses_guide() const { return params_.method != Method::Base; }
    bool uses_anti() const { return params_.method == Method::Proxy; }

    // Phase 1, from the base logits (nullptr when the guide alone writes): computes p_base and
    // decides whether the guide is consulted. `tokens` and `interventions` so far feed the cap.
    bool gate(const float* base_logits, long tokens, long interventions, StepInfo& info);

    // Phase 2: the final distribution (probabilities over the vocabulary). Guide/anti logits are
    // nullptr when the gate did not consult them.
    const std::vector<float>& combine(const float* guide_logits, const float* anti_logits, StepInfo& info);

    const std::vector<float>& p_base() const { return pb_; }
    const std::vector<float>& p_guide() const { return pg_; }

private:
    PolicyParams params_;
    int n_;
    const float* lb_ = nullptr;
    Peak peak_b_;
    std::vector<float> pb_, pg_, out_;
};

}  // namespace blendin
