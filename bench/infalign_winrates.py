"""InfAlign on the demo pair: win rates against base samples under a reward, with 95% intervals.

For each dev question (never the held-out ones), each policy answers `--samples` times and each
answer is compared with a fresh sample of the base alone (temperature 1, the reference policy)
under the reward: 1 win, 0.5 tie, 0 loss. Policies: plain sampling of the base (sanity: ~0.5),
blendin sampling, best-of-N of base samples with the raw reward and with the calibrated,
exp-transformed reward (theory: N/(N+1) for a continuous reward; a strictly increasing transform
selects the same candidate), one of N drawn with weights exp(transformed / beta), worst-of-N
(theory: 1/(N+1)), and best-of-N of blendin samples.

    python bench/infalign_winrates.py [--questions 20] [--samples 4] [--n 8] [--calibrate 16]
"""
from __future__ import annotations

import argparse
import json
import time

import blendin_cpp as bc
from blendin_cpp import best_of_n as bon
from blendin_cpp import demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--calibrate", type=int, default=16)
    ap.add_argument("--t", type=float, default=4.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()

    kw = dict(n_ctx=4096, n_seq_max=args.n, n_threads=args.threads)
    blender = bc.Blender(bc.Model(demo.demo_path("base"), **kw), bc.Model(demo.demo_path("guide"), **kw))
    reward = bon.implicit_reward(blender, normalize=True)
    dev = [json.loads(l) for l in open(demo.demo_dir() / "dev.jsonl", encoding="utf-8") if l.strip()]
    questions = [q["question"] for q in dev[: args.questions]]
    cache = bon.ReferenceCache()
    gen = dict(max_tokens=args.max_tokens, temperature=1.0)

    def sampled(method):
        return lambda m, seed: reward(m, bon.generate_candidates(blender, m, args.samples, seed=seed, method=method,
                                                                 **gen))

    def best(calibrate_k, transform, selection, method="base"):
        def run(m, seed):
            out = []
            for s in range(args.samples):
                r = bon.best_of_n(blender, m, n=args.n, reward=reward, calibrate_k=calibrate_k,
                                  transform_kind=transform, t=args.t, selection=selection, seed=seed + 100 * s,
                                  cache=cache, method=method, **gen)
                out.append(r.candidates[r.chosen].raw)
            return out
        return run

    policies = {
        "base sampling (sanity)": sampled("base"),
        "blendin sampling": sampled("blendin"),
        f"best-of-{args.n} (base), raw reward": best(0, "none", "best"),
        f"best-of-{args.n} (base), calibrated + exp(t C)": best(args.calibrate, "exp", "best"),
        f"one of {args.n} (base) ~ exp(exp(t C) / beta)": best(args.calibrate, "exp", "sample"),
        f"worst-of-{args.n} (base), calibrated + -exp(-t C)": best(args.calibrate, "neg_exp", "worst"),
        f"best-of-{args.n} (blendin), raw reward": best(0, "none", "best", method="blendin"),
    }
    rows = {}
    t0 = time.perf_counter()
    for name, policy in policies.items():
        wins = []
        for i, q in enumerate(questions):
            m = [{"role": "user", "content": q}]
            seed = 1000 * i
            ref = reward(m, bon.generate_candidates(blender, m, args.samples, seed=seed + 50_000, method="base", **gen))
            wins += [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy(m, seed), ref)]
        rows[name] = bon.win_rate(wins)
        w, lo, hi = rows[name]
        print(f"{name:<50} win rate {w:6.1%}  [{lo:6.1%}, {hi:6.1%}]  ({len(wins)} comparisons)", flush=True)
    print(f"reward: implicit (guide minus base log-likelihood per token); {len(questions)} dev questions, "
          f"{args.samples} comparisons each; {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {"win_rate": v[0], "ci95": [v[1], v[2]]} for k, v in rows.items()}, f, indent=1)


if __name__ == "__main__":
    main()
