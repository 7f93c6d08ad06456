"""`Blender`: a base and a guide decoded together, one token per `next()` (docs/design.md sections 3, 5)."""
from __future__ import annotations

import operator
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from . import _core
from ._core import BlendError
from .chat_template import base_transcript, check_messages
from .model import Model
from .text import check_text

METHODS = tuple(_core.methods())
# a generation's numeric parameters and their ranges, as the core checks them
RANGES = _core.param_ranges()
SPECULATIVE = ("off", "on", "auto")  # as the core spells them (Python, CLI, JSON and C++ alike)
# The repetition controls (OpenAI's presence and frequency penalties, llama.cpp's repeat_penalty and
# DRY, and the loop-aware gate) with the core's defaults, which change nothing.
REPETITION = {name: getattr(_core.GenParams(), name) for name in (
    "presence_penalty", "frequency_penalty", "repeat_penalty", "repeat_last_n", "dry_multiplier", "dry_base",
    "dry_allowed_length", "dry_sequence_breakers", "loop_gate")}

Step = _core.Step


class PromptTokens(NamedTuple):
    """A prompt already tokenized for both models (what `Blender.prompts` returns); `generate`
    and `complete` take it as the prompt, so that a caller that needed the tokens (to check the
    context, say) does not tokenize twice."""
    base: list[int]
    guide: list[int]


@dataclass
class Score:
    """What `Blender.score` returns: for each token of the continuation, its log-probability
    under the policy (temperature 1), where it came from (`base`, `blend`, `guide`) and the
    policy's Step (pb_max, alpha, top_logprobs, ...; a scored step releases no `text`: the tokens
    are given)."""
    tokens: list[int]
    logprobs: list[float]
    sources: list[str]
    steps: list[Step]
    stats: dict = field(default_factory=dict)

    @property
    def logprob(self) -> float:
        """The log-likelihood of the whole continuation (the sum)."""
        return float(sum(self.logprobs))


class PromptsFailed(BlendError):
    """`Blender.complete_many` when some prompts failed (each alone: the others ran to their ends).
    `results[i]` is prompt i's Completion, None where it failed; `errors` maps the index of each
    failed prompt to its exception (ValueError: the prompt's own parameters or input, such as
    ignore_eos where the policy can only end; BlendError otherwise)."""

    def __init__(self, results: list, errors: dict):
        self.results, self.errors = results, errors
        shown = "; ".join(f"prompt {i}: {e}" for i, e in sorted(errors.items())[:3])
        more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
        super().__init__(f"{len(errors)} of {len(results)} prompts failed ({shown}{more}); "
                         "the others' results are in .results")


@dataclass
class Completion:
    text: str
    tokens: list[int]
    steps: list[Step]
    stats: dict = field(default_factory=dict)

    @property
    def finish_reason(self) -> str | None:
        return self.stats.get("finish_reason")


