"""`python -m blendin_cpp eval`: a question set through every method, on the demo pairs or on any pair.

    python -m blendin_cpp eval                                    # the demo pairs, the bundled held-out set
    python -m blendin_cpp eval --pair real --questions models/real/questions.jsonl
    python -m blendin_cpp eval --base B.gguf --guide G.gguf --questions FILE.jsonl --json out.json

A question file is JSONL, one object per line: `question`, and `answer` (a string) or `answers` (a
list: any one counts); optional `value` (the fact itself, to tell format from content failures)
and `match`. Scoring is rule-based, per question:
- `"match": "exact"`: the answer, stripped of surrounding whitespace, equals the expected answer
  (the bundled demo sets, whose answers are whole sentences such as "Sure! Its capital is Mudozi.");
- `"match": "contains"` (the default, or `--match`): one of the expected answers occurs in the
  answer, both lower-cased with whitespace runs made one space.
A wrong answer is a *format* failure when `value` is in it, else a *content* failure.

Every question is asked greedily as one user message (the base reads "Question: ...\\nAnswer:",
the guide its chat template) and the answer ends at an end token, where the base starts the
transcript's next "\\nQuestion:", or at --max-tokens. Per method: accuracy, `ended` (the share of
answers that ended by themselves rather than at --max-tokens), the intervention rate, the mean
alpha where a mixing weight applies, and tokens/s (all the method's answers over its wall time, with
--parallel questions decoded together; the answers are the ones asked one by one would get).

With `--requests FILE` (JSONL, one `{"request": ...}` per line: open chat requests such as the
bundled models/real/chat_requests.jsonl) a `quality` table follows: per method, the share of
answers that ended by themselves within --quality-max-tokens (256), the share that looped (`looped`:
a line, or a run of 8 words, that occurs 3 times), the mean length in tokens and the intervention
rate. `--chat-defaults` asks both sets with the chat's sampling and repetition defaults (seeded,
so still reproducible) instead of greedy decoding without repetition controls.
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
from .chat import NEXT_QUESTION
from .model import Model
from .options import add_model_args, add_repetition_args, load_models, pair_of, repetition_kwargs

# the demo pairs: which guide, and whether the proxy method's anti fits it (the anti is the
# pretraining stage of the same-vocabulary guides)
DEMO_PAIRS = {
    "reliable": "guide",
    "unreliable": "guide-unreliable",
    "xvocab": "guide-xvocab",
}
MATCHES = ("exact", "contains")


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def score(expected: str | list[str], text: str, match: str) -> bool:
    """`exact`: equal after stripping surrounding whitespace; `contains`: one of the expected
    answers occurs in the text, case and whitespace runs aside."""
    answers = [expected] if isinstance(expected, str) else expected
    if match == "exact":
        return any(text.strip() == a.strip() for a in answers)
    return any(_normal(a) in _normal(text) for a in answers)


def failure_kind(expected: str | list[str], value: str, text: str, match: str) -> str:
    """'correct', 'format' (the right value in the wrong form) or 'content' (the value is not there)."""
    if score(expected, text, match):
        return "correct"
    return "format" if value and value in text else "content"


@dataclass
class Cell:
    """One method on one pair over the question set."""
    n: int = 0
    correct: int = 0
    ended: int = 0
    format_errors: int = 0
    content_errors: int = 0
    tokens: int = 0
    interventions: int = 0
    alpha_sum: float = 0.0
    alpha_n: int = 0
    seconds: float = 0.0
    responses: list = field(default_factory=list)  # every answer and how it was scored

    def add(self, q: dict, text: str, stats: dict) -> None:
        kind = failure_kind(q["answers"], q.get("value", ""), text, q["match"])
        self.n += 1
        self.correct += kind == "correct"
        self.ended += stats["finish_reason"] == "stop"
        self.format_errors += kind == "format"
        self.content_errors += kind == "content"
        self.tokens += stats["tokens"]
        self.interventions += stats["interventions"]
        if stats["interventions"]:
            self.alpha_sum += stats["mean_alpha"] * stats["interventions"]
            self.alpha_n += stats["interventions"]
        self.responses.append({"question": q["question"], "expected": q["answers"], "match": q["match"], "got": text,
                               "result": kind, "finish_reason": stats["finish_reason"]})

    def row(self) -> dict:
        return {
            "n": self.n,
            "accuracy": self.correct / self.n if self.n else 0.0,
            "ended": self.ended / self.n if self.n else 0.0,
            "format_errors": self.format_errors,
            "content_errors": self.content_errors,
            "intervention_rate": self.interventions / self.tokens if self.tokens else 0.0,
            "mean_alpha": self.alpha_sum / self.alpha_n if self.alpha_n else None,  # None: no mixing weight
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "responses": self.responses,
        }


def looped(text: str, times: int = 3, words: int = 8) -> bool:
    """An answer that repeats itself: a non-empty line, or a run of `words` words, that occurs
    `times` times."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if any(lines.count(ln) >= times for ln in set(lines)):
        return True
    w = text.split()
    runs: dict[tuple, int] = {}
    for i in range(len(w) - words + 1):
        run = tuple(w[i:i + words])
        runs[run] = runs.get(run, 0) + 1
        if runs[run] >= times:
            return True
    return False


