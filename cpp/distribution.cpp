#include "distribution.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>

namespace blendin {

namespace {

// The hot loops run over whole vocabularies (up to 262k entries) at every step: written in lanes
// of 8 so that the compiler vectorizes them, and on x86-64 Linux compiled twice, for AVX2 + FMA
// and for the baseline, picked at load time.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define BLENDIN_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define BLENDIN_VECTOR_CLONES
#endif
constexpr int kLanes = 8;

// exp(x) for x <= 0 to within 1e-7 relative (0 is exact), flushing below e^-87: Cody-Waite
// reduction to r in [-ln2/2, ln2/2] and Cephes' degree-6 polynomial for exp(r), scaled by 2^k
// through the exponent bits. std::exp does not vectorize.
inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
    const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
    float e = 1.9875691500e-4f;
    e = e * r + 1.3981999507e-3f;
    e = e * r + 8.3334519073e-3f;
    e = e * r + 4.1665795894e-2f;
    e = e * r + 1.6666665459e-1f;
    e = e * r + 5.0000001201e-1f;
    e = e * r * r + r + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &e, sizeof bits);
    bits += static_cast<int32_t>(k) << 23;
    std::memcpy(&e, &bits, sizeof e);
    return e;
}

float max_of(const float* x, int n) {
    float lane[kLanes];
    for (float& m : lane) m = x[0];
    int i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int j = 0; j < kLanes; ++j) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
    float mx = lane[0];
    for (float m : lane) mx = m > mx ? m : mx;
    for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

double sum_of(const float* x, int n) {
    float lane[kLanes] = {};
    int i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int j = 0; j < kLanes; ++j) lane[j] += x[i + j];
    double sum = 0;
    for (; i < n; ++i) sum += x[i];
    for (float s : lane) sum += s;
    return sum;
}

void scale(const float* x, int n, float by, float* p) {
    for (int i = 0; i < n; ++i) p[i] = x[i] * by;
}

Peak peak_of(const float* x, int n, float mx) {
    Peak peak;
    peak.index = static_cast<int>(std::find(x, x + n, mx) - x);  // the first maximum
    return peak;
}
}  // namespace

BLENDIN_VECTOR_CLONES
Peak softmax(const float* logits, int n, float* p) {
    const float mx = max_of(logits, n);
    Peak peak = peak_of(logits, n, mx);
    float lane[kLanes] = {};
    int i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int j = 0; j < kLanes; ++j) {
            p[i + j] = exp_nonpositive(logits[i + j] - mx);
            lane[j] += p[i + j];
        }
    double sum = 0;
    for (; i < n; ++i) {
        p[i] = exp_nonpositive(logits[i] - mx);
        sum += p[i];
    }
    for (float s : lane) sum += s;
    scale(p, n, static_cast<float>(1.0 / sum), p);
    peak.value = p[peak.index];
    return peak;
}

BLENDIN_VECTOR_CLONES
int argmax(const float* x, int n) { return peak_of(x, n, max_of(x, n)).index; }

BLENDIN_VECTOR_CLONES
Peak normalize(const float* x, int n, float* p) {
    Peak peak = peak_of(x, n, max_of(x, n));
    scale(x, n, static_cast<float>(1.0 / sum_of(x, n)), p);
    peak.value = p[peak.index];
    return peak;
}

std::vector<int> top_k(const float* x, int n, int k) {
    k = std::min(k, n);
    auto better = [x](int a, int b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
    std::vector<int> heap;  // a min-heap (under `better`) of the k best so far
    heap.reserve(k + 1);
    for (int i = 0; i < n; ++i) {
        if (static_cast<int>(heap.size()) < k) {
            heap.push_back(i);
            std::push_heap(heap.begin(), heap.end(), better);
        } else if (k > 0 && better(i, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), better);
            heap.back() = i;
            std::push_heap(heap.begin(), heap.end(), better);
        }
    }
    std::sort(heap.begin(), heap.end(), better);
    return heap;
}

float top_k_overlap(const float* a, const float* b, int n, int k) {
    auto ta = top_k(a, n, k), tb = top_k(b, n, k);
    if (ta.empty()) return 0;
    std::sort(ta.begin(), ta.end());
    std::sort(tb.begin(), tb.end());
    std::vector<int> both;
    std::set_intersection(ta.begin(), ta.end(), tb.begin(), tb.end(), std::back_inserter(both));
    return static_cast<float>(both.size()) / static_cast<float>(ta.size());
}

}  // namespace blendin
