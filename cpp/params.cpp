#include "params.h"

#include <cmath>
#include <cstdio>
#include <limits>

#include "error.h"

namespace blendin {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
const char* kMethodNames[] = {"base", "guide", "nudging", "nudging_word", "blendin", "ensemble", "proxy", "dera"};
constexpr int kMethods = sizeof kMethodNames / sizeof kMethodNames[0];

// printf's %g (what an ostream prints by default), without iostreams: on a CUDA machine the first
// use of a stream's locale after the CUDA libraries were loaded crashed (the GPU kit's report).
std::string number(double x) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", x);
    return buf;
}
}  // namespace

Method method_from_name(const std::string& name) {
    for (int i = 0; i < kMethods; ++i)
        if (name == kMethodNames[i]) return static_cast<Method>(i);
    std::string all;
    for (auto* n : kMethodNames) all += (all.empty() ? "" : ", ") + std::string(n);
    throw ValueError("unknown method '" + name + "'; choose one of: " + all);
}

const char* method_name(Method m) { return kMethodNames[static_cast<int>(m)]; }

std::vector<std::string> method_names() { return {kMethodNames, kMethodNames + kMethods}; }

std::string Range::text() const {
    if (lo == -kInf) return "";  // any finite value
    if (hi == kInf) return (lo_open ? "> " : ">= ") + number(lo);
    return std::string("in ") + (lo_open ? "(" : "[") + number(lo) + ", " + number(hi) + (hi_open ? ")" : "]");
}

const std::vector<Range>& param_ranges() {
    static const std::vector<Range> ranges = {
        // every real number is bounded: beyond its range a float overflows (3e38 * a logit is inf)
        {"gamma", 0, 10, false, false, false},
        {"alpha", 0, 1, false, false, false},  // or auto
        {"beta", -100, 100, false, false, false},
        {"lambda", -100, 100, false, false, false},
        {"max_intervention_rate", 0, 1, false, false, false},
        {"temperature", 0, 100, false, false, false},
        {"top_k", 0, kInf, false, true, true},
        {"top_p", 0, 1, true, false, false},
        {"min_p", 0, 1, false, true, false},
        {"seed", 0, kInf, false, true, true},  // and below 2^64
        {"max_tokens", 1, kInf, false, true, true},
        {"top_logprobs", 0, 100, false, false, true},
        {"draft_max", 1, 64, false, false, true},
        {"warn_intervention_rate", 0, 1, false, false, false},
        {"presence_penalty", -2, 2, false, false, false},  // OpenAI's range
        {"frequency_penalty", -2, 2, false, false, false},
        {"repeat_penalty", 0, 10, true, false, false},
        {"repeat_last_n", -1, kInf, false, true, true},
        {"dry_multiplier", 0, 100, false, false, false},
        {"dry_base", 1, 100, false, false, false},
        {"dry_allowed_length", 0, kInf, false, true, true},
        {"loop_gate", 0, 64, false, false, true},
    };
    return ranges;
}

const Range& param_range(const std::string& name) {
    for (const auto& r : param_ranges())
        if (r.name == name) return r;
    throw Error("internal error: no range for parameter '" + name + "'");
}

namespace {
void check(const char* name, double v) {
    const Range& r = param_range(name);
    bool ok = std::isfinite(v) && (r.lo_open ? v > r.lo : v >= r.lo) && (r.hi_open ? v < r.hi : v <= r.hi);
    const char* kind = r.integer ? "an integer" : r.lo == -kInf ? "a finite number" : "a number";
    if (!ok) throw ValueError(std::string(name) + " must be " + kind + (r.lo == -kInf ? "" : " ") + r.text() +
                              ", got " + number(v));
}
}  // namespace

void check_param(const std::string& name, double value) { check(name.c_str(), value); }

void validate(const GenParams& p) {
    const PolicyParams& q = p.policy;
    check("gamma", q.gamma);
    if (!(q.alpha < 0)) check("alpha", q.alpha);  // negative: auto
    check("beta", q.beta);
    check("lambda", q.lambda);
    check("max_intervention_rate", q.max_intervention_rate);
    const SamplingParams& s = p.sampling;
    check("temperature", s.temperature);
    check("top_k", s.top_k);
    check("top_p", s.top_p);
    check("min_p", s.min_p);
    check("max_tokens", p.max_tokens);
    check("top_logprobs", p.top_logprobs);
    check("draft_max", p.draft_max);
    check("warn_intervention_rate", p.warn_intervention_rate);
    for (const auto& stop : p.stop)
        if (stop.empty()) throw ValueError("stop strings must not be empty");
    const RepeatParams& r = p.repeat;
    check("presence_penalty", r.presence_penalty);
    check("frequency_penalty", r.frequency_penalty);
    check("repeat_penalty", r.repeat_penalty);
    check("repeat_last_n", r.repeat_last_n);
    check("dry_multiplier", r.dry_multiplier);
    check("dry_base", r.dry_base);
    check("dry_allowed_length", r.dry_allowed_length);
    check("loop_gate", r.loop_gate);
    for (const auto& b : r.dry_sequence_breakers)
        if (b.empty()) throw ValueError("dry_sequence_breakers must not hold an empty string");
}

}  // namespace blendin