@dataclass
class QualityCell:
    """One method on open chat requests: do its answers end, do they loop."""
    n: int = 0
    ended: int = 0
    looped: int = 0
    tokens: int = 0
    interventions: int = 0
    responses: list = field(default_factory=list)

    def add(self, request: str, text: str, stats: dict) -> None:
        loop = looped(text)
        self.n += 1
        self.ended += stats["finish_reason"] == "stop"
        self.looped += loop
        self.tokens += stats["tokens"]
        self.interventions += stats["interventions"]
        self.responses.append({"request": request, "got": text, "finish_reason": stats["finish_reason"],
                               "looped": loop, "tokens": stats["tokens"]})

    def row(self) -> dict:
        n = max(self.n, 1)
        return {"n": self.n, "ended": self.ended / n, "looped": self.looped / n, "mean_tokens": self.tokens / n,
                "intervention_rate": self.interventions / self.tokens if self.tokens else 0.0,
                "responses": self.responses}


def load_requests(path: str, limit: int | None) -> list[str]:
    """The requests of a JSONL file of `{"request": TEXT}` lines."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e.msg})") from None
        if not isinstance(r, dict) or not isinstance(r.get("request"), str) or not r["request"].strip():
            raise ValueError(f"{path}: line {i + 1} needs 'request' (a non-empty string)")
        out.append(r["request"])
    if not out:
        raise ValueError(f"{path} has no requests")
    return out[:limit] if limit else out


def _messages(text: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def evaluate_quality(blender: Blender, methods: list[str], requests: list[str], *, max_tokens: int = 256,
                     sampling: dict | None = None, progress=None, label: str = "",
                     parallel: int | None = None, system: str | None = None) -> dict:
    """{method: quality row} for open chat requests, each asked as one user message (after the
    `system` message, if any), ending at an end token or where the base starts the transcript's
    next question (as in the chat)."""
    rows = {}
    for method in methods:
        if skip_reason(blender, method):
            continue
        cell = QualityCell()
        done = []

        def finished(i, completion):
            done.append(i)
            if progress:
                progress(label + " quality", method, len(done), len(requests))
        answers = blender.complete_many([_messages(r, system) for r in requests], parallel=parallel,
                                        on_done=finished, max_tokens=max_tokens, method=method,
                                        stop=[NEXT_QUESTION], **(sampling or {}))
        for r, a in zip(requests, answers):
            cell.add(r, a.text, a.stats)
        rows[method] = cell.row()
    return rows


def format_quality(quality: dict) -> str:
    lines = []
    for label, rows in quality.items():
        lines.append(f"quality {label}: open requests")
        lines.append(f"  {'method':<13} {'ended':>6} {'looped':>7} {'tokens':>7} {'interv.':>8}")
        for method, r in rows.items():
            lines.append(f"  {method:<13} {r['ended']:>6.0%} {r['looped']:>7.0%} {r['mean_tokens']:>7.1f} "
                         f"{r['intervention_rate']:>8.1%}")
    return "\n".join(lines)


def load_questions(path: str | None, limit: int | None, match: str | None = None) -> list[dict]:
    """Rows with `question`, `answers` (a list) and `match`: the row's own rule, else `match`,
    else contains. Default file: the bundled demo held-out set."""
    path = path or demo.heldout_path()
    if match is not None and match not in MATCHES:
        raise ValueError(f"--match must be one of {', '.join(MATCHES)}, not {match!r}")
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"{path}: line {i + 1}"
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e.msg})") from None
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or ("answer" in q) == ("answers" in q):
            raise ValueError(f"{where} needs 'question' and 'answer' (a string) or 'answers' (a list)")
        answers = [q["answer"]] if "answer" in q else q["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"{where}: the expected answers must be non-empty strings")
        rule = q.get("match", match or "contains")
        if rule not in MATCHES:
            raise ValueError(f"{where}: match must be one of {', '.join(MATCHES)}, not {rule!r}")
        rows.append({**q, "answers": answers, "match": rule})
    if not rows:
        raise ValueError(f"{path} has no questions")
    return rows[:limit] if limit else rows


def skip_reason(blender: Blender, method: str) -> str | None:
    if method == "proxy" and blender.anti is None:
        return "needs --anti (the guide's untuned sibling)"
    if method != "base" and blender.guide is None:
        return "needs a guide"
    try:  # the core's rule for the pair (a guide with another vocabulary cannot do proxy or dera)
        blender._engine.check(blender.gen_params(settings={"method": method}))
    except ValueError as e:
        return str(e)
    return None


def evaluate_pair(blender: Blender, methods: list[str], questions: list[dict], *, max_tokens: int = 48,
                  progress=None, label: str = "", base_cell: Cell | None = None,
                  parallel: int | None = None, sampling: dict | None = None,
                  system: str | None = None) -> tuple[dict, dict, Cell | None]:
    """Greedy answers for every method on one pair: ({method: row}, {method: why skipped}, the
    base-alone cell, which does not depend on the guide and can be handed to the next pair). The
    questions of a method are decoded together, `parallel` at a time (`Blender.complete_many`:
    the same answers as one by one); tokens/s is the method's tokens over its wall time."""
    rows, skipped = {}, {}
    for method in methods:
        why = skip_reason(blender, method)
        if why:
            skipped[method] = why
            continue
        if method == "base" and base_cell is not None:
            rows[method] = base_cell.row()
            continue
        cell = Cell()
        done = []

        def finished(i, completion):
            done.append(i)
            if progress:
                progress(label, method, len(done), len(questions))
        t0 = time.perf_counter()
        # the answer ends where the base starts the transcript's next question, as in the chat
        answers = blender.complete_many([_messages(q["question"], system) for q in questions],
                                        parallel=parallel, on_done=finished, max_tokens=max_tokens, method=method,
                                        stop=[NEXT_QUESTION], **(sampling or {}))
        cell.seconds = time.perf_counter() - t0
        for q, r in zip(questions, answers):
            cell.add(q, r.text, r.stats)
        rows[method] = cell.row()
        if method == "base":
            base_cell = cell
    return rows, skipped, base_cell


