"""BlendIn written the way a user would write it without blendin_cpp: two `llama_cpp.Llama` objects
evaluated one token at a time, the gate, alpha and the mixture in numpy (docs/design.md section 3).

This is the in-process peer of the benchmark (bench/run.py). It is the naive loop: both models
decode every token, and the guide's logits are read only where the gate opens.

A guide with another tokenizer reads the text the base wrote through its own tokenizer (the
whole text re-tokenised at every step, the guide's cache kept up to the first token that changed)
and its distribution is carried onto the base's vocabulary by token bytes, as docs/methods.md, "Models with
different tokenizers", describes blendin_cpp's vocabulary bridge.
"""
from __future__ import annotations

import ctypes
from typing import Sequence

import llama_cpp
import numpy as np

from blendin_cpp import llama_cpp_peer

GGML_TYPE_F16 = 1


def load(path: str, *, n_ctx: int, n_threads: int) -> llama_cpp.Llama:
    """A llama-cpp-python model with the settings every peer of the benchmark shares."""
    return llama_cpp_peer.load(path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                               type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16, flash_attn=True, verbose=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _piece(vocab, token: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:  # a longer piece: -n bytes
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def vocab_map(base: llama_cpp.Llama, guide: llama_cpp.Llama) -> np.ndarray:
    """For each guide token, the base token that receives its probability (-1: none): the base
    token with the same bytes, else the longest base token its bytes begin with; end tokens go to
    the base's end token, other control tokens to the base control token of the same text."""
    bv, gv = (llama_cpp.llama_model_get_vocab(m.model) for m in (base, guide))
    by_bytes: dict[bytes, int] = {}
    by_special: dict[bytes, int] = {}
    for t in range(base.n_vocab()):
        if llama_cpp.llama_vocab_is_control(bv, t):
            by_special.setdefault(_piece(bv, t, True), t)
        else:
            b = _piece(bv, t, False)
            if b:
                by_bytes.setdefault(b, t)  # the lowest id wins among duplicates
    longest = max(map(len, by_bytes))
    eos = llama_cpp.llama_vocab_eos(bv)
    base_end = eos if eos >= 0 else llama_cpp.llama_vocab_eot(bv)
    out = np.full(guide.n_vocab(), -1, dtype=np.int64)
    for g in range(guide.n_vocab()):
        if llama_cpp.llama_vocab_is_eog(gv, g):
            out[g] = base_end
        elif llama_cpp.llama_vocab_is_control(gv, g):
            out[g] = by_special.get(_piece(gv, g, True), -1)
        else:
            b = _piece(gv, g, False)
            out[g] = next((by_bytes[b[:n]] for n in range(min(len(b), longest), 0, -1) if b[:n] in by_bytes), -1)
    return out


def complete_utf8(text: bytes) -> bytes:
    """`text` without a UTF-8 character cut off at its end (a tokenizer cannot read half a character)."""
    for back in range(1, min(4, len(text)) + 1):
        c = text[-back]
        if c & 0xC0 == 0x80:
            continue
        need = 1 if c < 0x80 else 2 if c >> 5 == 6 else 3 if c >> 4 == 14 else 4 if c >> 3 == 30 else 1
        return text[:-back] if back < need else text
    return text


class PythonBlendIn:
    """Greedy BlendIn over two llama-cpp-python models; `bridge` (from vocab_map) for a guide
    with another tokenizer."""

    def __init__(self, base: llama_cpp.Llama, guide: llama_cpp.Llama, *, gamma: float = 0.4,
                 alpha: float | str = "auto", eog: Sequence[int] = (), bridge: np.ndarray | None = None):
        self.base, self.guide = base, guide
        self.gamma, self.alpha = gamma, alpha
        self.eog = set(eog)
        self.bridge = bridge
        self._base_vocab = llama_cpp.llama_model_get_vocab(base.model)
        self.interventions = 0
        self.decode_calls = {"base": 0, "guide": 0}

    def _probs(self, model: llama_cpp.Llama) -> np.ndarray:
        # the last decoded row, read straight from the context (logits_all=False keeps no copy)
        row = llama_cpp.llama_get_logits_ith(model.ctx, -1)
        return softmax(np.ctypeslib.as_array(row, shape=(model.n_vocab(),)).astype(np.float64))

    def _eval(self, role: str, tokens: list[int]) -> None:
        getattr(self, role).eval(tokens)
        self.decode_calls[role] += 1

    def _guide_reads(self, target: list[int]) -> None:
        """Bring the guide to exactly `target`, keeping its cache up to the first difference."""
        have = list(self.guide.input_ids[:self.guide.n_tokens])
        common = 0
        while common < min(len(have), len(target)) and have[common] == target[common]:
            common += 1
        if common == len(target) == len(have):
            return  # its last logits are still current
        common = min(common, len(target) - 1)  # re-read the last token for its logits
        self.guide.n_tokens = common  # eval drops the cache from here on
        self._eval("guide", target[common:])

    def _guide_probs(self, pb: np.ndarray) -> np.ndarray:
        pg = self._probs(self.guide)
        if self.bridge is None:
            return pg
        mapped = np.zeros_like(pb)
        keep = self.bridge >= 0
        np.add.at(mapped, self.bridge[keep], pg[keep])
        return mapped / mapped.sum()

    def generate(self, base_tokens: list[int], guide_tokens: list[int], max_tokens: int) -> list[int]:
        """Greedy tokens from empty caches, stopping at an end-of-generation token or max_tokens."""
        self.base.reset()
        self.guide.reset()
        self._eval("base", base_tokens)
        self._eval("guide", guide_tokens)
        out: list[int] = []
        text = b""  # what the base wrote, which a guide with another tokenizer re-reads
        while True:
            pb = self._probs(self.base)
            pb_max = pb.max()
            readable = True
            if self.bridge is not None:
                seen = complete_utf8(text)
                readable = seen == text
                self._guide_reads(guide_tokens + self.guide.tokenize(seen, add_bos=False, special=False))
            if pb_max < self.gamma and readable:  # BlendIn's gate: the base is unsure
                pg = self._guide_probs(pb)
                alpha = self.alpha
                if alpha == "auto":  # BlendIn's adaptive reliability weight
                    pg_max = pg.max()
                    alpha = min(max(pg_max / (pb_max + pg_max) + 0.1 * pb[pg.argmax()], 0.0), 1.0)
                p = (1.0 - alpha) * pb + alpha * pg
                self.interventions += 1
            else:
                p = pb
            token = int(p.argmax())
            out.append(token)
            if token in self.eog or len(out) == max_tokens:
                return out
            self._eval("base", [token])
            if self.bridge is None:
                self._eval("guide", [token])
            else:
                text += _piece(self._base_vocab, token, False)
