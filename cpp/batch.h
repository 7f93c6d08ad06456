// Best-of-N: N candidates as parallel sequences of one llama.cpp context per model. The prompt is
// read once and shared through the KV cache; each step decodes one batch per model with a row per
// candidate that needs it. Every candidate is a Decoder, exactly as a single generation is, so a
// candidate equals the single generation with its seed. Also scores given continuations in one
// batched pass (log-likelihoods).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model.h"
#include "params.h"

namespace blendin {

struct Candidate {
    std::vector<Token> tokens;  // without the end token
    std::string text;
    std::string finish_reason;  // "stop", "length" or "context"
    long interventions = 0;
};

// Generate one candidate per seed with the policy and sampling of `params` (its seed is ignored).
// As many run at once as the models' n_seq_max and context allow (the sequences share the
// context's cells: the prompt once, then every candidate's tokens); the rest follow in groups.
std::vector<Candidate> generate_candidates(Model& base, Model* guide, Model* anti, const std::vector<Token>& base_prompt,
                                           const std::vector<Token>& guide_prompt, const GenParams& params,
                                           const std::vector<uint64_t>& seeds);

// Sum of log p(continuation | prompt) under `model` for each continuation, in groups of parallel
// sequences that fit the context; `normalize` divides by the continuation's length.
std::vector<double> score_continuations(Model& model, const std::vector<Token>& prompt,
                                        const std::vector<std::vector<Token>>& continuations, bool normalize);

}  // namespace blendin
