"""Where a sequence's bits part alone and in a batch: the same chats decoded one at a time
(`Blender.complete`) and together (`Blender.complete_many`, --parallel at once), under llama.cpp
settings that each change one path of its CPU arithmetic.

    python bench/batch_invariance.py                      # the real pair, every setting
    python bench/batch_invariance.py --pair qwen --settings default,f16_kv
    python bench/batch_invariance.py --long 0 --json out.json

Settings (each in its own process: ggml reads GGML_CPU_TILED_MM once per process):
- `default`: what blendin_cpp loads (q8_0 KV cache, each sequence in its own cells, flash
  attention, plain weight buffers, llama.cpp's tiled K-quant matmul off);
- `f16_kv`: the KV cache in f16 (llama.cpp's default type): flash attention splits a lone row's
  cells among the threads from 512 cells, and tiles prompts from 64 rows;
- `repack`: llama.cpp's extra weight buffers (CPU_REPACK; `deterministic=False`): one kernel for one row,
  another for several;
- `tiled_mm`: llama.cpp's tiled K-quant matmul on (GGML_CPU_TILED_MM=1): from 8 rows in a batch.

Per setting: how many answers are the same bits alone and batched (tokens, sources and
log-probabilities), the first step where the others part, and the largest log-probability
difference before it. The short chats (--tokens each) stay within 256 KV cells; the --long
answers (ignore_eos) run past 512. Greedy blendin. Nothing is contacted; every loop is bounded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: (model keyword arguments, environment)
    "default": ({}, {}),
    "f16_kv": ({"kv_type": "f16"}, {}),
    "repack": ({"deterministic": False}, {}),
    "tiled_mm": ({}, {"GGML_CPU_TILED_MM": "1"}),
}
LONG_CHATS = ["Write a long story about a dragon who learns to read.", "Explain in detail how a bicycle works."]


def chats(n: int) -> list[str]:
    lines = (ROOT / "models" / "real" / "chat_requests.jsonl").read_text().splitlines()
    return [json.loads(line)["request"] for line in lines[:n]]


def measure(args, model_kw: dict) -> dict:
    """One setting, in this process: {"short": ..., "long": ...} as `compare` gives."""
    import blendin_cpp as bc
    from blendin_cpp import real_models
    base, guide = real_models.pair_paths(args.pair, log=None)
    kw = dict(n_ctx=(args.tokens + args.long + 256) * args.parallel, n_seq_max=args.parallel,
              n_threads=args.threads, **model_kw)
    blender = bc.Blender(bc.Model(base, **kw), bc.Model(guide, **kw), method="blendin")

    def compare(requests: list[str], **gen) -> dict:
        messages = [[{"role": "user", "content": r}] for r in requests]
        alone = [blender.complete(m, **gen) for m in messages]
        batched = blender.complete_many(messages, parallel=min(args.parallel, len(messages)), **gen)
        same, parted, worst = 0, [], 0.0
        for a, b in zip(alone, batched):
            sa = [(s.token, s.source, s.logprob) for s in a.steps]
            sb = [(s.token, s.source, s.logprob) for s in b.steps]
            k = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), None)
            if k is None and len(sa) == len(sb):
                same += 1
                continue
            k = min(len(sa), len(sb)) if k is None else k
            parted.append(k)
            worst = max([worst] + [abs(x[2] - y[2]) for x, y in zip(sa[:k + 1], sb[:k + 1]) if x[0] == y[0]])
        return {"answers": len(requests), "same": same, "parted_at": parted, "max_logprob_diff": worst,
                "tokens": [len(a.steps) for a in alone]}

    out = {"short": compare(chats(args.chats), max_tokens=args.tokens)}
    if args.long:
        out["long"] = compare(LONG_CHATS, max_tokens=args.long, ignore_eos=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="real", choices=["real", "qwen"])
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--chats", type=int, default=8, help="short chats from models/real/chat_requests.jsonl")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per short chat")
    p.add_argument("--long", type=int, default=600, help="tokens of each long answer (0: none)")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one setting, in a child process
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args, SETTINGS[args.worker][0])))
        return 0
    names = args.settings.split(",")
    for n in names:
        if n not in SETTINGS:
            p.error(f"unknown setting {n!r}; choose from {', '.join(SETTINGS)}")
    results = {}
    for name in names:
        env = {**os.environ, **SETTINGS[name][1]}
        child = [sys.executable, __file__, "--worker", name, *(argv if argv is not None else sys.argv[1:])]
        done = subprocess.run(child, capture_output=True, text=True, env=env, timeout=3600)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(done.stdout.splitlines()[-1])
        for part, r in results[name].items():
            parted = sorted(r["parted_at"])
            print(f"{name:<9} {part:<5} same bits {r['same']}/{r['answers']}"
                  + (f", the others part at steps {parted} (max |dlogprob| before: {r['max_logprob_diff']:.3g})"
                     if parted else "") + f"; tokens {r['tokens']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"pair": args.pair, "parallel": args.parallel, "results": results},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
