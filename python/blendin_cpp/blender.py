"""`Blender`: a base and a guide decoded together, one token per `next()` (docs/design.md sections 3, 5)."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

from . import _core
from .chat_template import base_transcript
from .model import Model

METHODS = tuple(_core.methods())
# a generation's numeric parameters and their ranges, as the core checks them
RANGES = _core.param_ranges()
SPECULATIVE = {False: "off", True: "on", "auto": "auto"}

Step = _core.Step


class PromptTokens(NamedTuple):
    """A prompt already tokenized for both models (what `Blender.prompts` returns); `generate`
    and `complete` take it as the prompt, so that a caller that needed the tokens (to check the
    context, say) does not tokenize twice."""
    base: list[int]
    guide: list[int]


@dataclass
class Completion:
    text: str
    tokens: list[int]
    steps: list[Step]
    stats: dict = field(default_factory=dict)

    @property
    def finish_reason(self) -> str | None:
        return self.stats.get("finish_reason")


def _number(name: str, value) -> float:
    """Python's part of the checks: the type. The range is the core's (GenParams.validate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


INT32 = 2 ** 31  # the core's integers are 32-bit


def _integer(name: str, value, *, int32: bool = True) -> int:
    """Python's part of the checks: the type, and what the core's 32-bit integers hold (beyond
    that the binding could not even pass the value on). The range is the core's."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if int32 and not -INT32 <= value < INT32:
        if name not in RANGES:
            raise ValueError(f"{name} must be a 32-bit integer, got {value}")
        hi, text = RANGES[name][1], RANGES[name][5]
        raise ValueError(f"{name} must be an integer {text}{' and below 2^31' if hi >= INT32 else ''}, got {value}")
    return value


class Blender:
    """Decode a base and a guide model together.

    Args:
        base: the pretrained model (plain completion prompt).
        guide: the instruction-tuned model (its own chat template). A guide with another
            vocabulary goes through a vocabulary bridge.
        anti: the guide's untuned sibling, needed by `proxy` only.
        method: one of METHODS.
        gamma: nudging/blendin intervene when the base's top probability is below gamma.
        alpha: blendin's mixing weight in [0, 1], or "auto" (BlendIn's adaptive weight).
        beta: proxy-tuning strength. lambda_: DeRa interpolation weight (> 1 extrapolates).
        max_intervention_rate: cap on the share of tokens the guide may steer (None = no cap).
        lazy: let the guide fall behind and catch up in one batch when it is consulted (exact);
            False runs the naive loop in which both models decode every token.
        speculative: True: a drafter proposes up to `draft_max` tokens and the base verifies them
            in one batch; every emitted token still follows the policy exactly (greedy: the
            policy's argmax; sampling: the speculative acceptance rule). "auto": only where a
            batch is measured to cost less than the decodes it saves. Needs lazy.
        drafter: "guide" (the guide drafts) or "ngram" (tokens looked up in the context: free).
        warn_intervention_rate: above this intervention rate the statistics carry a warning.
    """

    SETTINGS = ("method", "gamma", "alpha", "beta", "lambda_", "max_intervention_rate", "lazy", "speculative",
                "drafter", "draft_max", "warn_intervention_rate")

    def __init__(self, base: Model, guide: Model | None = None, *, anti: Model | None = None,
                 method: str = "blendin", gamma: float = 0.4, alpha: float | str = "auto",
                 beta: float = 1.0, lambda_: float = 0.5, max_intervention_rate: float | None = None,
                 lazy: bool = True, speculative: bool | str = False, drafter: str = "guide", draft_max: int = 8,
                 warn_intervention_rate: float = 0.5):
        for name, m in (("base", base), ("guide", guide), ("anti", anti)):
            if m is not None and not isinstance(m, Model):
                raise TypeError(f"{name} must be a blendin_cpp.Model, got {type(m).__name__}")
        self.base, self.guide, self.anti = base, guide, anti
        self._engine = _core.Engine(base._handle, guide._handle if guide else None, anti._handle if anti else None)
        self.defaults: dict = {}
        self.configure(method=method, gamma=gamma, alpha=alpha, beta=beta, lambda_=lambda_,
                       max_intervention_rate=max_intervention_rate, lazy=lazy, speculative=speculative,
                       drafter=drafter, draft_max=draft_max, warn_intervention_rate=warn_intervention_rate)
        self.last_stats: dict = {}
        self._current = None

    def configure(self, **settings) -> None:
        """Change the default blending settings (see SETTINGS) for later generations. The core
        checks them against the models before anything is kept (ranges, and what a guide with
        another vocabulary cannot do: dera, proxy, speculative verification)."""
        merged = {**self.defaults, **settings}
        self._engine.check(self.gen_params(settings=merged))
        self.defaults = merged

    def is_end(self, token: int) -> bool:
        """Whether `token` ends a generation: the base's end tokens and a same-vocabulary guide's
        (the core's one definition; a guide with another vocabulary ends through the base's)."""
        return self._engine.is_end(_integer("token", operator.index(token)))

    # --- prompts ------------------------------------------------------------------------------
    def prompts(self, prompt: str | Sequence[dict], guide_prompt: str | None = None) -> PromptTokens:
        """Token ids for the base and the guide. A string prompt goes to the base as it is and to
        the guide through its chat template as one user message; a list of chat messages goes to
        the base as a plain transcript (`base_transcript`) and to the guide through its
        template. `guide_prompt` overrides the guide's text (control tokens are parsed)."""
        if isinstance(prompt, PromptTokens):
            return prompt
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
        return PromptTokens(base_tokens, guide_tokens)

    # --- generation ---------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[dict] | PromptTokens, guide_prompt: str | None = None, *,
                 max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int = 0, stop: Sequence[str] | str = (), top_logprobs: int = 0,
                 ignore_eos: bool = False, diagnostics: bool = False, **settings) -> Iterator[Step]:
        """Stream a generation, one Step per token (each `next()` is one C++ step with the GIL
        released). Step texts never split a UTF-8 character; concatenated they are the output.
        `ignore_eos` gives end tokens probability 0 (generation then ends at max_tokens, a stop
        string or a full context). `diagnostics` adds the vocabulary-sized diagnostics to the
        consulted steps (overlap, guide_rank, mass_above). `settings` override the blender's
        defaults for this call (method=, gamma=, ...).
        Statistics of the finished generation are in `self.last_stats`."""
        params = self.gen_params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 min_p=min_p, seed=seed, stop=stop, top_logprobs=top_logprobs, ignore_eos=ignore_eos,
                                 diagnostics=diagnostics, settings={**self.defaults, **settings})
        base_tokens, guide_tokens = self.prompts(prompt, guide_prompt)
        self._engine.start(base_tokens, guide_tokens, params)
        run = object()
        self._current = run
        return self._steps(run)

    def complete(self, prompt: str | Sequence[dict] | PromptTokens, guide_prompt: str | None = None,
                 **kwargs) -> Completion:
        """Generate to the end: the text, the tokens, every step and the statistics."""
        steps = list(self.generate(prompt, guide_prompt, **kwargs))
        return Completion(text="".join(s.text for s in steps), tokens=[s.token for s in steps], steps=steps,
                          stats=dict(self.last_stats))

    def reset(self) -> None:
        """Empty the models' KV caches (the next prompt is read in full)."""
        self._current = None
        self._engine.reset()

    def gen_params(self, *, max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=(),
                   top_logprobs=0, ignore_eos=False, diagnostics=False, settings=None) -> "_core.GenParams":
        """The core's parameters of one generation: `settings` (the blending settings; the
        blender's defaults where absent) and the sampling arguments, converted to the core's
        types. The core checks the ranges when the generation starts (or at `.validate()`)."""
        s = {**self.defaults, **(settings or {})}
        unknown = set(s) - set(self.SETTINGS)
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        method = s["method"]
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        if method != "base" and self.guide is None:
            raise ValueError(f"method {method!r} needs a guide model")
        if method == "proxy" and self.anti is None:
            raise ValueError("method 'proxy' needs anti= (the guide's untuned sibling)")
        if s["speculative"] not in SPECULATIVE:
            raise ValueError(f"speculative must be False, True or 'auto', not {s['speculative']!r}")
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        if any(not isinstance(x, str) for x in stop):
            raise TypeError("stop must be a string or a list of strings")
        p = _core.GenParams()
        p.method = method
        p.gamma = _number("gamma", s["gamma"])
        p.alpha = -1.0 if s["alpha"] == "auto" else _number("alpha", s["alpha"])
        p.beta = _number("beta", s["beta"])
        p.lambda_ = _number("lambda", s["lambda_"])
        cap = s["max_intervention_rate"]
        p.max_intervention_rate = 1.0 if cap is None else _number("max_intervention_rate", cap)
        p.lazy = bool(s["lazy"])
        p.speculative = SPECULATIVE[s["speculative"]]
        p.drafter = s["drafter"]
        p.draft_max = _integer("draft_max", s["draft_max"])
        p.warn_intervention_rate = _number("warn_intervention_rate", s["warn_intervention_rate"])
        p.temperature = _number("temperature", temperature)
        p.top_k = _integer("top_k", top_k)
        p.top_p = _number("top_p", top_p)
        p.min_p = _number("min_p", min_p)
        p.seed = _integer("seed", seed, int32=False)  # 64 bits: the core checks
        p.max_tokens = _integer("max_tokens", max_tokens)
        p.stop = stop
        p.top_logprobs = _integer("top_logprobs", top_logprobs)
        p.ignore_eos = bool(ignore_eos)
        p.diagnostics = bool(diagnostics)
        return p

    def _steps(self, run) -> Iterator[Step]:
        engine = self._engine
        while True:
            if self._current is not run:
                raise RuntimeError("this generation was superseded by a newer one on the same Blender")
            step = engine.step()
            if step is None:
                return
            if step.finish_reason:
                self.last_stats = engine.stats().as_dict()
                self._current = None
            yield step
            if step.finish_reason:
                return
