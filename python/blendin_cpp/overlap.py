"""`python -m blendin_cpp overlap`: BlendIn's vocabulary analysis of a model pair.

For every step where the guide is consulted (greedy generation, method blendin with gamma 1.01 so
that every step consults it, or the method and gamma you pass), it records the rank of the guide's
top token in the base distribution, whether it lies in the base's top-10/50/100 and top-p 0.9,
the overlap of the two top-10 lists, and the share of guide mass with no exact counterpart in
the base vocabulary; then it prints the aggregates.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .blender import Blender


def analyse(blender: Blender, prompts: list[str], *, max_tokens: int = 48, **settings) -> dict:
    steps = []
    for q in prompts:
        r = blender.complete([{"role": "user", "content": q}], max_tokens=max_tokens, diagnostics=True, **settings)
        steps += [s for s in r.steps if s.guide_rank is not None]
    if not steps:
        raise ValueError("the guide was never consulted: raise gamma")
    rank = np.array([s.guide_rank for s in steps])
    return {
        "prompts": len(prompts),
        "consulted_steps": len(steps),
        "guide_top_rank_median": float(np.median(rank)),
        "in_base_top10": float(np.mean(rank <= 10)),
        "in_base_top50": float(np.mean(rank <= 50)),
        "in_base_top100": float(np.mean(rank <= 100)),
        "in_base_top_p90": float(np.mean([s.mass_above < 0.9 for s in steps])),
        "top10_overlap": float(np.mean([s.overlap for s in steps])),
        "unmatched_guide_mass": float(np.mean([s.unmatched for s in steps])),
        "bridged": blender._engine.bridged,
    }


def read_prompts(path: str, limit: int | None) -> list[str]:
    lines = [l for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    prompts = [json.loads(l)["question"] if l.lstrip().startswith("{") else l for l in lines]
    return prompts[:limit] if limit else prompts


def cmd_overlap(args) -> int:
    from .options import blender_from_args
    blender = blender_from_args(args)
    res = analyse(blender, read_prompts(args.prompts, args.limit), max_tokens=args.max_tokens, method=args.method,
                  gamma=args.gamma)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['consulted_steps']} consulted steps over {res['prompts']} prompts "
          f"({'cross-vocabulary bridge' if res['bridged'] else 'shared vocabulary'})")
    print(f"  rank of the guide's top token in the base distribution: median {res['guide_top_rank_median']:.0f}")
    for k in ("in_base_top10", "in_base_top50", "in_base_top100", "in_base_top_p90"):
        print(f"  {k.replace('in_base_', 'in the base top-').replace('top_p90', 'p 0.9'):<28} {res[k]:6.1%}")
    print(f"  top-10 overlap of the two distributions: {res['top10_overlap']:.2f}")
    print(f"  guide mass with no exact base token:     {res['unmatched_guide_mass']:.1%}")
    return 0


def add_parser(sub) -> None:
    from .options import add_model_args
    p = sub.add_parser("overlap", help="BlendIn's vocabulary-overlap analysis of a model pair",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompts", required=True, help="JSONL with 'question' fields, or one prompt per line")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--method", default="blendin", choices=["blendin", "nudging", "ensemble"])
    p.add_argument("--gamma", type=float, default=1.01, help="default 1.01: consult the guide at every step")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_overlap, naive=False, alpha="auto", beta=1.0, lambda_=0.5, max_intervention_rate=None)
