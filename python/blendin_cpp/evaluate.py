"""`python -m blendin_cpp eval`: held-out questions through every method on every demo pair.

Scoring is rule-based: an answer is correct when the generated text, cut at the end token and
stripped of surrounding whitespace, equals the expected answer exactly. Wrong answers are split
into *format* failures (the expected value appears in the text, the answer's form does not) and
*content* failures (the value is missing: the model did not know, or said something else).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import demo
from .blender import METHODS, Blender
from .model import Model

# the demo pairs: which guide, and whether the proxy method's anti fits it (the anti is the
# pretraining stage of the same-vocabulary guides)
PAIRS = {
    "reliable": "guide",
    "unreliable": "guide-unreliable",
    "xvocab": "guide-xvocab",
}


def score(expected: str, text: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return text.strip() == expected.strip()


def failure_kind(expected: str, value: str, text: str) -> str:
    """'correct', 'format' (the right value in the wrong form) or 'content' (the value is not there)."""
    if score(expected, text):
        return "correct"
    return "format" if value and value in text else "content"


@dataclass
class Cell:
    """One method on one pair over the question set."""
    n: int = 0
    correct: int = 0
    format_errors: int = 0
    content_errors: int = 0
    tokens: int = 0
    interventions: int = 0
    alpha_sum: float = 0.0
    alpha_n: int = 0
    seconds: float = 0.0
    examples: list = field(default_factory=list)

    def add(self, q: dict, text: str, stats: dict) -> None:
        kind = failure_kind(q["answer"], q.get("value", ""), text)
        self.n += 1
        self.correct += kind == "correct"
        self.format_errors += kind == "format"
        self.content_errors += kind == "content"
        self.tokens += stats["tokens"]
        self.interventions += stats["interventions"]
        if stats["interventions"]:
            self.alpha_sum += stats["mean_alpha"] * stats["interventions"]
            self.alpha_n += stats["interventions"]
        self.seconds += stats["generate_s"]
        if kind != "correct" and len(self.examples) < 3:
            self.examples.append({"question": q["question"], "expected": q["answer"], "got": text, "failure": kind})

    def row(self) -> dict:
        return {
            "n": self.n,
            "accuracy": self.correct / self.n if self.n else 0.0,
            "format_errors": self.format_errors,
            "content_errors": self.content_errors,
            "intervention_rate": self.interventions / self.tokens if self.tokens else 0.0,
            "mean_alpha": self.alpha_sum / self.alpha_n if self.alpha_n else None,  # None: no mixing weight
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "examples": self.examples,
        }


def load_questions(path: str | None, limit: int | None) -> list[dict]:
    path = path or demo.heldout_path()
    questions = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for i, q in enumerate(questions):
        if not isinstance(q, dict) or "question" not in q or "answer" not in q:
            raise ValueError(f"{path}: line {i + 1} needs 'question' and 'answer'")
    return questions[:limit] if limit else questions


def evaluate(pairs: list[str], methods: list[str], questions: list[dict], *, gamma: float = 0.4,
             max_tokens: int = 48, n_threads: int | None = None, progress=None) -> dict:
    """Greedy answers for every (pair, method); returns {pair: {method: row}} plus skipped pairs."""
    kw = dict(n_ctx=512, n_threads=n_threads)
    base = Model(demo.demo_path("base"), **kw)
    anti = Model(demo.demo_path("anti"), **kw)
    results: dict = {"pairs": {}, "skipped": {}}
    base_cell: Cell | None = None
    for pair in pairs:
        try:
            guide = Model(demo.demo_path(PAIRS[pair]), **kw)
            blender = Blender(base, guide, anti=anti, gamma=gamma)
        except ValueError as e:  # e.g. a guide whose tokenizer differs from the base's
            results["skipped"][pair] = str(e)
            continue
        rows = {}
        for method in methods:
            if blender._engine.bridged and method in ("proxy", "dera"):
                results["skipped"][f"{pair}/{method}"] = "needs a guide that shares the base's vocabulary"
                continue
            if method == "base" and base_cell is not None:  # the base alone does not depend on the pair
                rows[method] = base_cell.row()
                continue
            cell = Cell()
            for i, q in enumerate(questions):
                r = blender.complete([{"role": "user", "content": q["question"]}], max_tokens=max_tokens,
                                     method=method)
                cell.add(q, r.text, r.stats)
                if progress:
                    progress(pair, method, i + 1, len(questions))
            rows[method] = cell.row()
            if method == "base":
                base_cell = cell
        results["pairs"][pair] = rows
    return results


def format_table(results: dict) -> str:
    lines = []
    for pair, rows in results["pairs"].items():
        lines.append(f"pair: base + {PAIRS[pair]}")
        lines.append(f"  {'method':<13} {'accuracy':>8} {'format':>7} {'content':>8} {'interv.':>8} {'alpha':>6} {'tok/s':>8}")
        for method, r in rows.items():
            alpha = "-" if r["mean_alpha"] is None else f"{r['mean_alpha']:.2f}"
            lines.append(f"  {method:<13} {r['accuracy']:>8.1%} {r['format_errors']:>7} {r['content_errors']:>8} "
                         f"{r['intervention_rate']:>8.1%} {alpha:>6} {r['tokens_per_s']:>8.0f}")
    for what, why in results["skipped"].items():
        lines.append(f"skipped {what}: {why}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    questions = load_questions(args.questions, args.limit)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    pairs = args.pairs.split(",")
    for p in pairs:
        if p not in PAIRS:
            raise ValueError(f"unknown pair {p!r}; choose from {', '.join(PAIRS)}")

    def progress(pair, method, i, n):
        if sys.stderr.isatty() or i == n:
            print(f"\r{pair:<10} {method:<13} {i}/{n}", end="\n" if i == n else "", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results = evaluate(pairs, methods, questions, gamma=args.gamma, max_tokens=args.max_tokens,
                       n_threads=args.threads, progress=progress)
    results["questions"] = len(questions)
    results["gamma"] = args.gamma
    results["seconds"] = time.perf_counter() - t0
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of every method on the demo pairs (held-out questions)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated: " + ", ".join(PAIRS))
    p.add_argument("--methods", default=None, help="comma-separated (default: all)")
    p.add_argument("--questions", default=None, help="a JSONL file (default: the bundled held-out set)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--gamma", type=float, default=0.4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=cmd_eval)
