"""Best-of-N: N candidates as parallel sequences in one context per model, against N sequential
generations with the same seeds (same outputs). Prints the median times and their ratio.

    python bench/bon_batch.py [--n 8] [--tokens 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import blendin_cpp as bc
from blendin_cpp import best_of_n as bon
from blendin_cpp.testing import make_tokenizer, random_llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="bon-bench-"))
    tok = make_tokenizer(args.vocab, seed=1)
    # shapes of docs/design.md section 6: base 512 x 4, guide 256 x 2, f16
    base = random_llama(d / "base.gguf", n_vocab=args.vocab, n_embd=512, n_layer=4, n_head=8, dtype="f16",
                        seed=1, tokenizer=tok, logit_std=6)
    guide = random_llama(d / "guide.gguf", n_vocab=args.vocab, n_embd=256, n_layer=2, n_head=4, dtype="f16",
                         seed=2, tokenizer=tok)
    kw = dict(n_ctx=args.n * args.tokens + 256, n_seq_max=args.n, n_threads=args.threads)
    blender = bc.Blender(bc.Model(base, **kw), bc.Model(guide, **kw), method="blendin")
    prompt = "The capital of France is"
    gen = dict(max_tokens=args.tokens, temperature=1.0)

    batched, sequential = [], []
    for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
        t0 = time.perf_counter()
        cands = bon.generate_candidates(blender, prompt, args.n, seed=0, **gen)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        singles = [blender.complete(prompt, seed=i, **gen) for i in range(args.n)]
        sequential.append(time.perf_counter() - t0)
    same = sum(c.text == s.text for c, s in zip(cands, singles))
    # batched and single decodes differ in the last bits of the logits; a sampled token that
    # sits on such an edge sends the two runs apart from there on
    shared = []
    for c, s in zip(cands, singles):
        a, b = c.tokens, s.tokens
        shared.append(next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b))))
    tokens = sum(len(c.tokens) for c in cands)
    b, s = statistics.median(batched), statistics.median(sequential)
    print(f"best-of-{args.n}, {args.tokens} tokens each, vocab {args.vocab}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"  batched (parallel sequences): {b * 1000:8.1f} ms  ({tokens / b:7.1f} tok/s)")
    print(f"  sequential generations:       {s * 1000:8.1f} ms  ({tokens / s:7.1f} tok/s)")
    print(f"  ratio sequential / batched:   {s / b:8.2f}x")
    print(f"  identical candidates: {same}/{args.n}; tokens before the runs part: {shared}")


if __name__ == "__main__":
    main()
