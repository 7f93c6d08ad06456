#include "policy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "error.h"

namespace blendin {

namespace {
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Logit arithmetic (proxy, DeRa) that left a non-finite value would give a NaN distribution and a
// token outside the vocabulary: the request that asked for it fails, with the reason.
void check_finite(const std::vector<float>& logits, const char* method) {
    bool finite = true;
    for (float x : logits) finite &= std::isfinite(x);
    if (!finite)
        throw ValueError(std::string("the ") + method + " distribution is not finite: its logits overflowed");
}
}  // namespace

const char* source_name(Source s) {
    switch (s) {
        case Source::Base: return "base";
        case Source::Blend: return "blend";
        default: return "guide";
    }
}

Policy::Policy(const PolicyParams& params, int n_vocab, const std::vector<char>* ends)
    : params_(params), n_(n_vocab), ends_(ends), pb_(n_vocab), pg_(n_vocab), out_(n_vocab) {}

bool Policy::gated() const {
    const Method m = params_.method;
    return m == Method::Nudging || m == Method::NudgingWord || m == Method::BlendIn;
}

bool Policy::within_cap(long tokens, long interventions) const {
    // interventions stay within rate * tokens, this one included
    return interventions + 1 <= params_.max_intervention_rate * static_cast<double>(tokens + 1);
}

bool Policy::gate(const float* base_logits, long tokens, long interventions, StepInfo& info, const Penalties* loops,
                  bool sentence_end) {
    info = StepInfo{};
    end_check_ = false;
    info.pg_max = info.agree = info.overlap = info.mass_above = info.unmatched = kNaN;
    lb_ = base_logits;
    lg_ = nullptr;
    if (!base_logits) {  // the guide alone writes this token (guide method, a nudged word)
        info.pb_max = kNaN;
        return true;
    }
    peak_b_ = softmax(base_logits, n_, pb_.data());
    info.pb_max = peak_b_.value;
    if (params_.method == Method::Base) return false;
    if (!gated()) return true;  // guide, ensemble, proxy, dera use the guide at every step
    if (!(peak_b_.value < params_.gamma)) {
        if (loops && loops->would_loop(peak_b_.index)) {
            info.looped = true;
        } else {
            end_check_ = sentence_end && params_.guide_ends && ends_;
            return end_check_;  // an end check is no intervention: the cap does not apply
        }
    }
    if (!within_cap(tokens, interventions)) {
        info.capped = true;
        return false;
    }
    return true;
}

void Policy::read_guide(const float* guide, bool probs) {
    if (!probs) {
        lg_ = guide;
        peak_g_ = softmax(guide, n_, pg_.data());
        return;
    }
    lg_ = nullptr;
    peak_g_ = normalize(guide, n_, pg_.data());
}

const std::vector<float>& Policy::combine(bool consulted, const float* la, StepInfo& info) {
    const Method m = params_.method;
    // guide_ends: a consulted guide whose top token ends the answer ends it (Nudging's rule for
    // endings; BlendIn's published loop lets only the base end)
    const bool guide_ends = consulted && params_.guide_ends && ends_ && gated() && (*ends_)[peak_g_.index];
    if (!consulted || (end_check_ && !guide_ends)) {  // the gate kept the base: p = p_base
        info.source = Source::Base;
        return pb_;
    }
    info.pg_max = peak_g_.value;
    info.intervened = m != Method::Guide;
    if (lb_) {
        const float pg_top = pb_[peak_g_.index];
        info.agree = pg_top;
        if (params_.diagnostics) {
            info.overlap = top_k_overlap(pb_.data(), pg_.data(), n_, kOverlapK);
            int above = 0;
            double mass = 0;
            for (int i = 0; i < n_; ++i)
                if (pb_[i] > pg_top) {
                    ++above;
                    mass += pb_[i];
                }
            info.guide_rank = above + 1;
            info.mass_above = static_cast<float>(std::min(mass, 1.0));  // a float sum can pass 1 by rounding
        }
    }
    if (guide_ends) {
        info.source = Source::Guide;
        info.alpha = 1;
        return pg_;
    }
    switch (m) {
        case Method::Guide:
        case Method::Nudging:
        case Method::NudgingWord:
            info.source = Source::Guide;
            info.alpha = 1;
            return pg_;
        case Method::BlendIn: {
            // BlendIn: p = (1 - alpha) p_b + alpha p_g over the full vocabulary; auto alpha from
            // the two confidences plus an agreement bonus, clipped to [0, 1].
            float a = info.looped ? 1.0f : params_.alpha;
            if (a < 0) a = std::clamp(info.pg_max / (info.pb_max + info.pg_max) + 0.1f * info.agree, 0.0f, 1.0f);
            info.alpha = a;
            info.source = Source::Blend;
            for (int i = 0; i < n_; ++i) out_[i] = (1 - a) * pb_[i] + a * pg_[i];
            return out_;
        }
        case Method::Ensemble:
            info.alpha = 0.5f;
            info.source = Source::Blend;
            for (int i = 0; i < n_; ++i) out_[i] = 0.5f * (pb_[i] + pg_[i]);
            return out_;
        case Method::Proxy: {
            // proxy-tuning: log p = l_b + beta (l_g - l_anti), renormalised
            BLENDIN_CHECK(la != nullptr && lg_ != nullptr);
            for (int i = 0; i < n_; ++i) out_[i] = lb_[i] + params_.beta * (lg_[i] - la[i]);
            check_finite(out_, "proxy");
            softmax(out_.data(), n_, out_.data());  // in place: each entry is read before written
            info.alpha = kNaN;  // not a mixing weight
            info.source = Source::Blend;
            return out_;
        }
        case Method::DeRa: {
            // DeRa-style interpolation (lambda > 1 extrapolates): (1 - lambda) l_b + lambda l_g
            BLENDIN_CHECK(lg_ != nullptr);
            const float l = params_.lambda;
            for (int i = 0; i < n_; ++i) out_[i] = (1 - l) * lb_[i] + l * lg_[i];
            check_finite(out_, "dera");
            softmax(out_.data(), n_, out_.data());
            info.alpha = kNaN;
            info.source = Source::Blend;
            return out_;
        }
        default:
            BLENDIN_CHECK(false);
    }
    return pb_;
}

}  // namespace blendin
