// Byte-level text helpers for streaming: whole UTF-8 characters, stop strings.
#pragma once

#include <string>
#include <vector>

namespace blendin {

// Move `end` back so that text[..end) does not end inside a UTF-8 character (looking no further
// back than `begin`).
size_t utf8_boundary(const std::string& text, size_t begin, size_t end);

// Length of the longest proper prefix of a stop string that `text` ends with (held back from the
// stream until we know whether the stop string completes), counting from `from`.
size_t stop_prefix_held(const std::string& text, size_t from, const std::vector<std::string>& stops);

}  // namespace blendin
