// Picks a token from a final distribution: greedy at temperature 0, otherwise p^(1/T) filtered
// by top-k, top-p and min-p (in that order) and drawn with a seeded RNG. p^(1/T) is computed as
// exp((log p - log max p) / T), which never underflows for the top token: a temperature near 0
// is greedy (up to exact ties), not an empty distribution.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "params.h"

namespace blendin {

class Sampler {
public:
    explicit Sampler(const SamplingParams& params);
    const SamplingParams& params() const { return params_; }
    bool greedy() const { return params_.temperature == 0; }

    // The distribution tokens are drawn from: p^(1/T) after the filters, normalised (length n).
    const std::vector<float>& shape(const float* p, int n);
    int pick(const float* p, int n);
    double uniform();  // in [0, 1), from the seeded stream (for speculative acceptance)
    int draw(const float* q, int n);  // a draw from an already-normalised distribution (needs some mass)
    // Speculative verification after a rejected draft: a draw from norm(max(0, P - Q)), P the
    // shaped target distribution and Q the draft's (q nullptr: a deterministic draft, Q all on
    // `draft`). Where that leftover has no mass, P == Q up to rounding (in exact arithmetic the
    // draft is then always accepted, so the rejection came from rounding): the draw is from P.
    int residual(const float* p, const float* q, int draft, int n);

private:
    SamplingParams params_;
    std::mt19937_64 rng_;
    std::vector<float> q_, leftover_;
    std::vector<int> order_;
};

}  // namespace blendin
