"""Byte-level text helpers, as the core's (cpp/text.cpp)."""
from __future__ import annotations

import re


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


def check_text(name: str, text: str) -> str:
    """`text` if it can be written as UTF-8, else a ValueError naming it (a lone surrogate, such
    as JSON's "\\ud800" gives, cannot be)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid text: it holds a lone surrogate (U+{ord(text[e.start]):04X}) "
                         f"at index {e.start}") from None
    return text


def literal_pattern(words) -> re.Pattern | None:
    """A regular expression that matches any of `words`, the longest where several begin at the
    same place, built as a trie so that matching costs no more per position with 6,000 words
    than with 6 (a vocabulary's control tokens); None for no words."""
    trie: dict = {}
    for w in words:
        if w:
            node = trie
            for ch in w:
                node = node.setdefault(ch, {})
            node[""] = {}
    if not trie:
        return None

    def expr(node: dict) -> str:
        branches = [re.escape(ch) + expr(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(expr(trie))
