"""BlendIn written the way a user would write it without blendin_cpp: two `llama_cpp.Llama` objects
evaluated one token at a time, the gate, alpha and the mixture in numpy (DESIGN.md section 3).

This is the in-process peer of the benchmark (bench/run.py). It is the naive loop: both models
decode every token, and the guide's logits are read only where the gate opens.
"""
from __future__ import annotations

from typing import Sequence

import llama_cpp
import numpy as np

GGML_TYPE_F16 = 1


def load(path: str, *, n_ctx: int, n_threads: int) -> llama_cpp.Llama:
    """A llama-cpp-python model with the settings every peer of the benchmark shares."""
    return llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                           type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16, flash_attn=True, verbose=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


class PythonBlendIn:
    """Greedy BlendIn over two llama-cpp-python models."""

    def __init__(self, base: llama_cpp.Llama, guide: llama_cpp.Llama, *, gamma: float = 0.4,
                 alpha: float | str = "auto", eog: Sequence[int] = ()):
        self.base, self.guide = base, guide
        self.gamma, self.alpha = gamma, alpha
        self.eog = set(eog)
        self.interventions = 0
        self.decode_calls = {"base": 0, "guide": 0}

    def _probs(self, model: llama_cpp.Llama) -> np.ndarray:
        # the last decoded row, read straight from the context (logits_all=False keeps no copy)
        row = llama_cpp.llama_get_logits_ith(model.ctx, -1)
        return softmax(np.ctypeslib.as_array(row, shape=(model.n_vocab(),)).astype(np.float64))

    def _eval(self, role: str, tokens: list[int]) -> None:
        getattr(self, role).eval(tokens)
        self.decode_calls[role] += 1

    def generate(self, base_tokens: list[int], guide_tokens: list[int], max_tokens: int) -> list[int]:
        """Greedy tokens from empty caches, stopping at an end-of-generation token or max_tokens."""
        self.base.reset()
        self.guide.reset()
        self._eval("base", base_tokens)
        self._eval("guide", guide_tokens)
        out: list[int] = []
        while True:
            pb = self._probs(self.base)
            pb_max = pb.max()
            if pb_max < self.gamma:  # BlendIn's gate: the base is unsure
                pg = self._probs(self.guide)
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
            self._eval("guide", [token])