def evaluate(pairs: list[str], methods: list[str], questions: list[dict], *, gamma: float = 0.4,
             max_tokens: int = 48, n_threads: int | None = None, n_gpu_layers: int | None = None,
             rpc: str | None = None, progress=None, parallel: int = 1, sampling: dict | None = None,
             deterministic: bool = True) -> dict:
    """The demo pairs: {"pairs": {pair: {method: row}}, "skipped": {...}, "models": {...}}."""
    kw = dict(n_ctx=512 * parallel, n_seq_max=parallel, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
              deterministic=deterministic)
    base = Model(demo.demo_path("base"), rpc=rpc, **kw)
    anti = Model(demo.demo_path("anti"), **kw)
    results: dict = {"pairs": {}, "skipped": {}, "models": {}}
    base_cell = None
    for pair in pairs:
        guide = Model(demo.demo_path(DEMO_PAIRS[pair]), **kw)
        blender = Blender(base, guide, anti=anti, gamma=gamma)
        rows, skipped, base_cell = evaluate_pair(blender, methods, questions, max_tokens=max_tokens,
                                                 progress=progress, label=pair, base_cell=base_cell,
                                                 parallel=parallel, sampling=sampling)
        results["pairs"][pair] = rows
        results["skipped"].update({f"{pair}/{m}": why for m, why in skipped.items()})
        results["models"][pair] = {"base": base.path, "guide": guide.path}
    return results


