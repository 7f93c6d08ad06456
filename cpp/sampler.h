// Picks a token from a final distribution: greedy at temperature 0, otherwise p^(1/T) filtered
// by top-k, top-p and min-p (in that order) and drawn with a seeded RNG.
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
    int draw(const float* q, int n);  // a draw from an already-normalised distribution

private:
    SamplingParams params_;
    std::mt19937_64 rng_;
    std::vector<float> q_;
    std::vector<int> order_;
};

}  // namespace blendin
