"""Small generated GGUF models for tests, benchmarks and experiments (no downloads needed).

`random_llama(path, ...)` writes a random-weight llama model with a real byte-level BPE
tokenizer (merges learned from a built-in English corpus, then extended with valid synthetic
merges up to the requested vocabulary size) and a chat template. Random weights exercise the
mechanics only; they say nothing about alignment quality.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from .gguf_export import TOKEN_CONTROL, TOKEN_NORMAL, LlamaShape, Tokenizer, tensor_shapes, write_llama

SPECIAL_TOKENS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# The chat template every generated and demo guide carries (rendered with jinja2, as
# llama-cpp-python renders `tokenizer.chat_template`).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Pre-tokenizer close to llama.cpp's "default" one: words keep their leading space, digit runs
# are split off on their own (" 42" -> " " + "42").
PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+|\d+| ?[^\s\w]+|\s+(?!\S)|\s+")

_CORPUS = """The quick brown fox jumps over the lazy dog. A small model answers questions about
countries, their capitals and colours. Question: What is the capital of France? Answer: The
capital of France is Paris. Numbers like 12, 345 and 6789 are split into digits. Hello world!
Once upon a time there was a little robot who liked to read books about the sea and the stars.
She said: "it's a nice day, isn't it?" and they went to the market to buy apples, bread and tea.
Mathematics: 2 + 2 = 4, 10 - 3 = 7. The weather today is sunny with a light breeze from the west.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (space -> 'Ġ', newline -> 'Ċ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def train_bpe(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Learn up to `n_merges` BPE merges over byte symbols (greedy most-frequent pair)."""
    b2u = bytes_to_unicode()
    words = Counter()
    for t in texts:
        for w in PRETOKENIZE.findall(t):
            words[tuple(b2u[b] for b in w.encode("utf-8"))] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merges.append((a, b))
        merged = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


def make_tokenizer(n_vocab: int, *, texts: list[str] | None = None, seed: int = 0) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly `n_vocab` tokens: 256 byte symbols, merges learned
    from `texts` (default: a small built-in corpus), synthetic valid merges to fill the rest,
    and the special tokens of SPECIAL_TOKENS at the end."""
    n_base = 256 + len(SPECIAL_TOKENS)
    if n_vocab < n_base:
        raise ValueError(f"n_vocab must be at least {n_base}, got {n_vocab}")
    byte_syms = list(bytes_to_unicode().values())
    vocab = list(byte_syms)
    known = set(vocab)
    merges: list[str] = []
    n_learned = n_vocab - n_base
    for a, b in train_bpe(texts or [_CORPUS], min(n_learned, 400)):
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        known.add(a + b)
    # Fill with synthetic merges: each joins two existing tokens into a new, unique one, so
    # every merge result is in the vocabulary (llama.cpp requires that).
    rng = np.random.default_rng(seed)
    letters = [c for c in byte_syms if c.isalpha() and c.isascii()] + ["Ġ"]
    while len(vocab) < n_vocab - len(SPECIAL_TOKENS):
        a = vocab[int(rng.integers(len(vocab)))] if rng.random() < 0.5 else letters[int(rng.integers(len(letters)))]
        b = letters[int(rng.integers(len(letters)))]
        if a + b in known or len(a) > 12 or " " in a:
            continue
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        known.add(a + b)
    tokens = vocab + SPECIAL_TOKENS
    types = [TOKEN_NORMAL] * len(vocab) + [TOKEN_CONTROL] * len(SPECIAL_TOKENS)
    special = {t: tokens.index(t) for t in SPECIAL_TOKENS}
    return Tokenizer(tokens=tokens, types=types, merges=merges, bos=special["<s>"],
                     eos=special["</s>"], eot=special["<|end|>"], special=special)


def random_llama(path: str | Path, *, n_vocab: int = 1024, n_embd: int = 64, n_layer: int = 2,
                 n_head: int = 4, n_head_kv: int | None = None, n_ff: int | None = None,
                 n_ctx: int = 512, seed: int = 0, dtype: str = "f32", tied_output: bool = False,
                 logit_std: float = 3.0, tokenizer: Tokenizer | None = None,
                 chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Write a random-weight llama GGUF. `logit_std` sets the spread of the output logits (a
    larger value gives more confident next-token distributions). Passing the same `tokenizer`
    to two calls gives two models that share a vocabulary."""
    shape = LlamaShape(n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                       n_head_kv=n_head_kv or n_head, n_ff=n_ff or 2 * n_embd, n_ctx=n_ctx)
    if n_embd % n_head or shape.n_head % shape.n_head_kv:
        raise ValueError("n_embd must be divisible by n_head, and n_head by n_head_kv")
    tok = tokenizer or make_tokenizer(n_vocab, seed=seed)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shp in tensor_shapes(shape, tied_output).items():
        if len(shp) == 1:  # norms: around 1 so activations keep their scale
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float32)
        elif name in ("output.weight",) or (tied_output and name == "token_embd.weight"):
            tensors[name] = (logit_std / np.sqrt(n_embd) * rng.standard_normal(shp)).astype(np.float32)
        elif name == "token_embd.weight":
            tensors[name] = rng.standard_normal(shp).astype(np.float32)
        else:
            tensors[name] = (rng.standard_normal(shp) / np.sqrt(shp[1])).astype(np.float32)
    return write_llama(path, shape, tensors, tok, name=f"random-llama-{n_embd}x{n_layer}-v{n_vocab}",
                       chat_template=chat_template, dtype=dtype,
                       metadata={"blendin.generator": "blendin_cpp.testing.random_llama",
                                 "blendin.seed": seed})


