"""Weight buffer types on the real models: llama.cpp's CPU repack buffers (`use_extra_bufts` on,
the default load wherever the CPU offers no AMX) against plain CPU buffers (`use_extra_bufts` off,
the default load where AMX is offered, since llama.cpp takes all extra types or none).

Both loads go through blendin_cpp.llama_cpp_peer with the choice forced; each round reads a
prompt in one batch and then decodes tokens one at a time, the two loads alternating, and the
table gives medians and the ratio plain / repack (below 1: repacking is faster).

    python bench/buffer_types.py [--pairs real,qwen] [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

from blendin_cpp import _core, llama_cpp_peer, real_models

PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather, the keeper's daily routine and what the message says. ") * 3


def one_round(ll, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one prompt read and n_gen single-token decodes."""
    ll.reset()
    t0 = time.perf_counter()
    ll.eval(prompt)
    t1 = time.perf_counter()
    token = prompt[-1]
    for _ in range(n_gen):
        ll.eval([token])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_gen / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="real,qwen")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=32, help="tokens decoded one at a time per round")
    args = ap.parse_args()
    names = [n for pair in args.pairs.split(",") for n in (real_models.PAIRS[pair].base, real_models.PAIRS[pair].guide)]
    print(f"CPU extra buffer types offered: {', '.join(_core.cpu_extra_buffer_types()) or 'none'}")
    print(f"medians of {args.rounds} rounds, {args.threads} threads; prompt read in one batch, then {args.gen} "
          "tokens one at a time\n")
    print("| model | load | prompt tok/s | decode tok/s | plain/repack prompt | plain/repack decode |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        path = str(real_models.fetch(name))
        kw = dict(n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, n_batch=512, verbose=False)
        models = {"repack": llama_cpp_peer.load(path, extra_buffer_types=True, **kw),
                  "plain": llama_cpp_peer.load(path, extra_buffer_types=False, **kw)}
        prompt = models["repack"].tokenize(PROMPT.encode(), add_bos=True, special=False)[:200]
        runs = {k: [] for k in models}
        for k, ll in models.items():  # warm-up
            one_round(ll, prompt, 4)
        for _ in range(args.rounds):
            for k, ll in models.items():
                runs[k].append(one_round(ll, prompt, args.gen))
        med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
        for k in ("repack", "plain"):
            ratio = (f"{med['plain'][0] / med['repack'][0]:.2f} | {med['plain'][1] / med['repack'][1]:.2f}"
                     if k == "plain" else " | ")
            print(f"| {name} | {k} | {med[k][0]:.0f} | {med[k][1]:.1f} | {ratio} |", flush=True)
        del models


if __name__ == "__main__":
    main()
