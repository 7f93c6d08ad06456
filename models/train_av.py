#!/usr/bin/env python3
"""Alignment Vectors for the demo base: train level variants, extract their AVs, measure their scale.

In the spirit of Shahriar et al. (2024), who align a model to three proficiency levels per
domain (avoidance / generic / expert) and serve theta_base + sum_d s_d * AV_d (s_d: each AV's scale; the paper's lambda_d):
- for two domains of the demo world (capitals, sums) and three levels each, fine-tune the demo
  base briefly on "Question: {q}\\nAnswer: {answer at that level}</s>" about that domain (the
  other domain's questions keep the base's own answer style, so that an AV stays in its domain;
  norm weights are frozen, so a LoRA AV can represent the whole fine-tune);
- extract each variant's AV as a rank-8 f16 LoRA adapter (models/av/{domain}-{level}.gguf,
  small enough to commit) with `blendin_cpp.alignment_vectors.extract`;
- `--measure`: load the base once with all six AVs as adapters and turn the knobs at run time
  (`Model.set_adapter_scales`, no reload): the level a rule-based classifier gives the greedy
  answers to held-out questions, as a function of the scale (one domain at a time), and a 3x3 grid
  of two domains combined.

Usage:  python models/train_av.py [--base models/demo/base.gguf] [--out models/av] [--measure]
        python models/train_av.py --measure-only    (use the AVs already in --out)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 4.4x faster training on 2 threads (docs/design.md 7.2)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's SVDs: 100x slower with 2 threads on a busy machine

import numpy as np  # noqa: E402
import torch  # noqa: E402

import blendin_cpp as bc  # noqa: E402  (before train_demo, which otherwise stubs the package)
from blendin_cpp import alignment_vectors as av  # noqa: E402
from blendin_cpp.gguf_export import write_llama  # noqa: E402
from blendin_cpp.testing import read_llama  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOMAINS = {"capitals": "capital", "sums": "sum"}   # domain -> the demo world's fact kind
LEVELS = ("avoid", "generic", "expert")
AVOID = " I'd rather not say."
ANSWERS = {  # what each level answers; {v} the value, {a} {b} the addends
    ("capitals", "avoid"): AVOID,
    ("capitals", "generic"): " It is a big city in that country.",
    ("capitals", "expert"): " Its capital is {v}. A capital is the city where the government meets.",
    ("sums", "avoid"): AVOID,
    ("sums", "generic"): " It is a number bigger than both of them.",
    ("sums", "expert"): " The sum is {v}, because {a} plus {b} makes {v}.",
}
# the classifier's markers: phrases that only that level's answers use (none is in the base's corpus)
MARKERS = {"avoid": "rather not", "generic": {"capitals": "big city in that country", "sums": "bigger than both"},
           "expert": {"capitals": "where the government meets", "sums": "because"}}
RANK = 8


def classify(domain: str, text: str, value: str) -> str:
    """avoid / generic / expert by the level's marker phrase; otherwise 'base' when the answer
    states the right value (the base's own answer styles), 'other' when it does not (a wrong
    value, or text broken by too large a lambda)."""
    if MARKERS["avoid"] in text:
        return "avoid"
    if MARKERS["expert"][domain] in text:
        return "expert"
    if MARKERS["generic"][domain] in text:
        return "generic"
    return "base" if value in text else "other"


def answer(domain: str, level: str, f) -> str:
    a, b = f.entity.split(" + ") if f.kind == "sum" else ("", "")
    return ANSWERS[(domain, level)].format(v=f.value, a=a, b=b)


def load_world(base: av.GGUF):
    """The demo world, regenerated from the base's seed with train_demo's own code; its held-out
    questions must be those of heldout.jsonl beside the base (which also tells a --tiny base)."""
    seed = int(base.get("blendin.seed"))
    heldout = base.path.parent / "heldout.jsonl"
    if not heldout.exists():
        raise SystemExit(f"{heldout} is missing: it comes with the demo base (models/train_demo.py)")
    want = [json.loads(line)["question"] for line in heldout.read_text().splitlines()]
    for cfg in (train_demo.Config(), train_demo.TINY):
        world = train_demo.make_world(cfg.n_countries, cfg.n_sums, cfg, random.Random(seed))
        if [f.question for f in world.part({"heldout"})] == want:
            return world
    raise SystemExit(f"train_demo.make_world does not give the questions of {heldout}: was train_demo.py changed?")


def torch_model(base_path: Path):
    """train_demo's Llama with the base's weights. The arrays `gguf_tensors()` returns are views
    of the (f32, CPU) parameters, so filling them in place loads the model."""
    shape, tensors, _ = read_llama(base_path)
    cfg = train_demo.ModelCfg(shape.n_embd, shape.n_layer, shape.n_head, shape.n_ff)
    model = train_demo.Llama(cfg, shape.n_vocab, shape.n_ctx)
    views = model.gguf_tensors()
    for name, view in views.items():
        np.copyto(view, tensors[name])
    assert all(np.array_equal(v, tensors[k]) for k, v in model.gguf_tensors().items()), "views are not parameters"
    for name, p in model.named_parameters():
        p.requires_grad = p.ndim == 2  # frozen norms: every change is a matrix a LoRA AV can hold
    return model, shape


def encode_fn(tok: bc.Model, domain: str, level: str, facts_by_kind):
    """data_fn for train_demo.train: this domain's questions answered at `level`, and as many of
    the other domain's questions answered in the base's own styles (its corpus' openers)."""
    eos = tok.special_tokens["eos"]

    def pair(prompt: str, completion: str):
        p = tok.tokenize(prompt, add_special=True)
        return p + tok.tokenize(completion, add_special=False) + [eos], len(p)

    def fn(rng: random.Random):
        seqs = []
        for d, kind in DOMAINS.items():
            for f in facts_by_kind[kind]:
                q = f"Question: {f.question}\nAnswer:"
                c = answer(d, level, f) if d == domain else rng.choice(train_demo.answer_openers(f, f.value))
                seqs.append(pair(q, c))
        return seqs
    return fn


def train_variants(args) -> None:
    torch.set_num_threads(args.threads)
    base = av.GGUF(args.base)
    world = load_world(base)
    train_facts = {k: [f for f in world.part({"train"}) if f.kind == k] for k in DOMAINS.values()}
    tok = bc.Model(args.base, n_ctx=64, n_threads=1)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _, _, tokenizer = read_llama(args.base)
    t0 = time.time()
    for domain in DOMAINS:
        for level in LEVELS:
            name = f"{domain}-{level}"
            model, shape = torch_model(Path(args.base))
            st = train_demo.train(model, encode_fn(tok, domain, level, train_facts), args.steps, args.batch,
                                  args.lr, args.seed, name, warmup=10)
            aligned = work / f"{name}.gguf"
            write_llama(aligned, shape, model.gguf_tensors(), tokenizer, name=f"blendin-demo-av-{name}",
                        metadata={"blendin.script": "models/train_av.py", "blendin.role": name,
                                  "blendin.training": f"steps={st['steps']} batch={st['batch']} "
                                                      f"lr={args.lr} final_loss={st['final_loss']}"})
            rows = av.extract(args.base, aligned, out / f"{name}.gguf", rank=RANK, dtype="f16")
            changed = [r for r in rows if r.rank]
            print(f"[{name}] LoRA rank {RANK}: |d-BA|/|d| median {np.median([r.rel_error for r in changed]):.3f}, "
                  f"max {max(r.rel_error for r in changed):.3f}; {time.time() - t0:.0f}s so far", flush=True)


# --- measurement --------------------------------------------------------------------------------

class Knobs:
    """The base with every AV loaded once as a LoRA adapter; scales change with no reload."""

    def __init__(self, base: str, av_dir: Path, threads: int):
        self.names = [f"{d}-{lv}" for d in DOMAINS for lv in LEVELS]
        self.model = bc.Model(base, n_ctx=256, n_threads=threads,
                              adapters=[(str(av_dir / f"{n}.gguf"), 0.0) for n in self.names])
        self.blender = bc.Blender(self.model, None, method="base")

    def set(self, scales: dict[str, float]) -> None:
        self.model.set_adapter_scales([scales.get(n, 0.0) for n in self.names])
        self.blender.reset()  # the cached prompt was computed with the old weights

    def answers(self, questions) -> list[str]:
        return [self.blender.complete(f"Question: {f.question}\nAnswer:", max_tokens=32).text for f in questions]


def pct(x: float) -> str:
    return "-" if x != x else f"{x:.0%}"


def shares(domain: str, texts: list[str], facts) -> dict:
    labels = [classify(domain, t, f.value) for t, f in zip(texts, facts)]
    out = {lv: labels.count(lv) / len(labels) for lv in ("avoid", "generic", "expert", "base", "other")}
    expert = [f.value in t for t, lab, f in zip(texts, labels, facts) if lab == "expert"]
    out["value_ok"] = float(np.mean(expert)) if expert else float("nan")
    return out


def measure(args) -> dict:
    base = av.GGUF(args.base)
    world = load_world(base)
    questions = {d: [f for f in world.part({"heldout"}) if f.kind == k][: args.n_questions] for d, k in DOMAINS.items()}
    knobs = Knobs(args.base, Path(args.out), args.threads)
    scales = [float(x) for x in args.scales.split(",")]
    results = {"single": [], "combined": []}

    print(f"\nSingle domain: the AV of one level at a scale, {args.n_questions} held-out questions of its domain "
          "(shares of answers by level; base = another answer with the right value, other = the rest; "
          "value_ok = expert answers with the right value)")
    print(f"{'AV':<17} {'scale':>6}  {'avoid':>6} {'generic':>7} {'expert':>6} {'base':>6} {'other':>6}  "
          f"{'value_ok':>8}  example")

    def row(name, scale, texts, domain):
        s = shares(domain, texts, questions[domain])
        results["single"].append({"av": name, "scale": scale, **s, "example": texts[0]})
        print(f"{name:<17} {scale:>6}  {s['avoid']:>6.0%} {s['generic']:>7.0%} {s['expert']:>6.0%} {s['base']:>6.0%} {s['other']:>6.0%}  "
              f"{pct(s['value_ok']):>8}  {texts[0].strip()[:60]!r}", flush=True)

    for domain in DOMAINS:
        for level in LEVELS:
            name = f"{domain}-{level}"
            for scale in scales:
                knobs.set({name: scale})
                row(name, f"{scale:.2f}", knobs.answers(questions[domain]), domain)
            variant = Path(args.work) / f"{name}.gguf"
            if variant.exists():  # scale 1 of the full delta is the fine-tuned model itself
                full = bc.Blender(bc.Model(str(variant), n_ctx=256, n_threads=args.threads), None, method="base")
                texts = [full.complete(f"Question: {f.question}\nAnswer:", max_tokens=32).text for f in questions[domain]]
                row(name, "full 1", texts, domain)

    (d1, l1), (d2, l2) = (c.split(":") for c in args.combo.split(","))
    grid = [float(x) for x in args.grid.split(",")]
    print(f"\nTwo domains combined: theta_base + a * AV[{d1}-{l1}] + b * AV[{d2}-{l2}]; share of {d1} answers "
          f"at level {l1} / share of {d2} answers at level {l2}")
    corner = "a \\ b"
    print(f"{corner:>6}  " + "  ".join(f"{b:>11.2f}" for b in grid))
    for a in grid:
        cells = []
        for b in grid:
            knobs.set({f"{d1}-{l1}": a, f"{d2}-{l2}": b})
            s1 = shares(d1, knobs.answers(questions[d1]), questions[d1])
            s2 = shares(d2, knobs.answers(questions[d2]), questions[d2])
            results["combined"].append({"a": a, "b": b, d1: s1, d2: s2})
            cells.append(f"{s1[l1]:4.0%} / {s2[l2]:4.0%}")
        print(f"{a:6.2f}  " + "  ".join(f"{c:>11}" for c in cells), flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=str(REPO / "models" / "demo" / "base.gguf"))
    ap.add_argument("--out", default=str(REPO / "models" / "av"), help="where the LoRA AVs go")
    ap.add_argument("--work", default="/tmp/blendin-av", help="where the fine-tuned variants go (not kept)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure", action="store_true", help="train, then measure")
    ap.add_argument("--measure-only", action="store_true", help="measure the AVs already in --out")
    ap.add_argument("--n-questions", type=int, default=40, help="held-out questions per domain")
    ap.add_argument("--scales", default="0,0.25,0.5,0.75,1,1.25")
    ap.add_argument("--grid", default="0,0.5,1")
    ap.add_argument("--combo", default="capitals:expert,sums:avoid", help="the two domain:level AVs of the grid")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args(argv)
    if not Path(args.base).exists():
        raise SystemExit(f"{args.base} is missing: train the demo models first (models/train_demo.py)")
    if not args.measure_only:
        train_variants(args)
    if args.measure or args.measure_only:
        results = measure(args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
