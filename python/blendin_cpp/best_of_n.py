"""Best-of-N and worst-of-N with calibrated, transformed rewards (InfAlign, the inference side).

- Candidates: N parallel sequences in one llama.cpp context per model (the prompt is decoded
  once and shared through the KV cache), for any method, one seed per candidate.
- Rewards: `implicit` (the guide's log-likelihood of the response minus the base's, each model on
  its own prompt, optionally per token), a reward language model in GGUF (its log-likelihood of
  the response), or any Python callable `f(prompt, response_text) -> float`.
- Calibration against the reference policy (the base alone, sampled at temperature 1):
  C(x, y) = P[r(z) < r(y)] + 0.5 P[r(z) = r(y)] over K samples z, cached per prompt.
- Transforms: best-of-N `exp(t C)`, worst-of-N `-exp(-t C)`; selection: `best` (argmax),
  `worst` (argmin), or `sample` (one candidate drawn with weights exp(transformed / beta), an
  inference-time approximation of pi* ~ pi_ref exp(transformed / beta)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import _core
from .blender import REPETITION, Blender
from .model import Model
from .text import utf8_boundary

TRANSFORMS = ("exp", "neg_exp", "none")
SELECTIONS = ("best", "worst", "sample")


@dataclass
class Candidate:
    text: str
    tokens: list[int]
    finish_reason: str
    interventions: int
    raw: float = math.nan
    calibrated: float = math.nan
    transformed: float = math.nan


@dataclass
class BestOfN:
    candidates: list[Candidate]
    chosen: int
    reference_rewards: list[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.candidates[self.chosen].text


def generate_candidates(blender: Blender, prompt, n: int, *, seed: int = 0, guide_prompt: str | None = None,
                        max_tokens: int = 128, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        min_p: float = 0.0, stop: Sequence[str] = (), ignore_eos: bool = False,
                        **settings) -> list[Candidate]:
    """n candidates with seeds seed, seed+1, ...: each equals `blender.complete(..., seed=seed+i)`.
    They run as parallel sequences, as many at a time as the models' n_seq_max and context allow."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    repetition = {k: settings.pop(k) for k in list(settings) if k in REPETITION}
    params = blender.gen_params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, seed=seed, stop=stop, ignore_eos=ignore_eos, settings=settings,
                                **repetition)
    base_tokens, guide_tokens = blender.prompts(prompt, guide_prompt)
    h = lambda m: m._handle if m is not None else None  # noqa: E731
    rows = _core.generate_candidates(blender.base._handle, h(blender.guide), h(blender.anti), base_tokens,
                                     guide_tokens, params, [seed + i for i in range(n)])
    return [Candidate(text=c.text, tokens=list(c.tokens), finish_reason=c.finish_reason, interventions=c.interventions)
            for c in rows]


# --- rewards ---------------------------------------------------------------------------------
Reward = Callable[[object, Sequence[Candidate]], list[float]]


def implicit_reward(blender: Blender, *, normalize: bool = False) -> Reward:
    """log pi_guide(y | guide prompt) - log pi_base(y | base prompt), scored in one batched pass
    per model (DPO's implicit reward with the guide as the tuned policy and the base as reference).
    A guide with its own vocabulary reads y's text through its own tokenizer, as the engine does;
    `normalize` divides each model's log-likelihood by its own number of tokens."""
    if blender.guide is None:
        raise ValueError("the implicit reward needs a guide model")

    def reward(prompt, cands):
        base_tokens, guide_tokens = blender.prompts(prompt)
        ys = [c.tokens for c in cands]
        guide_ys = [guide_reading(blender, y) for y in ys] if blender._engine.bridged else ys
        g = _core.score_continuations(blender.guide._handle, guide_tokens, guide_ys, normalize)
        b = _core.score_continuations(blender.base._handle, base_tokens, ys, normalize)
        return [gi - bi for gi, bi in zip(g, b)]
    return reward


