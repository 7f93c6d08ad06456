// Pure maths on next-token vectors of one vocabulary: no llama.cpp here.
#pragma once

#include <vector>

namespace blendin {

struct Peak {
    int index = 0;    // argmax (the lowest index among ties)
    float value = 0;  // its probability
};

// p = softmax(logits) at temperature 1; returns the peak of p.
Peak softmax(const float* logits, int n, float* p);

// p = x / sum(x) for non-negative x; returns the peak of p.
Peak normalize(const float* x, int n, float* p);

// The index of the largest entry (the lowest among ties).
int argmax(const float* x, int n);

// The k largest entries of x, largest first (ties: lower index first).
std::vector<int> top_k(const float* x, int n, int k);

// |top_k(a) ∩ top_k(b)| / k: how much two distributions agree on their best candidates.
float top_k_overlap(const float* a, const float* b, int n, int k);

}  // namespace blendin
