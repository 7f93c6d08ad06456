// The parameters of one generation and their valid ranges. The ranges live here only: the core
// validates with them, and the Python side (API, chat, server schema) reads them through the
// bindings instead of repeating them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace blendin {

enum class Method { Base, Guide, Nudging, NudgingWord, BlendIn, Ensemble, Proxy, DeRa };

Method method_from_name(const std::string& name);  // throws ValueError naming the choices
const char* method_name(Method m);
std::vector<std::string> method_names();

struct PolicyParams {
    Method method = Method::BlendIn;
    float gamma = 0.4f;               // intervene iff max p_base < gamma (nudging, blendin)
    float alpha = -1.0f;              // blendin mixing weight in [0, 1]; negative = auto
    float beta = 1.0f;                // proxy: l_b + beta * (l_g - l_anti)
    float lambda = 0.5f;              // dera: (1 - lambda) l_b + lambda l_g
    float max_intervention_rate = 1;  // cap on interventions / tokens (1 = no cap)
    // The guide decides where the answer ends (gated methods): at each sentence or line end it is
    // asked, and wherever it is consulted and its top token ends the answer, the answer ends there.
    bool guide_ends = false;
    bool diagnostics = false;         // also the vocabulary-sized diagnostics (overlap, guide_rank, mass_above)
};

struct SamplingParams {
    float temperature = 0;  // 0 = argmax
    int top_k = 0;          // 0 = off
    float top_p = 1;        // 1 = off
    float min_p = 0;        // 0 = off
    uint64_t seed = 0;
};

// Repetition controls (penalties.h has the formulas). The defaults change nothing.
struct RepeatParams {
    float presence_penalty = 0, frequency_penalty = 0;  // OpenAI's
    float repeat_penalty = 1;                           // llama.cpp's (1 = off)
    int repeat_last_n = 64;                             // its window (-1: the whole answer)
    float dry_multiplier = 0;                           // DRY (0 = off)
    float dry_base = 1.75f;
    int dry_allowed_length = 2;
    std::vector<std::string> dry_sequence_breakers = {"\n", ":", "\"", "*"};
    // The loop-aware gate: where the base's top token would complete an n-gram of this length that
    // the answer already holds, the guide is consulted and trusted (0 = off).
    int loop_gate = 0;
};

// How speculative verification is chosen: never, always, or where it is measured to pay.
enum class Speculative { Off, On, Auto };
// Who writes the drafts: the guide, or n-gram lookup in the context (prompt lookup, free).
enum class Drafter { Guide, NGram };

struct GenParams {
    PolicyParams policy;
    SamplingParams sampling;
    RepeatParams repeat;
    int max_tokens = 256;
    std::vector<std::string> stop;     // stop strings (not included in the text)
    bool lazy = true;                  // false: the naive loop, every model decodes every token
    Speculative speculative = Speculative::Off;
    Drafter drafter = Drafter::Guide;
    int draft_max = 8;                 // longest draft (the length adapts between 1 and this)
    float warn_intervention_rate = 0.5f;
    int top_logprobs = 0;              // alternatives reported per step (0 = none)
    bool ignore_eos = false;           // end-of-generation tokens get probability 0 (as llama.cpp's --ignore-eos)
};

// A numeric parameter's valid interval; the bounds are open or closed as the flags say.
struct Range {
    std::string name;
    double lo, hi;
    bool lo_open, hi_open, integer;
    std::string text() const;  // "in (0, 1]", ">= 0", ...
};
const std::vector<Range>& param_ranges();
const Range& param_range(const std::string& name);

// Throws ValueError naming the parameter when `value` is outside its range (the value as the
// caller gave it: a double, before it is narrowed to the core's float or int).
void check_param(const std::string& name, double value);

// Throws ValueError naming the first parameter out of range.
void validate(const GenParams& p);

}  // namespace blendin