def read_llama(path: str | Path) -> tuple[LlamaShape, dict[str, np.ndarray], Tokenizer]:
    """The shape, f32 tensors ((out, in) order) and tokenizer of a llama GGUF such as
    `random_llama` writes, so that variants of it can be written with `write_llama`."""
    from .alignment_vectors import GGUF
    g = GGUF(path)
    get = lambda key: g.get(f"llama.{key}")  # noqa: E731
    tokens = g.get("tokenizer.ggml.tokens")
    shape = LlamaShape(n_vocab=len(tokens), n_embd=get("embedding_length"), n_layer=get("block_count"),
                       n_head=get("attention.head_count"), n_head_kv=get("attention.head_count_kv"),
                       n_ff=get("feed_forward_length"), n_ctx=get("context_length"),
                       rms_eps=get("attention.layer_norm_rms_epsilon"), rope_base=get("rope.freq_base"))
    types = g.get("tokenizer.ggml.token_type")
    tok = Tokenizer(tokens=tokens, types=types, merges=g.get("tokenizer.ggml.merges"),
                    bos=g.get("tokenizer.ggml.bos_token_id"), eos=g.get("tokenizer.ggml.eos_token_id"),
                    eot=g.get("tokenizer.ggml.eot_token_id"), add_bos=bool(g.get("tokenizer.ggml.add_bos_token", True)),
                    special={t: i for i, t in enumerate(tokens) if types[i] == TOKEN_CONTROL})
    return shape, {name: g.array(name) for name in g.tensors}, tok


def perturbed_llama(path: str | Path, base: str | Path, *, scale: float = 0.05, rank: int | None = None,
                    norms: bool = True, seed: int = 0, dtype: str = "f32") -> Path:
    """Write `base` with perturbed weights, a stand-in for a fine-tune of it: every matrix W gets
    `scale` * ||W||-relative noise (of rank `rank`, or full rank), norms too when `norms`."""
    shape, tensors, tok = read_llama(base)
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in tensors.items():
        if w.ndim == 1:
            d = rng.standard_normal(w.shape) if norms else np.zeros_like(w)
        elif rank is None:
            d = rng.standard_normal(w.shape)
        else:
            d = rng.standard_normal((w.shape[0], rank)) @ rng.standard_normal((rank, w.shape[1]))
        out[name] = (w + scale * np.linalg.norm(w) / max(np.linalg.norm(d), 1e-30) * d).astype(np.float32)
    return write_llama(path, shape, out, tok, name=f"perturbed-{Path(base).stem}", dtype=dtype,
                       chat_template=CHAT_TEMPLATE, metadata={"blendin.generator": "blendin_cpp.testing.perturbed_llama"})


# ---- growing texts, for the Retokenizer ----------------------------------------------------------
_WORDS = ["the", "capital", "of", "France", "is", "Paris", "and", "it's", "don't", "1234567", "3.14", "x", "é",
          "naïve", "日本語", "🎉", "(paren)", "a,b", "--", "end.", "well...", "CamelCase", "snake_case", "1/2"]
_SEPARATORS = [" ", " ", " ", "  ", "\n", "\n\n", " \n", "\t", ", ", ". ", "   ", ""]


def growing_text(seed: int, n_words: int = 60) -> str:
    """Words, digits, punctuation, accents, CJK and emoji between runs of spaces, tabs and newlines:
    the places where a pre-tokenizer's chunks can move as text is appended."""
    import random
    rng = random.Random(seed)
    return "".join(rng.choice(_WORDS) + rng.choice(_SEPARATORS) for _ in range(n_words))


def check_retokenizer(model, text: str, seed: int):
    """Feed `text` to a Retokenizer in random slices (as generated pieces arrive) and assert at
    every length that its tokens are the model's full tokenization. Returns the Retokenizer."""
    import random

    from . import _core
    rt = _core.Retokenizer(model._handle)
    data = text.encode()
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        at = min(len(data), at + rng.randint(1, 6))
        try:
            prefix = data[:at].decode()
        except UnicodeDecodeError:
            continue  # the engine never gives the guide half a character
        assert rt.tokens(data[:at]) == model.tokenize(prefix, add_special=False), f"at byte {at} of {text!r}"
    return rt
