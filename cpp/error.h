// Error types of the core. bindings.cpp maps them to Python exceptions:
// FileError -> FileNotFoundError, ValueError -> ValueError, Error -> blendin_cpp.BlendError.
#pragma once

#include <stdexcept>
#include <string>

namespace blendin {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A path that does not exist or cannot be opened.
struct FileError : Error {
    using Error::Error;
};

// A bad argument or a malformed input file: the caller can fix it.
struct ValueError : Error {
    using Error::Error;
};

}  // namespace blendin

// Invariant check that carries file:line, for conditions that mean a bug in the core.
#define BLENDIN_CHECK(cond)                                                                    \
    do {                                                                                       \
        if (!(cond))                                                                           \
            throw ::blendin::Error(std::string("internal error: ") + #cond + " failed at " + \
                                   __FILE__ + ":" + std::to_string(__LINE__));               \
    } while (0)
