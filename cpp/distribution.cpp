#include "distribution.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace blendin {

Peak softmax(const float* logits, int n, float* p) {
    Peak peak;
    float mx = logits[0];
    for (int i = 1; i < n; ++i)
        if (logits[i] > mx) { mx = logits[i]; peak.index = i; }
    double sum = 0;
    for (int i = 0; i < n; ++i) {
        p[i] = std::exp(logits[i] - mx);
        sum += p[i];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int i = 0; i < n; ++i) p[i] *= inv;
    peak.value = p[peak.index];
    return peak;
}

Peak normalize(const float* x, int n, float* p) {
    Peak peak;
    double sum = 0;
    for (int i = 0; i < n; ++i) {
        sum += x[i];
        if (x[i] > x[peak.index]) peak.index = i;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int i = 0; i < n; ++i) p[i] = x[i] * inv;
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
