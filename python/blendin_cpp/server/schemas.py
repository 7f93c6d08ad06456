"""Request bodies and errors, in OpenAI's shapes. The ranges of the blending and sampling fields
are the core's (`blendin_cpp.blender.RANGES`): the server repeats none of them."""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..blender import METHODS, RANGES

OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def core_field(name: str, **extra):
    """A pydantic Field with the core's range for parameter `name` (default None: the server's
    default; `default=...` to leave it out, for a member of a Union)."""
    lo, hi, lo_open, hi_open, _integer, _text = RANGES[name]
    bounds = {}
    if math.isfinite(lo):
        bounds["gt" if lo_open else "ge"] = lo
    if math.isfinite(hi):
        bounds["lt" if hi_open else "le"] = hi
    if not (math.isfinite(lo) or math.isfinite(hi)):
        bounds["allow_inf_nan"] = False
    return Field(**{"default": None, **bounds, **extra})


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request bodies ---------------------------------------------------------------------------------
# strict: no "0.5" for 0.5 and no true for 1; extra="forbid": a misspelt field is an error, not ignored
_STRICT = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Request(BaseModel):
    """The fields chat and completion requests share: OpenAI's sampling names, then the blending
    and sampler knobs that the openai client sends as extra body fields."""
    model_config = _STRICT
    model: Optional[str] = None
    max_tokens: Optional[int] = core_field("max_tokens")
    temperature: Optional[float] = core_field("temperature")
    top_p: Optional[float] = core_field("top_p")
    seed: Optional[int] = core_field("seed", lt=2 ** 64)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # n > 1 or best_of: candidates as parallel sequences (best-of-N, not streamed); with best_of,
    # the n with the highest implicit reward (guide minus base log-likelihood) of best_of
    n: int = Field(default=1, ge=1, le=16)
    best_of: Optional[int] = Field(default=None, ge=1, le=16)
    # the repetition controls (blender.REPETITION): OpenAI's penalties, llama.cpp's repeat penalty
    # and DRY, and the loop-aware gate
    presence_penalty: Optional[float] = core_field("presence_penalty")
    frequency_penalty: Optional[float] = core_field("frequency_penalty")
    repeat_penalty: Optional[float] = core_field("repeat_penalty")
    repeat_last_n: Optional[int] = core_field("repeat_last_n")
    dry_multiplier: Optional[float] = core_field("dry_multiplier")
    dry_base: Optional[float] = core_field("dry_base")
    dry_allowed_length: Optional[int] = core_field("dry_allowed_length")
    dry_sequence_breakers: Optional[list[Annotated[str, Field(min_length=1)]]] = None
    loop_gate: Optional[int] = core_field("loop_gate")
    user: Optional[str] = None
    method: Optional[Literal[METHODS]] = None
    gamma: Optional[float] = core_field("gamma")
    alpha: Union[Annotated[float, core_field("alpha", default=...)], Literal["auto"], None] = None
    beta: Optional[float] = core_field("beta")
    lambda_: Optional[float] = core_field("lambda", alias="lambda")
    max_intervention_rate: Optional[float] = core_field("max_intervention_rate")
    guide_ends: Optional[bool] = None
    top_k: Optional[int] = core_field("top_k")
    min_p: Optional[float] = core_field("min_p")
    # as llama-server and vLLM: end tokens are never chosen, so the answer runs to max_tokens or a stop
    ignore_eos: bool = False
    # Alignment Vector scales by name (the --av files' stems); the others keep their start-up value
    av_scales: Optional[dict[str, float]] = None
    # per-token diagnostics (source, alpha, pb_max, pg_max, ...: `generate --json --trace`'s "steps"):
    # each streamed chunk carries its token's, a whole answer all of them
    trace: bool = False
    # Fields clients send with values that change nothing here: accepted with those values only
    # (check_no_ops names the field otherwise). `metadata` labels a stored completion; nothing is stored.
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict[str, Any]] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _STRICT
    role: Literal[tuple(OPENAI_ROLES)]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": OPENAI_ROLES[self.role], "content": text}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = core_field("max_tokens")
    logprobs: bool = False
    top_logprobs: Optional[int] = core_field("top_logprobs")
    # no tools exist here, so these change nothing (see check_no_ops)
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_Request):
    # a string, token ids, or a list of either: one choice per prompt, in order
    prompt: Union[str, TokenIds, list[str], list[TokenIds]]
    logprobs: Optional[int] = core_field("top_logprobs")
    # echo: the prompt comes back before the completion, with its tokens' log-probabilities under the
    # policy when logprobs is set (the first token's is null)
    echo: bool = False
    suffix: Optional[str] = None


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize (the completion form)."""
    model_config = _STRICT
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize."""
    model_config = _STRICT
    model: Optional[str] = None
    tokens: TokenIds


def check_no_ops(req) -> None:
    """Fields that clients send with default values are accepted with the values that change nothing
    here; any other value is an error naming the field (never silently ignored)."""
    def refuse(name: str, why: str):
        raise ApiError(400, f"{name}: {why}", param=name, code="unsupported_value")
    if req.logit_bias:
        refuse("logit_bias", "biasing tokens is not supported; send {} or leave it out")
    if req.response_format is not None and req.response_format != {"type": "text"}:
        refuse("response_format", 'only {"type": "text"} is supported (no JSON modes or schemas)')
    if req.store:
        refuse("store", "this server stores nothing; send false or leave it out")
    if isinstance(req, ChatRequest) and req.tool_choice not in (None, "none", "auto"):
        refuse("tool_choice", 'tools are not supported; send "none" or leave it out')
    if isinstance(req, CompletionRequest) and req.suffix:
        refuse("suffix", "completing before a suffix is not supported; send null or leave it out")


_FIELDS = {f.alias or name for m in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions,
                                     TokenizeRequest, DetokenizeRequest)
           for name, f in m.model_fields.items()}


def validation_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    loc = []
    for part in err["loc"]:
        if not (isinstance(part, int) or part in _FIELDS):
            break  # pydantic names the member of a Union it tried ("str", "constrained-float"): not a field
        loc.append(str(part))
    param = ".".join(loc) or None
    kind = err["type"]
    if kind == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {err['msg']}", code="invalid_json")
    if kind == "model_type" and not loc:
        return ApiError(400, "the body must be a JSON object", code="invalid_json")
    if kind == "extra_forbidden":
        name = ".".join(map(str, err["loc"]))
        return ApiError(400, f"unknown parameter {name!r}", param=name, code="unknown_parameter")
    if loc[:1] == ["prompt"] and kind != "missing":
        return ApiError(400, "invalid value for 'prompt': it must be a string, a list of token ids (integers >= 0), "
                        "or a list of strings or of token-id lists", param=param, code="invalid_value")
    if kind == "missing":
        return ApiError(400, f"missing required parameter {param!r}", param=param, code="missing_required_parameter")
    return ApiError(400, f"invalid value for {param!r}: {err['msg']}", param=param, code="invalid_value")
