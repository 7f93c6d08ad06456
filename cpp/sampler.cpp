#include "sampler.h"

#include <algorithm>
#include <cmath>

#include "distribution.h"
#include "error.h"

namespace blendin {

Sampler::Sampler(const SamplingParams& p) : params_(p), rng_(p.seed) {}  // validated with the GenParams

double Sampler::uniform() {
    // 53 random bits: the same stream on every platform for a given seed
    return static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0);
}

const std::vector<float>& Sampler::shape(const float* p, int n) {
    q_.assign(p, p + n);
    const double inv_t = 1.0 / params_.temperature;
    const float top = n > 0 ? *std::max_element(q_.begin(), q_.end()) : 0.0f;
    if (inv_t != 1.0 && top > 0) {
        // p^(1/T) / top^(1/T) in log space: p^(1/T) itself underflows (0.5^1000 is 0 as a float)
        const double log_top = std::log(static_cast<double>(top));
        for (int i = 0; i < n; ++i) {
            const double x = q_[i];
            q_[i] = x > 0 ? static_cast<float>(std::exp((std::log(x) - log_top) * inv_t)) : 0.0f;
        }
    }
    const bool filter = params_.top_k > 0 || params_.top_p < 1;
    if (filter) {
        order_.resize(n);
        for (int i = 0; i < n; ++i) order_[i] = i;
        int keep = params_.top_k > 0 ? std::min(params_.top_k, n) : n;
        auto better = [this](int a, int b) { return q_[a] > q_[b] || (q_[a] == q_[b] && a < b); };
        std::partial_sort(order_.begin(), order_.begin() + keep, order_.end(), better);
        if (params_.top_p < 1) {
            double total = 0, acc = 0;
            for (int i = 0; i < keep; ++i) total += q_[order_[i]];
            int k = 0;
            while (k < keep) {
                acc += q_[order_[k++]];
                if (acc >= params_.top_p * total) break;
            }
            keep = k;
        }
        for (int i = keep; i < n; ++i) q_[order_[i]] = 0;
    }
    if (params_.min_p > 0) {
        float mx = *std::max_element(q_.begin(), q_.end());
        for (auto& x : q_)
            if (x < params_.min_p * mx) x = 0;
    }
    double sum = 0;
    for (float x : q_) sum += x;
    if (!(sum > 0)) throw Error("the sampling distribution is empty (all probabilities are zero)");
    const float inv = static_cast<float>(1.0 / sum);
    for (auto& x : q_) x *= inv;
    return q_;
}

int Sampler::draw(const float* q, int n) {
    double u = uniform(), acc = 0;
    int last = -1;
    for (int i = 0; i < n; ++i) {
        if (!(q[i] > 0)) continue;
        acc += q[i];
        last = i;
        if (u < acc) return i;
    }
    BLENDIN_CHECK(last >= 0);  // a distribution with no mass is the caller's bug
    return last;  // rounding left u just above the total
}

int Sampler::residual(const float* p, const float* q, int draft, int n) {
    leftover_.assign(p, p + n);
    if (q)
        for (int i = 0; i < n; ++i) leftover_[i] = std::max(0.0f, p[i] - q[i]);
    else
        leftover_[draft] = 0;
    double sum = 0;
    for (float x : leftover_) sum += x;
    if (!(sum > 0)) return draw(p, n);
    for (auto& x : leftover_) x = static_cast<float>(x / sum);
    return draw(leftover_.data(), n);
}

int Sampler::pick(const float* p, int n) {
    if (greedy()) return argmax(p, n);  // first among ties
    const auto& q = shape(p, n);
    return draw(q.data(), n);
}

}  // namespace blendin
