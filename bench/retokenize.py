"""The cost of a guide with another vocabulary reading the growing text, per generated token:
tokenizing the whole text again at every step (what the engine did before its incremental
re-tokenization) against the engine's Retokenizer (only the tail after the last settled word).

The text is a real generation of the pair (BlendIn, greedy, `--tokens` tokens with ignore_eos);
it then grows one base token at a time, as in generation, and at every step both ways read it
(whole UTF-8 characters only). Every step checks that the two give the same tokens. The table
gives the median over `--repeats` of the time per step, by length of the text so far.

    python bench/retokenize.py [--pair real] [--tokens 1500] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import blendin_cpp as bc
from blendin_cpp import _core, real_models
from blendin_cpp.text import utf8_boundary

BUCKETS = (500, 1000, 2000, 4000, 8000)  # upper bounds of the text's length in bytes


def bucket(n: int) -> int:
    return next((b for b in BUCKETS if n <= b), BUCKETS[-1] * 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="real", help="a pair whose guide has another vocabulary (default real)")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default="models/real/bench_prompts.jsonl")
    args = ap.parse_args()

    base_path, guide_path = real_models.pair_paths(args.pair)
    n_ctx = args.tokens + 256
    base = bc.Model(base_path, n_ctx=n_ctx, n_threads=args.threads)
    guide = bc.Model(guide_path, n_ctx=max(n_ctx, 2 * args.tokens), n_threads=args.threads)
    blender = bc.Blender(base, guide, method="blendin")
    if not blender._engine.bridged:
        raise SystemExit(f"the {args.pair} pair shares one vocabulary: its guide reads the base's tokens")
    prompt = json.loads(open(args.prompts).readline())["question"]
    t0 = time.perf_counter()
    tokens = blender.complete(prompt, max_tokens=args.tokens, ignore_eos=True).tokens
    print(f"generated {len(tokens)} tokens in {time.perf_counter() - t0:.1f} s "
          f"({len(tokens) / (time.perf_counter() - t0):.1f} tok/s, BlendIn, both models every token)")

    texts, data = [], b""
    for t in tokens:
        data += base.piece(t)
        texts.append(data[: utf8_boundary(data)])
    full_s = {b: [] for b in (*BUCKETS, BUCKETS[-1] * 2)}
    tail_s = {b: [] for b in full_s}
    for _ in range(args.repeats):
        retok = _core.Retokenizer(guide._handle)
        full = {b: 0.0 for b in full_s}
        tail = {b: 0.0 for b in full_s}
        count = {b: 0 for b in full_s}
        for text in texts:
            as_str = text.decode()
            t0 = time.perf_counter()
            whole = guide._handle.tokenize(as_str, False, False)
            t1 = time.perf_counter()
            incremental = retok.tokens(text)
            t2 = time.perf_counter()
            if list(incremental) != list(whole):
                raise SystemExit(f"the Retokenizer disagrees with a full tokenization at {len(text)} bytes")
            b = bucket(len(text))
            full[b] += t1 - t0
            tail[b] += t2 - t1
            count[b] += 1
        for b in full_s:
            if count[b]:
                full_s[b].append(full[b] / count[b])
                tail_s[b].append(tail[b] / count[b])
    print(f"Retokenizer: {retok.tail_passes} tail passes, {retok.full_passes} full passes in the last repeat\n")
    print("| text so far (bytes) | steps | full tokenization ms/step | Retokenizer ms/step | ratio |")
    print("|---|---:|---:|---:|---:|")
    lower = 0
    for b in full_s:
        if full_s[b]:
            f, r = statistics.median(full_s[b]) * 1e3, statistics.median(tail_s[b]) * 1e3
            steps = sum(1 for t in texts if bucket(len(t)) == b)
            label = f"{lower + 1}-{b}" if b <= BUCKETS[-1] else f"> {BUCKETS[-1]}"
            print(f"| {label} | {steps} | {f:.3f} | {r:.3f} | {f / r:.1f}x |")
        lower = b


if __name__ == "__main__":
    main()