def guide_reading(blender: Blender, tokens: Sequence[int]) -> list[int]:
    """The guide's tokens of the text that base `tokens` spell, whole UTF-8 characters only: what
    a guide with another vocabulary reads of a generation (cpp/engine.cpp, guide_logits)."""
    data = b"".join(blender.base.piece(t) for t in tokens)
    return list(_core.Retokenizer(blender.guide._handle).tokens(data[: utf8_boundary(data)]))


def model_reward(model: Model, *, template: str = "{prompt}\n{response}", normalize: bool = True) -> Reward:
    """A reward language model in GGUF: its (per-token) log-likelihood of the response after the
    prompt, scored for all candidates in one batched pass of parallel sequences."""
    def reward(prompt, cands):
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        head = template.split("{response}")[0].format(prompt=text)
        head_tokens = model.tokenize(head, add_special=True)
        ys = [model.tokenize(c.text, add_special=False) or [model.special_tokens["eos"]] for c in cands]
        return list(_core.score_continuations(model._handle, head_tokens, ys, normalize))
    return reward


def callable_reward(fn: Callable[[object, str], float]) -> Reward:
    def reward(prompt, cands):
        out = [float(fn(prompt, c.text)) for c in cands]
        if not all(math.isfinite(x) for x in out):
            raise ValueError("the reward function returned a value that is not a finite number")
        return out
    return reward


