#include "retokenizer.h"

#include <cctype>

#include "text.h"

namespace blendin {

Retokenizer::Retokenizer(const Model& model) : model_(model), bpe_(model.is_bpe()) {}

void Retokenizer::reset() {
    text_.clear();
    tokens_.clear();
    ends_.clear();
    exact_ = true;
}

bool Retokenizer::spells(size_t from, size_t len, const std::string& text) {
    ends_.resize(from);
    size_t at = from ? ends_[from - 1] : 0;
    for (size_t i = from; i < tokens_.size(); ++i) {
        std::string_view piece = model_.text_piece(tokens_[i]);
        if (at + piece.size() > len || text.compare(at, piece.size(), piece) != 0) return false;
        at += piece.size();
        ends_.push_back(at);
    }
    return at == len;
}

void Retokenizer::full(const std::string& text, size_t len) {
    ++full_;
    text_.assign(text, 0, len);
    tokens_ = model_.tokenize(text_, false, false);
    exact_ = bpe_ && spells(0, len, text_);
}

size_t Retokenizer::settled() const {
    if (!exact_ || tokens_.size() < 3) return 0;
    // a word start: whitespace after a non-space (inside a run of whitespace the pre-tokenizer
    // may split anywhere)
    for (size_t k = tokens_.size() - 2; k > 0; --k) {
        std::string_view piece = model_.text_piece(tokens_[k]);
        if (piece.empty() || !std::isspace(static_cast<unsigned char>(piece[0])) || ends_[k - 1] == 0) continue;
        if (!std::isspace(static_cast<unsigned char>(text_[ends_[k - 1] - 1]))) return k;
    }
    return 0;
}

const std::vector<Token>& Retokenizer::tokens(const std::string& text, size_t len) {
    if (len == text_.size() && text.compare(0, len, text_) == 0) return tokens_;
    const bool grows = len > text_.size() && text.compare(0, text_.size(), text_) == 0;
    const size_t k = grows ? settled() : 0;
    if (k == 0) {
        full(text, len);
        return tokens_;
    }
    const size_t from = ends_[k - 1];
    std::vector<Token> tail = model_.tokenize(text.substr(from, len - from), false, false);
    if (tail.empty() || tail[0] != tokens_[k]) {  // the boundary moved: trust nothing
        full(text, len);
        return tokens_;
    }
    tokens_.resize(k);
    tokens_.insert(tokens_.end(), tail.begin(), tail.end());
    text_.assign(text, 0, len);
    if (!spells(k, len, text_)) {
        full(text, len);
        return tokens_;
    }
    ++tail_;
    return tokens_;
}

size_t Retokenizer::bound(size_t len) const {
    // the tokens before the settled boundary stay; every later byte may become up to three tokens
    // (the tokenizer reads an invalid byte as U+FFFD, three bytes)
    const size_t k = settled();
    const size_t from = k ? ends_[k - 1] : 0;
    return k + 3 * (len > from ? len - from : 0);
}

bool Retokenizer::fits(const std::string& text, std::string_view piece, size_t limit) {
    if (bound(text.size() + piece.size()) <= limit) return true;
    std::string grown = text;
    grown += piece;
    return tokens(grown, utf8_boundary(grown, 0, grown.size())).size() <= limit;
}

}  // namespace blendin
