// Guide vocabulary -> base vocabulary. Identity when the two models share their tokens;
// otherwise each guide token maps by the bytes it stands for:
//   - a base token with exactly the same bytes: that token (an exact counterpart);
//   - else the longest base token whose bytes begin the guide token's bytes (its mass goes to the
//     base token that starts the same text; the rest of the guide token's text is decided again
//     at the next steps, which is the rule's error);
//   - end-of-generation guide tokens map to the base's end-of-generation token; other control
//     tokens map to the base control token with the same text, or nowhere (mass dropped).
#pragma once

#include <string>
#include <vector>

#include "model.h"

namespace blendin {

class VocabBridge {
public:
    // `role` names the second model in messages ("guide", "anti").
    VocabBridge(const Model& base, const Model& guide, const std::string& role = "guide");

    bool identity() const { return identity_; }
    const std::vector<Token>& map() const { return map_; }  // guide token -> base token, -1: none
    const std::vector<bool>& exact() const { return exact_; }
    // The first difference between the two vocabularies ("" when identical), for messages.
    const std::string& first_difference() const { return first_difference_; }

    // p_guide (guide vocabulary) -> its image on the base vocabulary (mass that maps nowhere is
    // dropped, so the image may sum to less than 1); returns the share of guide mass that had no
    // exact counterpart.
    float map_probs(const float* p_guide, float* p_base, int n_base) const;

private:
    bool identity_ = true;
    std::vector<Token> map_;
    std::vector<bool> exact_;
    std::string first_difference_;
};

}  // namespace blendin