# --- calibration and transforms ----------------------------------------------------------------
def calibrate(raw: Sequence[float], reference: Sequence[float]) -> np.ndarray:
    """C(y) = P[r(z) < r(y)] + 0.5 P[r(z) = r(y)] over the reference rewards r(z)."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    if ref.size == 0:
        raise ValueError("calibration needs at least one reference sample")
    r = np.asarray(raw, dtype=np.float64)
    below = np.searchsorted(ref, r, side="left")
    not_above = np.searchsorted(ref, r, side="right")
    return (below + 0.5 * (not_above - below)) / ref.size


def transform(values: np.ndarray, kind: str, t: float) -> np.ndarray:
    if kind == "exp":
        return np.exp(t * values)
    if kind == "neg_exp":
        return -np.exp(-t * values)
    if kind == "none":
        return np.asarray(values, dtype=np.float64)
    raise ValueError(f"unknown transform {kind!r}; choose one of {', '.join(TRANSFORMS)}")


def select(transformed: np.ndarray, how: str, *, select_beta: float = 1.0, seed: int = 0) -> int:
    if how == "best":
        return int(np.argmax(transformed))
    if how == "worst":
        return int(np.argmin(transformed))
    if how == "sample":
        if not select_beta > 0:
            raise ValueError("select_beta must be > 0 for sampling")
        logits = np.asarray(transformed, dtype=np.float64) / select_beta
        w = np.exp(logits - logits.max())
        return int(np.random.default_rng(seed).choice(len(w), p=w / w.sum()))
    raise ValueError(f"unknown selection {how!r}; choose one of {', '.join(SELECTIONS)}")


class ReferenceCache:
    """Reference rewards per prompt (the base policy's samples are costly: compute them once).
    An entry belongs to one reward function and one reference policy: the base Model with its
    Alignment Vector scales at the time (the key holds the objects themselves, so that an id
    cannot be reused by another)."""

    def __init__(self):
        self._cache: dict = {}

    def rewards(self, blender: Blender, prompt, reward: Reward, k: int, *, max_tokens: int, seed: int) -> list[float]:
        key = (repr(prompt), reward, blender.base, tuple(blender.base.adapter_scales()), k, max_tokens, seed)
        if key not in self._cache:
            # the reference policy: the base alone, sampled at temperature 1
            refs = generate_candidates(blender, prompt, k, seed=seed, max_tokens=max_tokens, temperature=1.0,
                                       method="base")
            self._cache[key] = reward(prompt, refs)
        return self._cache[key]


def best_of_n(blender: Blender, prompt, *, n: int = 8, reward: Reward, calibrate_k: int = 0,
              transform_kind: str = "exp", t: float = 4.0, selection: str = "best", select_beta: float = 1.0,
              seed: int = 0, max_tokens: int = 128, cache: ReferenceCache | None = None, **gen) -> BestOfN:
    """Generate n candidates, score, (calibrate, transform) and select one. `select_beta` is the
    temperature of selection="sample"; `gen` goes to the candidates' generation (method, beta
    for proxy-tuning, temperature, ...)."""
    if transform_kind not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform_kind!r}; choose one of {', '.join(TRANSFORMS)}")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    if not math.isfinite(t):
        raise ValueError("t must be finite")
    cands = generate_candidates(blender, prompt, n, seed=seed, max_tokens=max_tokens, **gen)
    raw = np.asarray(reward(prompt, cands), dtype=np.float64)
    ref: list[float] = []
    if calibrate_k:
        ref = (cache or ReferenceCache()).rewards(blender, prompt, reward, calibrate_k, max_tokens=max_tokens,
                                                  seed=seed + 1_000_003)
        values = calibrate(raw, ref)
    else:
        values = raw
    tr = transform(values, transform_kind, t)
    for c, r, v, x in zip(cands, raw, values, tr):
        c.raw, c.calibrated, c.transformed = float(r), float(v) if calibrate_k else math.nan, float(x)
    return BestOfN(candidates=cands, chosen=select(tr, selection, select_beta=select_beta, seed=seed),
                   reference_rewards=list(ref))


def win_rate(wins: Sequence[float]) -> tuple[float, float, float]:
    """Mean of per-comparison outcomes (1 win, 0.5 tie, 0 loss) with a 95% normal interval."""
    w = np.asarray(wins, dtype=np.float64)
    if w.size == 0:
        raise ValueError("no comparisons")
    m = float(w.mean())
    half = 1.96 * float(w.std(ddof=1)) / math.sqrt(w.size) if w.size > 1 else 1.0
    return m, max(0.0, m - half), min(1.0, m + half)


# --- command line ------------------------------------------------------------------------------
def reward_from_spec(blender: Blender, spec: str, args) -> Reward:
    if spec == "implicit":
        return implicit_reward(blender, normalize=args.normalize)
    if spec.startswith("model:"):
        return model_reward(Model(spec[len("model:"):], n_ctx=args.ctx * args.n_seq, n_seq_max=args.n_seq,
                                  n_threads=args.threads, deterministic=args.deterministic), normalize=True)
    raise ValueError(f"--reward must be 'implicit' or 'model:PATH.gguf', not {spec!r}")


def _blender(args):
    from .options import blender_from_args
    return blender_from_args(args, n_seq_max=args.n_seq)


def cmd_bon(args) -> int:
    import json
    import sys
    from .options import json_safe, repetition_kwargs

    blender = _blender(args)
    reward = reward_from_spec(blender, args.reward, args)
    r = best_of_n(blender, args.prompt, n=args.n, reward=reward, calibrate_k=args.calibrate,
                  transform_kind=args.transform, t=args.t, selection=args.select, select_beta=args.select_beta,
                  seed=args.seed, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, min_p=args.min_p, stop=args.stop, **repetition_kwargs(args))
    rows = [{"prompt": args.prompt, "response": c.text, "raw": c.raw, "calibrated": c.calibrated,
             "transformed": c.transformed, "chosen": i == r.chosen} for i, c in enumerate(r.candidates)]
    if args.export_jsonl:
        with open(args.export_jsonl, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(json_safe(row), ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(json_safe({"text": r.text, "chosen": r.chosen, "candidates": rows,
                                    "reference_rewards": r.reference_rewards}), ensure_ascii=False))
    else:
        for i, row in enumerate(rows):
            mark = "*" if row["chosen"] else " "
            print(f"{mark} {i}: raw {row['raw']:9.3f}  calibrated {row['calibrated']:.3f}  {row['response']!r}")
        print(r.text)
    print(f"[{args.n} candidates, reward {args.reward}, calibration K={args.calibrate}, transform {args.transform} "
          f"t={args.t}, selection {args.select}]", file=sys.stderr)
    return 0


def cmd_winrate(args) -> int:
    import json
    from pathlib import Path

    blender = _blender(args)
    reward = reward_from_spec(blender, args.reward, args)
    lines = [l for l in Path(args.prompts).read_text(encoding="utf-8").splitlines() if l.strip()]
    prompts = [json.loads(l)["question"] if l.lstrip().startswith("{") else l for l in lines][: args.limit]
    gen = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    wins = []
    for i, q in enumerate(prompts):
        messages = [{"role": "user", "content": q}]
        seed = args.seed + 1000 * i
        if args.bon_n:
            policy = [best_of_n(blender, messages, n=args.bon_n, reward=reward, calibrate_k=args.calibrate,
                                transform_kind=args.transform, t=args.t, selection=args.select,
                                seed=seed + 100 * s, **gen, method=args.method) for s in range(args.samples)]
            pol_rewards = [r.candidates[r.chosen].raw for r in policy]
        else:
            pol_rewards = reward(messages, generate_candidates(blender, messages, args.samples, seed=seed,
                                                               method=args.method, **gen))
        base = generate_candidates(blender, messages, args.samples, seed=seed + 50_000, method="base", **gen)
        for a, b in zip(pol_rewards, reward(messages, base)):
            wins.append(1.0 if a > b else 0.5 if a == b else 0.0)
    m, lo, hi = win_rate(wins)
    label = f"best-of-{args.bon_n} ({args.select}, K={args.calibrate}, {args.transform})" if args.bon_n else "sampling"
    print(json.dumps({"policy": f"{args.method} {label}", "reward": args.reward, "comparisons": len(wins),
                      "win_rate": m, "ci95": [lo, hi]}))
    return 0


def add_parser(sub) -> None:
    from .options import add_blend_args, add_model_args

    def common(p):
        add_model_args(p)
        add_blend_args(p)
        p.set_defaults(temperature=1.0)
        p.add_argument("--reward", default="implicit", help="'implicit' (guide minus base log-likelihood) or model:PATH.gguf")
        p.add_argument("--normalize", action="store_true", help="implicit reward per token")
        p.add_argument("--calibrate", type=int, default=0, metavar="K", help="calibrate against K base samples")
        p.add_argument("--transform", default="exp", choices=TRANSFORMS)
        p.add_argument("--t", type=float, default=4.0)
        p.add_argument("--select", default="best", choices=SELECTIONS)
        p.add_argument("--select-beta", type=float, default=1.0, help="temperature of --select sample")
        p.add_argument("--n-seq", type=int, default=8, help="parallel sequences per model (n_seq_max)")

    b = sub.add_parser("bon", help="best-of-N / worst-of-N with calibrated, transformed rewards (InfAlign)")
    common(b)
    b.add_argument("--prompt", required=True)
    b.add_argument("--n", type=int, default=8)
    b.add_argument("--json", action="store_true")
    b.add_argument("--export-jsonl", help="append (prompt, response, raw, calibrated, transformed) rows here")
    b.set_defaults(func=cmd_bon)

    w = sub.add_parser("winrate", help="win rate of a policy's outputs against base samples under a reward")
    common(w)
    w.add_argument("--prompts", required=True, help="JSONL with 'question' fields, or one prompt per line")
    w.add_argument("--limit", type=int, default=20)
    w.add_argument("--samples", type=int, default=4, help="comparisons per prompt")
    w.add_argument("--bon-n", type=int, default=0, help="the policy is best-of-N with this N (0: plain sampling)")
    w.set_defaults(func=cmd_winrate)
