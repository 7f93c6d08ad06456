"""`Blender`: a base and a guide decoded together, one token per `next()` (DESIGN.md sections 3, 5)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from . import _core
from .chat_template import base_transcript
from .model import Model

METHODS = ("base", "guide", "nudging", "nudging_word", "blendin", "ensemble", "proxy", "dera")


@dataclass(frozen=True)
class Step:
    """One generated token and why it was chosen. `source` is "base" (the base alone), "blend"
    (a mixture) or "guide" (the guide alone); numbers are None where not computed."""
    token: int
    text: str
    source: str
    pb_max: float | None
    pg_max: float | None
    alpha: float | None
    agree: float | None
    overlap: float | None
    intervened: bool
    finish_reason: str | None
    logprob: float = 0.0  # log p(token) under the final distribution (temperature 1)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # with top_logprobs=N: the N likeliest tokens
    # BlendIn's vocabulary analysis where the guide was consulted (None elsewhere): the rank of
    # the guide's top token in the base distribution (1 = the base's top), the base mass above it
    # (inside the base's top-p 0.9 iff < 0.9), the share of guide mass with no exact base token
    guide_rank: int | None = None
    mass_above: float | None = None
    unmatched: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Completion:
    text: str
    tokens: list[int]
    steps: list[Step]
    stats: dict = field(default_factory=dict)

    @property
    def finish_reason(self) -> str | None:
        return self.stats.get("finish_reason")


def _num(v: float) -> float | None:
    return None if math.isnan(v) else v


def _float(name: str, value, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name} must be a finite number in {rng}, got {value}")
    return value


def _int(name: str, value, *, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


class Blender:
    """Decode a base and a guide model together.

    Args:
        base: the pretrained model (plain completion prompt).
        guide: the instruction-tuned model (its own chat template). Must share the base's
            vocabulary.
        anti: the guide's untuned sibling, needed by `proxy` only.
        method: one of METHODS.
        gamma: nudging/blendin intervene when the base's top probability is below gamma.
        alpha: blendin's mixing weight in [0, 1], or "auto" (BlendIn's adaptive weight).
        beta: proxy-tuning strength. lambda_: DeRa interpolation weight (> 1 extrapolates).
        max_intervention_rate: cap on the share of tokens the guide may steer (None = no cap).
        lazy: let the guide fall behind and catch up in one batch when it is consulted (exact);
            False runs the naive loop in which both models decode every token.
        speculative: the guide drafts up to `draft_max` tokens and the base verifies them in one
            batch; every emitted token still follows the policy exactly (greedy: the policy's
            argmax; sampling: the speculative acceptance rule). Needs lazy.
        warn_intervention_rate: above this intervention rate the statistics carry a warning.
    """

    def __init__(self, base: Model, guide: Model | None = None, *, anti: Model | None = None,
                 method: str = "blendin", gamma: float = 0.4, alpha: float | str = "auto",
                 beta: float = 1.0, lambda_: float = 0.5, max_intervention_rate: float | None = None,
                 lazy: bool = True, speculative: bool = False, draft_max: int = 8,
                 warn_intervention_rate: float = 0.5):
        for name, m in (("base", base), ("guide", guide), ("anti", anti)):
            if m is not None and not isinstance(m, Model):
                raise TypeError(f"{name} must be a blendin_cpp.Model, got {type(m).__name__}")
        self.base, self.guide, self.anti = base, guide, anti
        self._engine = _core.Engine(base._handle, guide._handle if guide else None, anti._handle if anti else None)
        self.defaults: dict = {}
        self.configure(method=method, gamma=gamma, alpha=alpha, beta=beta, lambda_=lambda_,
                       max_intervention_rate=max_intervention_rate, lazy=lazy, speculative=speculative,
                       draft_max=draft_max, warn_intervention_rate=warn_intervention_rate)
        self.last_stats: dict = {}
        self._current = None
        self._scales = self._adapter_scales()

    def _adapter_scales(self) -> tuple:
        return tuple(tuple(m.adapter_scales()) for m in (self.base, self.guide, self.anti) if m is not None)

    def configure(self, **settings) -> None:
        """Change the default blending settings (method, gamma, alpha, beta, lambda_,
        max_intervention_rate, lazy, speculative, draft_max, warn_intervention_rate) for later
        generations."""
        merged = {**self.defaults, **settings}
        self._policy_args(merged)  # validate before keeping anything
        self.defaults = merged

    def _policy_args(self, s: dict) -> dict:
        unknown = set(s) - {"method", "gamma", "alpha", "beta", "lambda_", "max_intervention_rate", "lazy",
                            "speculative", "draft_max", "warn_intervention_rate"}
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        method = s["method"]
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        if method != "base" and self.guide is None:
            raise ValueError(f"method {method!r} needs a guide model")
        if method == "proxy" and self.anti is None:
            raise ValueError("method 'proxy' needs anti= (the guide's untuned sibling)")
        alpha = s["alpha"]
        alpha = -1.0 if alpha == "auto" else _float("alpha", alpha, lo=0, hi=1)
        cap = s["max_intervention_rate"]
        return dict(method=method, gamma=_float("gamma", s["gamma"], lo=0), alpha=alpha,
                    beta=_float("beta", s["beta"]), lambda_=_float("lambda_", s["lambda_"]),
                    max_intervention_rate=1.0 if cap is None else _float("max_intervention_rate", cap, lo=0, hi=1),
                    lazy=bool(s["lazy"]), speculative=bool(s["speculative"]),
                    draft_max=_int("draft_max", s["draft_max"], lo=1),
                    warn_intervention_rate=_float("warn_intervention_rate", s["warn_intervention_rate"], lo=0, hi=1))

    # --- prompts ------------------------------------------------------------------------------
    def prompts(self, prompt: str | Sequence[dict], guide_prompt: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids for the base and the guide. A string prompt goes to the base as it is and to
        the guide through its chat template as one user message; a list of chat messages goes to
        the base as a plain transcript (`base_transcript`) and to the guide through its
        template. `guide_prompt` overrides the guide's text (control tokens are parsed)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("the prompt is empty")
            base_text, messages = prompt, [{"role": "user", "content": prompt}]
        else:
            messages = list(prompt)
            base_text = base_transcript(messages)
        base_tokens = self.base.tokenize(base_text, add_special=True, special=False)
        guide_tokens: list[int] = []
        if self.guide is not None:
            if guide_prompt is None:
                guide_prompt = self.guide.render_chat(messages) if self.guide.chat_template else base_text
            elif not isinstance(guide_prompt, str) or not guide_prompt.strip():
                raise ValueError("guide_prompt must be a non-empty string")
            guide_tokens = self.guide.tokenize(guide_prompt, add_special=False, special=True)
            bos = self.guide.special_tokens["bos"]
            if self.guide._handle.add_bos and bos >= 0 and (not guide_tokens or guide_tokens[0] != bos):
                guide_tokens.insert(0, bos)
        return base_tokens, guide_tokens

    # --- generation ---------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[dict], guide_prompt: str | None = None, *, max_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int = 0, stop: Sequence[str] | str = (), top_logprobs: int = 0, ignore_eos: bool = False,
                 **settings) -> Iterator[Step]:
        """Stream a generation, one Step per token (each `next()` is one C++ step with the GIL
        released). Step texts never split a UTF-8 character; concatenated they are the output.
        `ignore_eos` gives end tokens probability 0 (generation then ends at max_tokens, a stop
        string or a full context). `settings` override the blender's defaults for this call
        (method=, gamma=, ...).
        Statistics of the finished generation are in `self.last_stats`."""
        params = self.gen_params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 min_p=min_p, seed=seed, stop=stop, top_logprobs=top_logprobs, ignore_eos=ignore_eos,
                                 settings=settings)
        run = self._start(prompt, guide_prompt, params)
        return self._steps(run)

    def complete(self, prompt: str | Sequence[dict], guide_prompt: str | None = None, **kwargs) -> Completion:
        """Generate to the end: the text, the tokens, every step and the statistics."""
        steps = list(self.generate(prompt, guide_prompt, **kwargs))
        return Completion(text="".join(s.text for s in steps), tokens=[s.token for s in steps], steps=steps,
                          stats=dict(self.last_stats))

    def reset(self) -> None:
        """Forget what the KV caches hold (the next prompt is read in full)."""
        self._current = None
        self._engine.reset()

    def gen_params(self, *, max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=(),
                   top_logprobs=0, ignore_eos=False, settings=None) -> "_core.GenParams":
        """Validated parameters of one generation (the blender's defaults, overridden by `settings`)."""
        policy = self._policy_args({**self.defaults, **(settings or {})})
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop must be a list of non-empty strings")
        return _core.GenParams(
            method=policy["method"], gamma=policy["gamma"], alpha=policy["alpha"], beta=policy["beta"],
            lambda_=policy["lambda_"], max_intervention_rate=policy["max_intervention_rate"], overlap_k=10,
            temperature=_float("temperature", temperature, lo=0), top_k=_int("top_k", top_k, lo=0),
            top_p=_float("top_p", top_p, lo=0, hi=1), min_p=_float("min_p", min_p, lo=0, hi=1),
            seed=_int("seed", seed, lo=0), max_tokens=_int("max_tokens", max_tokens, lo=1), stop=stop,
            lazy=policy["lazy"], warn_intervention_rate=policy["warn_intervention_rate"],
            top_logprobs=_int("top_logprobs", top_logprobs, lo=0), speculative=policy["speculative"],
            draft_max=policy["draft_max"], ignore_eos=bool(ignore_eos))

    def _start(self, prompt, guide_prompt, params):
        base_tokens, guide_tokens = self.prompts(prompt, guide_prompt)
        scales = self._adapter_scales()
        if scales != self._scales:  # cached tokens were computed with the old adapter scales
            self._engine.reset()
            self._scales = scales
        self._engine.start(base_tokens, guide_tokens, params)
        run = object()
        self._current = run
        return run

    def _steps(self, run) -> Iterator[Step]:
        engine = self._engine
        while True:
            if self._current is not run:
                raise RuntimeError("this generation was superseded by a newer one on the same Blender")
            t = engine.step()
            if t is None:
                return
            (token, text, source, pb, pg, alpha, agree, overlap, intervened, finish, logprob, top, rank, above,
             unmatched) = t
            step = Step(token=token, text=text.decode("utf-8", errors="replace"), source=source,
                        pb_max=_num(pb), pg_max=_num(pg), alpha=_num(alpha), agree=_num(agree),
                        overlap=_num(overlap), intervened=intervened, finish_reason=finish or None,
                        logprob=logprob, top_logprobs=tuple(top), guide_rank=rank or None,
                        mass_above=_num(above), unmatched=_num(unmatched))
            if finish:
                self.last_stats = engine.stats()
                self._current = None
            yield step
            if finish:
                return
