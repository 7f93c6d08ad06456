"""GET /v1/parameters: the request fields a client may set to steer a generation, each with the
server's default and the core's range, so that a client (the chat page's settings panel) builds its
form from the server instead of repeating the table.

Each field also has `chat_default`: the value the chat page sends when its field is empty. That is
the terminal chat's default (`chat.CHAT_DEFAULTS`: greedy, guide_ends and the repetition controls
that keep small models from looping) unless `serve` was started with its own value for the field
(one other than the core's default: `serve --frequency-penalty 0` cannot be told from no value).
API clients that send nothing get the server's defaults (OpenAI's: no penalties), as before.

A field is listed when the request schema has it and the core has a range for it
(`blendin_cpp.blender.RANGES`), or when its value is one of some names (`method`; `alpha` also takes
"auto"): a parameter added to both appears here with no change to this file."""
from __future__ import annotations

import math
import typing

from .._core import GenParams
from ..blender import METHODS, RANGES, REPETITION
from ..chat import CHAT_DEFAULTS, default_system
from .schemas import ChatRequest

# top_logprobs is in both tables, but it is OpenAI's log-probability output, not a knob of the
# generation, and means nothing without `logprobs`
NOT_SETTINGS = {"top_logprobs"}


def _names(annotation) -> list[str]:
    """The string values a field's type allows (its Literal members), in order."""
    if typing.get_origin(annotation) is typing.Literal:
        return [a for a in typing.get_args(annotation) if isinstance(a, str)]
    return [n for arg in typing.get_args(annotation) for n in _names(arg)]


def _bound(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity: null is "no bound"


def _core_default(name: str):
    """What the core does when nothing asks otherwise (serve's options default to it)."""
    if name in REPETITION:
        return REPETITION[name]
    return False if name == "guide_ends" else getattr(GenParams(), name, None)


def parameter_table(server) -> dict:
    """{"parameters": [{name, type, default, chat_default, min, max, min_exclusive, max_exclusive,
    range, choices}...], "av_scales": {name: start-up scale}, "system": the terminal chat's system
    prompt for this pair (null for the demo pair), which the chat page sends first} for this
    server's models."""
    blender = server.blender
    defaults = {**server.defaults, **{"lambda" if k == "lambda_" else k: v for k, v in blender.defaults.items()}}
    runnable = [m for m in METHODS if (m == "base" or blender.guide is not None)
                and (m != "proxy" or blender.anti is not None)]
    out = []
    for field_name, f in ChatRequest.model_fields.items():
        name = f.alias or field_name
        # an Optional[bool] (None: the server's default) is a switch of the generation: guide_ends
        switch = f.annotation == typing.Optional[bool]
        choices = runnable if name == "method" else [True, False] if switch else _names(f.annotation)
        if name in NOT_SETTINGS or not (name in RANGES or choices):
            continue
        default = defaults.get(name)
        chat = CHAT_DEFAULTS[name] if name in CHAT_DEFAULTS and name != "max_tokens" \
            and default == _core_default(name) else default  # serve's own value wins
        p = {"name": name, "type": "boolean" if switch else "choice", "default": default, "chat_default": chat,
             "choices": choices}
        if name in RANGES:
            lo, hi, lo_open, hi_open, integer, text = RANGES[name]
            if name == "max_tokens":  # the server's own limit, within the core's range
                hi, hi_open, text = server.max_tokens_limit, False, f"in [1, {server.max_tokens_limit}]"
            p.update(type="integer" if integer else "number", min=_bound(lo), max=_bound(hi),
                     min_exclusive=lo_open, max_exclusive=hi_open, range=text)
        out.append(p)
    av = dict(zip(blender.base.adapter_names, server.av_defaults))
    return {"parameters": out, "av_scales": av, "system": default_system(blender)}
