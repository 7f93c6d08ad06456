"""Stand-ins for the real models: the same GGUF header (architecture, hyper-parameters, tokenizer,
chat template, tensor names, shapes and weight types), random weights.

Decoding speed depends on the shapes and the weight types, not on the weights' values, so a
stand-in decodes at its real model's speed; the GPU kit carries only the headers (a few MB instead
of 98 MB to 1.1 GB) and writes the stand-ins on the GPU machine.

    python bench/standins.py header REAL.gguf HEADER          # the header bytes (what the kit carries)
    python bench/standins.py make HEADER SIZE OUT.gguf        # a stand-in of a SIZE-byte model
    python bench/standins.py compare [--models NAME,...]      # real vs stand-in decode speed, side by side

A stand-in keeps every byte of the real file before the tensor data, so tokenization, the chat
template and the vocabulary bridge behave exactly as with the real model. The weights: norms near 1,
biases near 0, matrices with rows of N(0, 1/n_in) (a band of 256 distinct rows, repeated, to keep
writing fast), and the vocabulary matrices (token_embd, output) fully random (no two tokens alike,
so greedy choices have no ties), with the final norm scaled to give logits of standard deviation
about --logit-std (in the norm, not the matrix: a tied embedding is also the input, and a large one
would drown the blocks' output and make the model repeat its last token).
Quantized types are written by llama.cpp's own quantizer (ggml_quantize_chunk of the installed
llama-cpp-python), f32/f16/bf16 directly.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BAND = 256          # distinct rows written for an ordinary matrix, repeated to its full height
CHUNK_ROWS = 4096   # rows of a vocabulary matrix generated and quantized at a time
VOCAB_MATRICES = ("token_embd.weight", "output.weight")
# With a tied embedding the last token's own row is in the hidden state the logits are read from:
# unless the blocks add more than it, a random model repeats its last token forever (and is sure of
# it, so a blend never intervenes). Where blocks end in a norm (Gemma's post_* norms), its weights
# make each block's output this many times the input embedding's scale.
POST_NORM = 4.0


def read_header(path: str | os.PathLike) -> bytes:
    """The bytes of a GGUF file before its tensor data (magic, key/values, tensor infos, padding)."""
    from gguf import GGUFReader
    offset = GGUFReader(str(path)).data_offset
    with open(path, "rb") as f:
        return f.read(offset)


class Quantizer:
    """ggml_quantize_chunk from the libggml-base that llama-cpp-python installed."""

    def __init__(self):
        # blendin_cpp first, as every other entry point imports it: it loads llama_cpp's libllama
        # itself (blendin_cpp/_libllama.py) and runs its extension's set-up before any backend starts
        from blendin_cpp._libllama import libllama_dir
        import llama_cpp
        llama_cpp.llama_backend_init()  # ggml's own set-up (its tables, the CPU's features) before quantizing
        lib = ctypes.CDLL(str(libllama_dir() / "libggml-base.so"))
        self.fn = lib.ggml_quantize_chunk
        self.fn.restype = ctypes.c_size_t
        self.fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                            ctypes.c_int64, ctypes.c_void_p]
        self.init = lib.ggml_quantize_init
        self.init.argtypes = [ctypes.c_int]

    def __call__(self, qtype: int, rows: np.ndarray, row_bytes: int) -> bytes:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        out = np.empty(rows.shape[0] * row_bytes, dtype=np.uint8)
        n = self.fn(qtype, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
        if n != out.size:
            raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes for type {qtype}, expected {out.size}")
        return out.tobytes()


def encode(values: np.ndarray, qtype, row_bytes: int, quantize: Quantizer | None) -> bytes:
    """Rows of float32 values in a GGML type."""
    from gguf import GGMLQuantizationType as T
    if qtype == T.F32:
        return values.astype(np.float32).tobytes()
    if qtype == T.F16:
        return values.astype(np.float16).tobytes()
    if qtype == T.BF16:
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return quantize(int(qtype), values, row_bytes)


def write_standin(header: bytes, size: int, out: str | os.PathLike, *, seed: int = 0, logit_std: float = 6.0,
                  threads: int | None = None) -> Path:
    """Write a stand-in of a `size`-byte model whose header is `header` (see the module's docstring)."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(header)
        f.truncate(size)
    tensors = GGUFReader(str(tmp)).tensors
    quantize = Quantizer() if any(t.tensor_type not in (T.F32, T.F16, T.BF16) for t in tensors) else None
    rng = np.random.default_rng(seed)
    fd = os.open(tmp, os.O_WRONLY)

    def fill(t, seed_t: int) -> None:
        r = np.random.default_rng(seed_t)
        n_per_row = int(t.shape[0])
        n_rows = int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else 1
        row_bytes = int(t.n_bytes) // n_rows
        if len(t.shape) == 1 or n_rows == 1:
            scale, mean = (0.02, 0.0) if t.name.endswith(".bias") else (0.1, 1.0)
            if t.name == "output_norm.weight":  # the logits' spread (the vocabulary rows have norm ~1)
                scale, mean = 0.1 * logit_std, logit_std
            elif ".post_" in t.name:  # norms on a block's output (Gemma): see POST_NORM
                scale, mean = 0.1 * POST_NORM, POST_NORM
            data = encode((mean + scale * r.standard_normal((1, n_per_row))).astype(np.float32), t.tensor_type,
                          row_bytes, quantize)
            os.pwrite(fd, data, int(t.data_offset))
            return
        if t.name in VOCAB_MATRICES:  # every row its own
            std = 1 / np.sqrt(n_per_row)  # an input embedding as large as a block's output (tied or not)
            for start in range(0, n_rows, CHUNK_ROWS):
                k = min(CHUNK_ROWS, n_rows - start)
                rows = r.standard_normal((k, n_per_row), dtype=np.float32) * np.float32(std)
                os.pwrite(fd, encode(rows, t.tensor_type, row_bytes, quantize), int(t.data_offset) + start * row_bytes)
            return
        k = min(BAND, n_rows)
        band = encode(r.standard_normal((k, n_per_row), dtype=np.float32) / np.float32(np.sqrt(n_per_row)),
                      t.tensor_type, row_bytes, quantize)
        data = (band * (n_rows // k + 1))[:n_rows * row_bytes]
        os.pwrite(fd, data, int(t.data_offset))

    try:
        seeds = rng.integers(0, 2**63, size=len(tensors))
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            list(pool.map(fill, tensors, seeds))  # list(): raise the first error
    finally:
        os.close(fd)
    os.replace(tmp, out)
    return out


# ---- compare: real and stand-in, side by side ----------------------------------------------------------
def decode_rate(model, tokens: int) -> float:
    """Tokens/s of the base alone through the engine (greedy, no end token), one generation."""
    import blendin_cpp as bc
    r = bc.Blender(model, None, method="base").complete("Question: Tell me about the sea.\nAnswer:",
                                                        max_tokens=tokens, ignore_eos=True)
    assert r.stats["tokens"] == tokens, r.stats
    return r.stats["tokens_per_s"]


def compare(names: list[str], *, tokens: int, rounds: int, threads: int, n_gpu_layers: int | None, work: Path) -> list[dict]:
    """For each real model (from the cache): its stand-in written to `work`, then both loaded and
    generated with in alternation, `rounds` times; the medians and their ratio."""
    import blendin_cpp as bc
    from blendin_cpp import real_models
    rows = []
    for name in names:
        real = real_models.fetch(name)
        standin = work / f"{name}.gguf"
        if not standin.exists():
            t0 = time.perf_counter()
            write_standin(read_header(real), real.stat().st_size, standin)
            print(f"{name}: stand-in written in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        kw = dict(n_ctx=512, n_threads=threads, n_gpu_layers=n_gpu_layers)
        models = {"real": bc.Model(str(real), **kw), "stand-in": bc.Model(str(standin), **kw)}
        rates = {k: [] for k in models}
        for k, m in models.items():  # warm-up: pages mapped, graphs built
            decode_rate(m, min(tokens, 8))
        for r in range(rounds):
            for k in (list(models) if r % 2 == 0 else list(models)[::-1]):  # alternate who goes first
                rates[k].append(decode_rate(models[k], tokens))
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append(dict(model=name, real_tok_s=med["real"], standin_tok_s=med["stand-in"],
                         ratio=med["stand-in"] / med["real"], rates=rates))
        del models
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    h = sub.add_parser("header", help="write a GGUF file's header bytes")
    h.add_argument("real")
    h.add_argument("out")
    m = sub.add_parser("make", help="write a stand-in from a header")
    m.add_argument("header", help="the header bytes (.xz is decompressed)")
    m.add_argument("size", type=int, help="the real file's size in bytes")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--logit-std", type=float, default=6.0, help="spread of the stand-in's output logits")
    c = sub.add_parser("compare", help="decode speed of each real model and its stand-in, side by side")
    c.add_argument("--models", help="comma-separated real model names (default: all four)")
    c.add_argument("--tokens", type=int, default=128, help="greedy tokens per generation")
    c.add_argument("--rounds", type=int, default=5, help="generations per model (median)")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--n-gpu-layers", type=int, default=None)
    c.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / ".models" / "standins",
                   help="where the stand-ins are written (kept for the next run)")
    args = ap.parse_args(argv)
    if args.command == "header":
        Path(args.out).write_bytes(read_header(args.real))
        return 0
    if args.command == "make":
        import lzma
        raw = Path(args.header).read_bytes()
        header = lzma.decompress(raw) if args.header.endswith(".xz") else raw
        write_standin(header, args.size, args.out, seed=args.seed, logit_std=args.logit_std)
        return 0
    from blendin_cpp import real_models
    names = args.models.split(",") if args.models else list(real_models.MODELS)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = compare(names, tokens=args.tokens, rounds=args.rounds, threads=args.threads,
                   n_gpu_layers=args.n_gpu_layers, work=args.work)
    print(f"{args.tokens} greedy tokens, median of {args.rounds} generations each, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"| {'model':<36} | {'real tok/s':>10} | {'stand-in tok/s':>14} | {'stand-in / real':>15} |")
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 16}|{'-' * 17}|")
    for r in rows:
        print(f"| {r['model']:<36} | {r['real_tok_s']:>10.1f} | {r['standin_tok_s']:>14.1f} | {r['ratio']:>14.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
