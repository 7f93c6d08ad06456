#include "text.h"

#include <algorithm>

namespace blendin {

size_t utf8_boundary(const std::string& text, size_t begin, size_t end) {
    for (size_t back = 1; back <= 4 && back <= end - begin; ++back) {
        unsigned char c = static_cast<unsigned char>(text[end - back]);
        if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
        size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
        return back < need ? end - back : end;
    }
    return end;
}

size_t stop_prefix_held(const std::string& text, size_t from, const std::vector<std::string>& stops) {
    size_t held = 0;
    for (const auto& s : stops)
        for (size_t len = std::min(s.size() - 1, text.size() - from); len > held; --len)
            if (text.compare(text.size() - len, len, s, 0, len) == 0) {
                held = len;
                break;
            }
    return held;
}

}  // namespace blendin
