// N candidates as N parallel sequences of one llama.cpp context per model (best-of-N): the
// prompt is decoded once and shared through the KV cache, every step decodes one batch with a
// row per live candidate. Also scores given continuations in one batched pass (log-likelihoods).
// These functions clear the models' KV caches: a single-sequence Engine must reset afterwards.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine.h"
#include "model.h"

namespace blendin {

struct Candidate {
    std::vector<Token> tokens;  // without the end token
    std::string text;
    std::string finish_reason;  // "stop", "length" or "context"
    long steps = 0, interventions = 0;
};

// Generate one candidate per seed with the policy and sampling of `params` (its seed is ignored);
// each candidate is what a single generation with that seed gives.
std::vector<Candidate> generate_candidates(Model& base, Model* guide, Model* anti, const std::vector<Token>& base_prompt,
                                           const std::vector<Token>& guide_prompt, const GenParams& params,
                                           const std::vector<uint64_t>& seeds);

// Sum of log p(continuation | prompt) under `model` for each continuation, all in parallel
// sequences; `normalize` divides by the continuation's length.
std::vector<double> score_continuations(Model& model, const std::vector<Token>& prompt,
                                        const std::vector<std::vector<Token>>& continuations, bool normalize);

}  // namespace blendin
