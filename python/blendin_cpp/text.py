"""Byte-level text helpers, as the core's (cpp/text.cpp)."""
from __future__ import annotations


def utf8_boundary(data: bytes) -> int:
    """The length of `data` without a UTF-8 character cut off at its end: what the engine
    releases of a generation's bytes, and what a guide with another vocabulary reads of them."""
    for back in range(1, min(4, len(data)) + 1):
        c = data[-back]
        if c & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead
        need = 1 if c < 0x80 else 2 if c >> 5 == 0x6 else 3 if c >> 4 == 0xE else 4 if c >> 3 == 0x1E else 1
        return len(data) - back if back < need else len(data)
    return len(data)
