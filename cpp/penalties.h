// Repetition controls: what the answer generated so far does to the next token's logits. Plain
// vectors only (no llama.cpp here). One Penalties object per generated sequence; the Decoder feeds
// it every token it accounts for and applies it to each model's logits before the policy
// (docs/design.md section 3.6 says why there and not on the final distribution).
//
// With c_i the count of token i in the answer so far, and l_i its logit:
//   - OpenAI's penalties:      l_i -= frequency_penalty * c_i + presence_penalty * [c_i > 0]
//   - llama.cpp's repeat_penalty r over the last repeat_last_n tokens (-1: all of them):
//                              l_i = l_i > 0 ? l_i / r : l_i * r
//   - DRY ("don't repeat yourself", as llama.cpp defines it): a token that would extend a sequence
//     already seen in the answer, the repeated part n tokens long with n >= dry_allowed_length,
//     gets l_i -= dry_multiplier * dry_base^(n - dry_allowed_length). Tokens whose text holds a
//     sequence breaker (dry_sequence_breakers) end the matched sequences and are never penalised.
// Only the answer counts, not the prompts: the two models read different prompts, and a request's
// own words are what an answer should be free to use.
#pragma once

#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "params.h"

namespace blendin {

using Token = int;

class Penalties {
public:
    // `pieces(t)`: the text of base token t, read only when DRY is on (to find the breakers).
    template <class Pieces>
    Penalties(const RepeatParams& params, int n_vocab, Pieces pieces) : params_(params) {
        if (params_.dry_multiplier > 0) {
            breaker_.assign(n_vocab, 0);
            for (Token t = 0; t < n_vocab; ++t)
                for (const auto& b : params_.dry_sequence_breakers)
                    if (pieces(t).find(b) != std::string::npos) breaker_[t] = 1;
        }
    }

    // Whether any penalty changes a distribution (the loop gate alone does not).
    bool active() const;
    void push(Token t);  // one more token of the answer
    // Penalise logits in place: only the tokens the answer touches change. `probs`: x holds
    // probabilities (a guide mapped onto the base's vocabulary has no logits there); the formulas
    // then apply to log p, and the caller renormalises.
    void apply(float* x, int n, bool probs = false) const;
    // The loop gate: `t` would complete an n-gram (n = loop_gate) that the answer already holds.
    bool would_loop(Token t) const;

private:
    // DRY: for each token that would extend a repeated sequence, the repeated length.
    std::vector<std::pair<Token, int>> dry_lengths() const;
    bool breaks(Token t) const { return !breaker_.empty() && breaker_[t]; }

    RepeatParams params_;
    std::vector<Token> answer_;
    std::unordered_map<Token, int> counts_;
    std::vector<char> breaker_;
};

}  // namespace blendin