def _is_token_list(x) -> bool:
    """A list (or tuple) of integers: token ids, not a chat."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in x)


def _number(name: str, value) -> float:
    """Python's part of the checks: the type; then the core's range, on the value as given (the
    core keeps a float: 1e300 would reach it as inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    _core.check_param(name, float(value))
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


# the arguments of a generation that are not blending settings (see `Blender.generate`)
_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "top_logprobs", "ignore_eos",
             "diagnostics", *REPETITION)


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
        speculative: "on": a drafter proposes up to `draft_max` tokens and the base verifies them
            in one batch; every emitted token still follows the policy exactly (greedy: the
            policy's argmax; sampling: the speculative acceptance rule). "auto": only where a
            batch is measured to cost less than the decodes it saves. "off": never. Needs lazy.
        drafter: "guide" (the guide drafts) or "ngram" (tokens looked up in the context: free).
        warn_intervention_rate: above this intervention rate the statistics carry a warning.
        guide_ends: the guide decides where an answer ends (nudging, blendin): at each sentence
            or line end it is asked, and wherever it is consulted and its top token is an end token, the
            answer ends (off: as the papers, only the mixed distribution's token ends it).
    """

    SETTINGS = ("method", "gamma", "alpha", "beta", "lambda_", "max_intervention_rate", "lazy", "speculative",
                "drafter", "draft_max", "warn_intervention_rate", "guide_ends")

    def __init__(self, base: Model, guide: Model | None = None, *, anti: Model | None = None,
                 method: str = "blendin", gamma: float = 0.4, alpha: float | str = "auto",
                 beta: float = 1.0, lambda_: float = 0.5, max_intervention_rate: float | None = None,
                 lazy: bool = True, speculative: str = "off", drafter: str = "guide", draft_max: int = 8,
                 warn_intervention_rate: float = 0.5, guide_ends: bool = False):
        for name, m in (("base", base), ("guide", guide), ("anti", anti)):
            if m is not None and not isinstance(m, Model):
                raise TypeError(f"{name} must be a blendin_cpp.Model, got {type(m).__name__}")
        self.base, self.guide, self.anti = base, guide, anti
        self._engine = _core.Engine(base._handle, guide._handle if guide else None, anti._handle if anti else None)
        self.defaults: dict = {}
        self.configure(method=method, gamma=gamma, alpha=alpha, beta=beta, lambda_=lambda_,
                       max_intervention_rate=max_intervention_rate, lazy=lazy, speculative=speculative,
                       drafter=drafter, draft_max=draft_max, warn_intervention_rate=warn_intervention_rate,
                       guide_ends=guide_ends)
        self.last_stats: dict = {}
        # `_current` names the one generation whose generator may step the engine; the lock makes
        # "check it, then step" and "replace it, then start" one move each, across threads
        self._current = None
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread holding _lock

    @contextmanager
    def _turn(self):
        """Hold the Blender for one engine call; another thread meanwhile gets a BlendError at
        once, as the core's own leases do."""
        if not self._lock.acquire(blocking=False):
            if self._owner == threading.get_ident():
                raise BlendError("this Blender is busy with a call on this same thread (complete_many's on_done "
                                 "cannot use it: keep what it needs and call after complete_many returns)")
            raise BlendError("this Blender is in use by another thread: it serves one call at a time "
                             "(serialize the calls, or give each thread its own)")
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()

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
    def prompts(self, prompt: str | Sequence[dict] | Sequence[int], guide_prompt: str | Sequence[dict] | None = None,
                *, template: bool = True) -> PromptTokens:
        """Token ids for the base and the guide. A string prompt goes to the base as it is and to
        the guide through its chat template as one user message; a list of chat messages goes to
        the base as a plain transcript (`base_transcript`) and to the guide through its
        template (`Model.chat_tokens`: the template's markers are control tokens, the messages'
        text is text); a list of base token ids goes to the base as given and to the guide as its
        text. A guide without a template reads the base's text. `guide_prompt` overrides the
        guide's prompt: chat messages, or its exact text (whose control-token text is parsed: for
        a caller who wrote the markers). `template=False`: the guide reads the prompt as plain
        text, as the base does (no chat template): the base's very tokens on a shared vocabulary,
        else the text through its own tokenizer (the view of `score(..., template=False)` and of
        the server's echo). A prompt that cannot fit a model's context raises ContextLengthError
        before it is tokenized."""
        if isinstance(prompt, PromptTokens):
            return prompt
        base_tokens = None
        if isinstance(prompt, str):
            check_text("the prompt", prompt)
            if not prompt.strip():
                raise ValueError("the prompt is empty")
            base_text, messages = prompt, [{"role": "user", "content": prompt}]
        elif _is_token_list(prompt):
            base_tokens = self._base_tokens(prompt, "prompt")
            base_text = self.base.detokenize(base_tokens)
            messages = [{"role": "user", "content": base_text}]
        else:
            messages = check_messages(prompt)
            base_text = base_transcript(messages)
        if base_tokens is None:
            self.base.check_fits(base_text, "the base's prompt")
            base_tokens = self.base.tokenize(base_text, add_special=True, special=False)
        guide_tokens: list[int] = []
        guide = self.guide
        if guide is not None and not template and guide_prompt is None:
            return PromptTokens(base_tokens, self._plain_guide_tokens(base_tokens, base_text))
        if guide is not None:
            if guide_prompt is None and guide.chat_template:
                guide_prompt = messages
            if guide_prompt is None:
                guide.check_fits(base_text, "the guide's prompt")
                guide_tokens = guide.tokenize(base_text, add_special=False, special=False)
            elif isinstance(guide_prompt, str):
                check_text("guide_prompt", guide_prompt)
                if not guide_prompt.strip():
                    raise ValueError("guide_prompt must be a non-empty string or chat messages")
                guide.check_fits(guide_prompt, "guide_prompt")
                guide_tokens = guide.tokenize(guide_prompt, add_special=False, special=True)
            else:
                guide_tokens = guide.chat_tokens(guide_prompt)
            bos = guide.special_tokens["bos"]
            if guide._handle.add_bos and bos >= 0 and (not guide_tokens or guide_tokens[0] != bos):
                guide_tokens.insert(0, bos)
        return PromptTokens(base_tokens, guide_tokens)

    def _base_tokens(self, tokens, what: str) -> list[int]:
        ids = [int(t) for t in tokens]
        if not ids:
            raise ValueError(f"the {what} is empty")
        n = self.base.n_vocab
        for t in ids:
            if not 0 <= t < n:
                raise ValueError(f"the {what} has token {t}, outside the base's vocabulary of {n} tokens")
        return ids

    def _plain_guide_tokens(self, base_tokens: list[int], text: str) -> list[int]:
        """The guide reading a prompt as plain text: the same tokens on a shared vocabulary; else
        the text through its tokenizer (with the start token it adds), or its BOS (else its end
        token, which such models read between documents) when that leaves nothing to read."""
        if not self._engine.bridged:
            return list(base_tokens)
        tokens = self.guide.tokenize(text, add_special=True, special=False)
        if not tokens:
            special = self.guide.special_tokens
            tokens = [special["bos"] if special["bos"] >= 0 else special["eos"]]
        return tokens

    # --- scoring ------------------------------------------------------------------------------
    def score(self, prompt: str | Sequence[dict] | Sequence[int] | PromptTokens, continuation: str | Sequence[int],
              guide_prompt: str | None = None, *, template: bool = True, top_logprobs: int = 0,
              **settings) -> Score:
        """The policy's log-likelihood of `continuation` after `prompt`, token by token (teacher
        forcing): at each position the distribution the method's decoding computes there at
        temperature 1 (the gate, alpha, the mixture, proxy, DeRa; inside a word nudging_word
        started, the guide's probability of going on, as its decoding sees it), from both models'
        logits read in batched passes. The prompt is read as `generate` reads it (`template=False`:
        both models read it as plain text, as the server's echo does). A string continuation is
        tokenized on its own (no start token); pass base token ids to choose the split.
        `settings` override the blender's defaults (method=, gamma=, ...)."""
        if isinstance(continuation, str):
            cont = self.base.tokenize(continuation, add_special=False, special=False)
            if not cont:
                raise ValueError("the continuation is empty")
        elif _is_token_list(continuation):
            cont = self._base_tokens(continuation, "continuation")
        else:
            raise TypeError("continuation must be a string or a list of base token ids")
        params = self.gen_params(top_logprobs=top_logprobs, settings={**self.defaults, **settings})
        base_tokens, guide_tokens = self.prompts(prompt, guide_prompt, template=template)
        self._current = None  # a generation in progress ends here
        steps = self._engine.score(base_tokens, guide_tokens, cont, params)
        stats = self._engine.stats().as_dict()
        self.last_stats = stats
        return Score(tokens=[s.token for s in steps], logprobs=[s.logprob for s in steps],
                     sources=[s.source for s in steps], steps=steps, stats=stats)

    # --- generation ---------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[dict] | PromptTokens, guide_prompt: str | Sequence[dict] | None = None, *,
                 max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int = 0, stop: Sequence[str] | str = (), top_logprobs: int = 0,
                 ignore_eos: bool = False, diagnostics: bool = False, **settings) -> Iterator[Step]:
        """Stream a generation, one Step per token (each `next()` is one C++ step with the GIL
        released). Step texts never split a UTF-8 character; concatenated they are the output.
        `ignore_eos` gives end tokens probability 0 (generation then ends at max_tokens, a stop
        string or a full context). `diagnostics` adds the vocabulary-sized diagnostics to the
        consulted steps (overlap, guide_rank, mass_above). `settings` override the blender's
        defaults for this call (method=, gamma=, ...); the repetition controls (REPETITION: presence_penalty,
        frequency_penalty, repeat_penalty, repeat_last_n, dry_multiplier, dry_base, dry_allowed_length,
        dry_sequence_breakers, loop_gate) are taken here too.
        Statistics of the finished generation are in `self.last_stats`."""
        repetition = {k: settings.pop(k) for k in list(settings) if k in REPETITION}
        params = self.gen_params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 min_p=min_p, seed=seed, stop=stop, top_logprobs=top_logprobs, ignore_eos=ignore_eos,
                                 diagnostics=diagnostics, settings={**self.defaults, **settings}, **repetition)
        base_tokens, guide_tokens = self.prompts(prompt, guide_prompt)
        run = object()
        with self._turn():
            # before the start: an older generator must not step the new state, nor go on if the
            # start fails halfway (the engine may have replaced its state already)
            self._current = run
            self._engine.start(base_tokens, guide_tokens, params)
        return self._steps(run)

    def complete(self, prompt: str | Sequence[dict] | PromptTokens, guide_prompt: str | Sequence[dict] | None = None,
                 **kwargs) -> Completion:
        """Generate to the end: the text, the tokens, every step and the statistics."""
        steps = list(self.generate(prompt, guide_prompt, **kwargs))
        return Completion(text="".join(s.text for s in steps), tokens=[s.token for s in steps], steps=steps,
                          stats=dict(self.last_stats))

    def complete_many(self, prompts: Sequence[str | Sequence[dict] | Sequence[int] | PromptTokens], *,
                      parallel: int | None = None, on_done=None, **kwargs) -> list[Completion]:
        """Generate every prompt to the end, decoded together (continuous batching): up to
        `parallel` at once, each in its own KV sequence of every model, one batched decode per
        model and phase per step; the next prompt starts as soon as one finishes. Each result is
        the one `complete(prompt, **kwargs)` gives alone (tokens, text, statistics; the seed of
        `kwargs` for each prompt; bit for bit on quantized models on the CPU, docs/server.md);
        speculative verification is not used (greedy tokens are the same). `parallel` defaults
        to the models' n_seq_max; each prompt gets a sequence's n_ctx // n_seq_max tokens (load
        the models with n_ctx = n_seq_max x the context one prompt needs).
        `on_done(index, completion)` is called as each finishes (for progress; it cannot call
        this Blender). The statistics' decode counts are the models' while the prompt ran
        (shared with the prompts batched with it); prefill_s runs from the call to its first token.
        A prompt that fails while it runs ends alone; the others run to their ends, and then
        PromptsFailed carries every result (None where a prompt failed) and each failure."""
        if isinstance(prompts, (str, bytes, PromptTokens)) or _is_token_list(prompts):
            raise TypeError("complete_many takes a list of prompts; a single prompt (a string, token ids, "
                            "PromptTokens) goes in a list of one, or to complete()")
        prompts = list(prompts)
        if not prompts:
            return []
        limit = min(m.n_seq_max for m in self._models())
        if parallel is None:
            parallel = min(len(prompts), limit)
        parallel = _integer("parallel", parallel)
        if not 1 <= parallel <= limit:
            raise ValueError(f"parallel must be in 1..{limit} (the models' n_seq_max), got {parallel}")
        slot_ctx = min(m.n_ctx_seq for m in self._models())
        guide_prompt = kwargs.pop("guide_prompt", None)
        params = self.gen_params(**{k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING},
                                 settings={**self.defaults, **kwargs})
        tokens = [self.prompts(p, guide_prompt) for p in prompts]
        results: list[Completion | None] = [None] * len(prompts)
        errors: dict[int, Exception] = {}
        with self._turn():
            self._current = None  # a generation in progress ends here
            scheduler = _core.Scheduler(self._engine, parallel, slot_ctx)
            index = {scheduler.add(t.base, t.guide, params): i for i, t in enumerate(tokens)}
            steps: dict[int, list[Step]] = {i: [] for i in index}
            while not scheduler.idle:
                for rid, step, stats, error in scheduler.step():
                    if error is not None:  # this prompt alone ends; the others go on
                        errors[index[rid]] = error
                        steps.pop(rid)
                        continue
                    steps[rid].append(step)
                    if stats is not None:
                        done = steps.pop(rid)
                        c = Completion(text="".join(s.text for s in done), tokens=[s.token for s in done],
                                       steps=done, stats=stats)
                        results[index[rid]] = c
                        if on_done is not None:
                            on_done(index[rid], c)
        if errors:
            raise PromptsFailed(results, errors)
        return results  # type: ignore[return-value]

    def _models(self) -> list[Model]:
        return list(self._roles().values())

    def _roles(self) -> dict[str, Model]:
        """{"base": ..., "guide": ..., "anti": ...}: the models given."""
        given = (("base", self.base), ("guide", self.guide), ("anti", self.anti))
        return {role: m for role, m in given if m is not None}

    def reset(self) -> None:
        """Empty the models' KV caches (the next prompt is read in full)."""
        with self._turn():
            self._current = None
            self._engine.reset()

    def gen_params(self, *, max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=(),
                   top_logprobs=0, ignore_eos=False, diagnostics=False, settings=None,
                   **repetition) -> "_core.GenParams":
        """The core's parameters of one generation: `settings` (the blending settings; the
        blender's defaults where absent), the sampling arguments and the repetition controls
        (REPETITION), converted to the core's types. The core checks the ranges when the
        generation starts (or at `.validate()`)."""
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
        if isinstance(s["speculative"], bool) or s["speculative"] not in SPECULATIVE:
            raise ValueError(f"speculative must be 'off', 'on' or 'auto', not {s['speculative']!r}")
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        if any(not isinstance(x, str) for x in stop):
            raise TypeError("stop must be a string or a list of strings")
        for x in stop:
            check_text("stop", x)
        p = _core.GenParams()
        p.method = method
        p.gamma = _number("gamma", s["gamma"])
        p.alpha = -1.0 if s["alpha"] == "auto" else _number("alpha", s["alpha"])
        p.beta = _number("beta", s["beta"])
        p.lambda_ = _number("lambda", s["lambda_"])
        cap = s["max_intervention_rate"]
        p.max_intervention_rate = 1.0 if cap is None else _number("max_intervention_rate", cap)
        p.lazy = bool(s["lazy"])
        p.speculative = s["speculative"]
        p.drafter = s["drafter"]
        p.draft_max = _integer("draft_max", s["draft_max"])
        p.warn_intervention_rate = _number("warn_intervention_rate", s["warn_intervention_rate"])
        if not isinstance(s["guide_ends"], bool):
            raise TypeError(f"guide_ends must be True or False, got {s['guide_ends']!r}")
        p.guide_ends = s["guide_ends"]
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
        for name, value in repetition.items():
            if name not in REPETITION:
                raise TypeError(f"unknown argument {name!r}")
            if name == "dry_sequence_breakers":
                value = [value] if isinstance(value, str) else list(value)
                if any(not isinstance(x, str) for x in value):
                    raise TypeError("dry_sequence_breakers must be a string or a list of strings")
                for x in value:
                    check_text(name, x)
            elif isinstance(REPETITION[name], int):
                value = _integer(name, value)
            else:
                value = _number(name, value)
            setattr(p, name, value)
        return p

    def _steps(self, run) -> Iterator[Step]:
        engine = self._engine
        while True:
            with self._turn():
                if self._current is not run:
                    raise RuntimeError("this generation was superseded by a newer one on the same Blender")
                step = engine.step()
                if step is None:
                    return
                if step.finish_reason:
                    self.last_stats = engine.stats().as_dict()
                    self._current = None
            yield step  # not holding the lock: a paused generator blocks no one
            if step.finish_reason:
                return
