// Validation of a GGUF file before llama.cpp sees it. llama.cpp aborts the process on some
// malformed files (and on f16 norm weights, at the first decode), so these cases must be caught
// here and turned into exceptions.
#pragma once

#include <string>

namespace blendin {

struct GgufSummary {
    std::string architecture;
    long long n_tensors = 0;
    long long file_size = 0;
};

// Throws FileError (missing / unreadable) or ValueError (directory, empty, not GGUF, truncated,
// missing required key, tensor data outside the file, unsupported layout).
GgufSummary check_gguf(const std::string& path);

}  // namespace blendin
