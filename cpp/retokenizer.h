// A growing text read through one model's tokenizer, kept up to date by re-tokenizing only its
// unsettled tail. A guide with its own vocabulary reads the generated text this way at every
// consulted step; tokenizing the whole text each time made that O(length) per step.
//
// Why the tail is enough: a byte-level BPE tokenizer splits text into pre-tokenizer chunks and
// merges within each chunk, and a chunk boundary depends only on the text around it. A token that
// begins with whitespace starts a chunk; such a boundary two or more tokens before the end of the
// text stays where it is when text is appended, and so do all tokens before it (after a non-space:
// inside a run of whitespace the split can move). Where that cannot
// be relied on (other tokenizer kinds, text whose pieces do not spell it back, a boundary that
// moved) the whole text is tokenized again, so the result is always the full tokenization's.
#pragma once

#include <string>
#include <vector>

#include "model.h"

namespace blendin {

class Retokenizer {
public:
    explicit Retokenizer(const Model& model);
    void reset();
    // The model's tokens for text[0, len) (no special tokens added or parsed). Between calls the
    // text only grows (reset() for a new one).
    const std::vector<Token>& tokens(const std::string& text, size_t len);
    // At most how many tokens text[0, len) can have, without tokenizing: for checking the context
    // cheaply.
    size_t bound(size_t len) const;
    // Whether `text` (what tokens() last read the start of) with `piece` appended reads as at most
    // `limit` tokens: the cheap bound first, the exact count only near the limit.
    bool fits(const std::string& text, std::string_view piece, size_t limit);
    long full_passes() const { return full_; }
    long tail_passes() const { return tail_; }

private:
    void full(const std::string& text, size_t len);
    size_t settled() const;  // how many leading tokens stay when text is appended (0: none for sure)
    bool spells(size_t from, size_t len, const std::string& text);  // ends_ from tokens_[from:], checked

    const Model& model_;
    const bool bpe_;
    bool exact_ = true;          // the pieces of tokens_ spell text_ (offsets can be trusted)
    std::string text_;           // what tokens_ are the tokens of
    std::vector<Token> tokens_;
    std::vector<size_t> ends_;   // byte offset in text_ where each token ends
    long full_ = 0, tail_ = 0;
};

}  // namespace blendin