def format_table(results: dict) -> str:
    lines = []
    for pair, rows in results["pairs"].items():
        models = results["models"][pair]
        lines.append(f"pair {pair}: base {Path(models['base']).name} + guide {Path(models['guide']).name}")
        lines.append(f"  {'method':<13} {'accuracy':>8} {'ended':>6} {'format':>7} {'content':>8} {'interv.':>8} "
                     f"{'alpha':>6} {'tok/s':>8}")
        for method, r in rows.items():
            alpha = "-" if r["mean_alpha"] is None else f"{r['mean_alpha']:.2f}"
            lines.append(f"  {method:<13} {r['accuracy']:>8.1%} {r['ended']:>6.0%} {r['format_errors']:>7} "
                         f"{r['content_errors']:>8} {r['intervention_rate']:>8.1%} {alpha:>6} {r['tokens_per_s']:>8.1f}")
    for what, why in results["skipped"].items():
        lines.append(f"skipped {what}: {why}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    methods = args.methods.split(",") if args.methods else list(METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    demo_models = pair_of(args) == "demo" and args.base is None and args.guide is None
    if not demo_models and args.pairs is not None:
        raise ValueError("--pairs chooses among the demo pairs; with --pair or --base/--guide leave it out")
    if demo_models and args.av:
        raise ValueError("--av applies to a pair given with --pair or --base/--guide, not to the demo pairs")
    if not demo_models and args.questions is None:
        raise ValueError("--questions FILE.jsonl is needed with --pair or --base/--guide (the bundled set is "
                         "about the demo's made-up world)")
    questions = load_questions(args.questions, args.limit, args.match)
    requests = load_requests(args.requests, args.limit) if args.requests else None
    if requests and demo_models:
        raise ValueError("--requests is for a real pair (--pair or --base/--guide): the demo models know only "
                         "their made-up world")
    if args.chat_defaults:
        from .chat import CHAT_DEFAULTS, CHAT_SYSTEM
        sampling = {k: v for k, v in CHAT_DEFAULTS.items() if k != "max_tokens"}
    else:
        sampling = {}
    system = args.system if args.system is not None else CHAT_SYSTEM if args.chat_defaults and not demo_models else None
    if demo_models and system:
        raise ValueError("--system is for a real pair: the demo models were trained on questions alone")
    sampling.update(repetition_kwargs(args))
    if args.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {args.parallel}")

    def progress(pair, method, i, n):
        if sys.stderr.isatty() or i == n:
            print(f"\r{pair:<10} {method:<13} {i}/{n}", end="\n" if i == n else "", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if demo_models:
        pairs = (args.pairs or ",".join(DEMO_PAIRS)).split(",")
        for p in pairs:
            if p not in DEMO_PAIRS:
                raise ValueError(f"unknown demo pair {p!r}; choose from {', '.join(DEMO_PAIRS)}")
        results = evaluate(pairs, methods, questions, gamma=args.gamma, max_tokens=args.max_tokens,
                           n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, rpc=args.rpc, progress=progress,
                           parallel=args.parallel, sampling=sampling, deterministic=args.deterministic)
    else:
        models = load_models(args, log=sys.stderr, parallel=args.parallel)
        if models["guide"] is None:
            raise ValueError("eval needs a guide model (--guide or --pair)")
        blender = Blender(models["base"], models["guide"], anti=models["anti"], gamma=args.gamma)
        label = args.pair or "+".join(Path(m.path).stem for m in (models["base"], models["guide"]))
        rows, skipped, _ = evaluate_pair(blender, methods, questions, max_tokens=args.max_tokens, progress=progress,
                                         label=label, parallel=args.parallel, sampling=sampling, system=system)
        results = {"pairs": {label: rows}, "skipped": {f"{label}/{m}": why for m, why in skipped.items()},
                   "models": {label: {r: m.path for r, m in models.items() if m is not None}}}
        if requests:
            results["quality"] = {label: evaluate_quality(blender, methods, requests,
                                                          max_tokens=args.quality_max_tokens, sampling=sampling,
                                                          progress=progress, label=label, parallel=args.parallel,
                                                          system=system)}
    results["questions"] = len(questions)
    results["match"] = sorted({q["match"] for q in questions})
    results["gamma"] = args.gamma
    results["max_tokens"] = args.max_tokens
    results["sampling"] = sampling
    results["system"] = system
    results["deterministic"] = args.deterministic
    results["seconds"] = time.perf_counter() - t0
    print(format_table(results))
    if "quality" in results:
        print(format_quality(results["quality"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of every method on a question set (default: the demo pairs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--pairs", default=None,
                   help="with the demo models: comma-separated demo pairs (default: " + ",".join(DEMO_PAIRS) + ")")
    p.add_argument("--methods", default=None, help="comma-separated (default: all)")
    p.add_argument("--questions", default=None, help="a JSONL file (default: the bundled demo held-out set)")
    p.add_argument("--match", default=None, choices=MATCHES,
                   help="the scoring rule of rows without their own 'match' (default: contains)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--gamma", type=float, default=0.4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--parallel", type=int, default=4,
                   help="questions decoded together (default 4: on 2 CPU cores a batch of 4 rows costs 2.3-3x one "
                        "row, one of 8 rows 3.9-5.9x, so 4 gains most); "
                        "each gets --ctx tokens of context (512 for the demo pairs)")
    p.add_argument("--requests", default=None,
                   help="a JSONL file of open chat requests ({\"request\": ...} per line, e.g. "
                        "models/real/chat_requests.jsonl): adds the quality table (ended, looped, length)")
    p.add_argument("--quality-max-tokens", type=int, default=256, help="the answers' budget in the quality table")
    p.add_argument("--chat-defaults", action="store_true",
                   help="ask as the chat does: its sampling and repetition defaults (seeded) instead of greedy "
                        "decoding without repetition controls, and its system prompt (on a real pair)")
    p.add_argument("--system", default=None,
                   help="a system message before every question and request ('' for none; default: none, or the "
                        "chat's with --chat-defaults)")
    add_repetition_args(p, {name: None for name in ("presence_penalty", "frequency_penalty", "repeat_penalty",
                                                    "repeat_last_n", "dry_multiplier", "dry_base",
                                                    "dry_allowed_length", "loop_gate")})
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=cmd_eval)
