"""Two builds of blendin_cpp on the same batched work: this checkout's installed package against
another (a `pip install --target DIR` of another commit), to see what a change to the core costs.

Each round runs, in a fresh process per build (the builds alternating, the first build of a round
alternating too), `Blender.complete_many` on --parallel chat requests of a real pair (blendin,
greedy, --max-tokens each with ignore_eos, so the work is fixed), or with --alone the same
requests one after another through `Blender.complete` (the single generation's loop); the table
gives each build's median tokens/s and the median of the per-round ratios. One llama.cpp job runs
at a time.

    git worktree add /tmp/old COMMIT && pip install --no-build-isolation --no-deps --target /tmp/old-site /tmp/old
    python bench/builds.py --other /tmp/old-site [--pair real] [--parallel 8 | --alone] [--rounds 6]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

QUESTIONS = ["Give me three tips for learning a new language.", "Explain why the sky is blue.",
             "Write a short poem about the sea.", "How do I make tea?", "What is a prime number?",
             "Describe a cat.", "List four fruits.", "Why do we sleep?"]

# the work, run in a child process so that each build is imported fresh
CHILD = """
import json, sys, time
import blendin_cpp as bc
from blendin_cpp.real_models import pair_paths
pair, n, max_tokens, questions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
kw = dict(n_ctx=512 * max(n, 1), n_seq_max=max(n, 1), n_threads=2)
base, guide = (bc.Model(p, **kw) for p in pair_paths(pair))
blender = bc.Blender(base, guide, method="blendin")
prompts = [[{"role": "user", "content": q}] for q in questions * 2]
t = time.perf_counter()
if n == 0:  # --alone
    out = [blender.complete(p, max_tokens=max_tokens, ignore_eos=True) for p in prompts]
else:
    out = blender.complete_many(prompts, parallel=n, max_tokens=max_tokens, ignore_eos=True)
print(json.dumps({"tokens": sum(len(o.tokens) for o in out), "seconds": time.perf_counter() - t}))
"""


def run(site: str | None, args) -> float:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    n = 0 if args.alone else args.parallel
    r = subprocess.run([sys.executable, "-c", CHILD, args.pair, str(n), str(args.max_tokens), json.dumps(QUESTIONS)],
                       env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"the {'other' if site else 'installed'} build failed:\n{r.stderr[-2000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return d["tokens"] / d["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", required=True, help="a directory holding another build (pip install --target)")
    ap.add_argument("--pair", default="real")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--alone", action="store_true", help="one request after another through Blender.complete")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.other, "blendin_cpp")):
        sys.exit(f"{args.other} holds no blendin_cpp package")
    here, other, ratios = [], [], []
    for k in range(args.rounds):
        order = [None, args.other] if k % 2 == 0 else [args.other, None]
        got = {site: run(site, args) for site in order}
        here.append(got[None])
        other.append(got[args.other])
        ratios.append(got[None] / got[args.other])
        print(f"round {k + 1}: installed {got[None]:.1f} tok/s, other {got[args.other]:.1f} tok/s", flush=True)
    how = "one at a time (complete)" if args.alone else f"{args.parallel} at once"
    print(f"pair {args.pair}, {how}, {args.max_tokens} tokens each: installed "
          f"{statistics.median(here):.1f} tok/s, other {statistics.median(other):.1f} tok/s, "
          f"installed / other {statistics.median(ratios):.3f} (median of {args.rounds} rounds; "
          f"per round {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
