#!/usr/bin/env python3
"""Turning an Alignment Vector's scale at run time against re-merging and reloading.

Generated models (random f32 llama, the "aligned" one a perturbed copy), one prompt. Per repeat:
- switch:  `Model.set_adapter_scales([scale])` on a base loaded once with the LoRA AV, then the
           prompt's logits (what a chat does after `/set av NAME SCALE`);
- remerge: `alignment_vectors.apply` (theta_base + scale * full delta) to a new file, load it,
           then the prompt's logits (what one would do without adapters).
Prints medians and their ratio, plus what serving through the adapter costs per prompt against
the plain merged model (the price of keeping the knob).

Usage: python bench/av_switch.py [--embd 256] [--layers 4] [--vocab 8192] [--rank 8] [--repeats 9] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's SVDs on a busy 2-core machine

import blendin_cpp as bc  # noqa: E402
from blendin_cpp import alignment_vectors as av  # noqa: E402
from blendin_cpp.testing import perturbed_llama, random_llama  # noqa: E402

PROMPT = "The capital of the country is a city by the sea, and the sum of twelve and thirty is forty-two."


def median_time(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (default 1: on a shared 2-core machine 2 threads made timings swing 10x)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base = random_llama(d / "base.gguf", n_vocab=args.vocab, n_embd=args.embd, n_layer=args.layers,
                            n_head=max(1, args.embd // 64), seed=1)
        aligned = perturbed_llama(d / "aligned.gguf", base, norms=False, rank=args.rank, seed=2)
        av.extract(base, aligned, d / "delta.gguf")
        av.extract(base, aligned, d / "lora.gguf", rank=args.rank)
        kw = dict(n_ctx=256, n_threads=args.threads, kv_type="f32")
        scales = [0.25 * (i % 6) for i in range(args.repeats)]

        knob = bc.Model(str(base), adapters=[(str(d / "lora.gguf"), 0.0)], **kw)
        tokens = knob.tokenize(PROMPT)

        def switch(i):
            knob.set_adapter_scales([scales[i]])
            knob.logits(tokens)

        def remerge(i):
            out = av.apply(base, [(d / "delta.gguf", scales[i])], d / "merged.gguf")
            bc.Model(str(out), **kw).logits(tokens)

        merged = bc.Model(str(av.apply(base, [(d / "delta.gguf", 1.0)], d / "merged1.gguf")), **kw)
        t_switch = median_time(switch, args.repeats)
        t_remerge = median_time(remerge, args.repeats)
        t_plain = median_time(lambda i: merged.logits(tokens), args.repeats)
        knob.set_adapter_scales([1.0])
        t_adapter = median_time(lambda i: knob.logits(tokens), args.repeats)

    size = f"{args.embd} x {args.layers} layers, vocab {args.vocab}, f32; LoRA rank {args.rank}; {len(tokens)}-token prompt"
    print(f"Alignment Vector scale switch ({size}; medians of {args.repeats}, {args.threads} threads)")
    print(f"  switch (set_adapter_scales + prompt logits): {t_switch * 1e3:9.2f} ms")
    print(f"  remerge (apply + load + prompt logits):      {t_remerge * 1e3:9.2f} ms")
    print(f"  remerge / switch:                            {t_remerge / t_switch:9.1f}x")
    print(f"  prompt through the adapter / merged model:   {t_adapter / t_plain:9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
