#include "policy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "error.h"

namespace blendin {

namespace {
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
const char* kMethodNames[] = {"base", "guide", "nudging", "nudging_word", "blendin", "ensemble", "proxy", "dera"};
}  // namespace

Method method_from_name(const std::string& name) {
    for (int i = 0; i < 8; ++i)
        if (name == kMethodNames[i]) return static_cast<Method>(i);
    std::string all;
    for (auto* n : kMethodNames) all += (all.empty() ? "" : ", ") + std::string(n);
    throw ValueError("unknown method '" + name + "'; choose one of: " + all);
}

const char* method_name(Method m) { return kMethodNames[static_cast<int>(m)]; }

const char* source_name(Source s) {
    switch (s) {
        case Source::Base: return "base";
        case Source::Blend: return "blend";
        default: return "guide";
    }
}

Policy::Policy(const PolicyParams& params, int n_vocab) : params_(params), n_(n_vocab) {
    auto bad = [](const std::string& what) { throw ValueError(what); };
    if (!(params.gamma >= 0) || !std::isfinite(params.gamma)) bad("gamma must be a finite number >= 0");
    if (!(params.alpha <= 1) || std::isnan(params.alpha)) bad("alpha must be in [0, 1] (or 'auto')");
    if (!std::isfinite(params.beta)) bad("beta must be finite");
    if (!std::isfinite(params.lambda)) bad("lambda must be finite");
    if (!(params.max_intervention_rate >= 0 && params.max_intervention_rate <= 1))
        bad("max_intervention_rate must be in [0, 1]");
    if (params.overlap_k < 0) bad("overlap_k must be >= 0");
    pb_.resize(n_);
    pg_.resize(n_);
    out_.resize(n_);
}

bool Policy::gate(const float* base_logits, long tokens, long interventions, StepInfo& info) {
    info = StepInfo{};
    info.pg_max = info.agree = info.overlap = info.mass_above = info.unmatched = kNaN;
    lb_ = base_logits;
    if (!base_logits) {  // the guide alone writes this token (guide method, a nudged word)
        info.pb_max = kNaN;
        return true;
    }
    peak_b_ = softmax(base_logits, n_, pb_.data());
    info.pb_max = peak_b_.value;
    switch (params_.method) {
        case Method::Base: return false;
        case Method::Nudging:
        case Method::NudgingWord:
        case Method::BlendIn: {
            if (!(peak_b_.value < params_.gamma)) return false;
            // cap: intervene only while interventions stay within rate * tokens (this one included)
            if (interventions + 1 > params_.max_intervention_rate * static_cast<double>(tokens + 1)) {
                info.capped = true;
                return false;
            }
            return true;
        }
        default: return true;  // guide, ensemble, proxy, dera use the guide at every step
    }
}

const std::vector<float>& Policy::combine(const float* lg, const float* la, StepInfo& info) {
    const Method m = params_.method;
    if (!lg) {  // the gate kept the base: p = p_base
        info.source = Source::Base;
        return pb_;
    }
    Peak peak_g = softmax(lg, n_, pg_.data());
    info.pg_max = peak_g.value;
    info.intervened = m != Method::Guide;
    if (lb_) {
        const float pg_top = pb_[peak_g.index];
        info.agree = pg_top;
        if (params_.overlap_k > 0) info.overlap = top_k_overlap(pb_.data(), pg_.data(), n_, params_.overlap_k);
        int above = 0;
        double mass = 0;
        for (int i = 0; i < n_; ++i)
            if (pb_[i] > pg_top) {
                ++above;
                mass += pb_[i];
            }
        info.guide_rank = above + 1;
        info.mass_above = static_cast<float>(mass);
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
            float a = params_.alpha;
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
            BLENDIN_CHECK(la != nullptr);
            for (int i = 0; i < n_; ++i) out_[i] = lb_[i] + params_.beta * (lg[i] - la[i]);
            softmax(out_.data(), n_, out_.data());  // in place: each entry is read before written
            info.alpha = kNaN;  // not a mixing weight
            info.source = Source::Blend;
            return out_;
        }
        case Method::DeRa: {
            // DeRa-style interpolation (lambda > 1 extrapolates): (1 - lambda) l_b + lambda l_g
            const float l = params_.lambda;
            for (int i = 0; i < n_; ++i) out_[i] = (1 - l) * lb_[i] + l * lg[i];
            softmax(out_.data(), n_, out_.data());
            info.alpha = kNaN;
            info.source = Source::Blend;
            return out_;
        }
        default:
            BLENDIN_CHECK(false);
    }
}

}  // namespace blendin
