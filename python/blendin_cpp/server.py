"""`python -m blendin_cpp serve`: an OpenAI-compatible HTTP server over one Blender.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /v1/models,
GET /health. The models are fixed when the server starts; a request can choose the blending
(`method`, `gamma`, `alpha`, `beta`, `lambda`, `max_intervention_rate`) and the sampling, never a
file. Chat requests give the base a plain transcript and the guide its chat template; a completion
prompt goes to the base as it is and to the guide as one user message (`Blender.generate`).

Concurrency: one Blender owns both models' KV caches, so generations never interleave. Requests
wait in FIFO order on an asyncio.Lock (its waiters are woken first come, first served). The holder
pulls its generator on one dedicated worker thread (each `next()` is a C++ step with the GIL
released), so the event loop keeps accepting, validating and queueing requests meanwhile, and no
two generation calls can ever overlap (prompts are tokenized outside the queue: that only reads
the vocabulary). A generation is pulled in bursts of at most PULL_S seconds; between bursts the
server notices a client that went away (Starlette cancels a streaming response when its client
disconnects; a plain one checks the connection), stops pulling and releases the lock at once: the
engine needs nothing else, the next request just starts. At most --max-queue requests wait; more
get 503. Requests that share a prefix with the previous one (a growing chat) reuse the KV cache.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from .options import add_blend_args, add_model_args, blender_from_args, json_safe
from .blender import METHODS, Blender, Step

MAX_BODY_BYTES = 1 << 20
PULL_S = 0.025  # longest burst of engine steps between two looks at the client
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = Field(default=None, ge=0, lt=2 ** 32)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # n > 1 or best_of: candidates as parallel sequences (best-of-N, not streamed); with best_of,
    # the n with the highest implicit reward (guide minus base log-likelihood) of best_of
    n: int = Field(default=1, ge=1, le=16)
    best_of: Optional[int] = Field(default=None, ge=1, le=16)
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    user: Optional[str] = None
    method: Optional[Literal[METHODS]] = None
    gamma: Optional[float] = Field(default=None, ge=0)
    alpha: Union[Annotated[float, Field(ge=0, le=1)], Literal["auto"], None] = None
    beta: Optional[float] = None
    lambda_: Optional[float] = Field(default=None, alias="lambda")
    max_intervention_rate: Optional[float] = Field(default=None, ge=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    # Alignment Vector lambdas by name (the --av files' stems); the others keep their start-up value
    av_scales: Optional[dict[str, float]] = None


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
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)


_FIELDS = {f.alias or name for m in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions)
           for name, f in m.model_fields.items()}


def _validation_error(e: ValidationError) -> ApiError:
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
    if kind == "missing":
        return ApiError(400, f"missing required parameter {param!r}", param=param, code="missing_required_parameter")
    return ApiError(400, f"invalid value for {param!r}: {err['msg']}", param=param, code="invalid_value")


# ---- the engine slot --------------------------------------------------------------------------------
def _pull(blender: Blender, steps, budget_s: float) -> tuple[list[Step], dict | None]:
    """Worker thread: the next steps of a generation, for at most budget_s seconds (at least one);
    the finished generation's statistics once it ends, else None."""
    out: list[Step] = []
    until = time.perf_counter() + budget_s
    for step in steps:
        out.append(step)
        if step.finish_reason:
            return out, dict(blender.last_stats)
        if time.perf_counter() >= until:
            return out, None
    return out, dict(blender.last_stats)


class Slot:
    """The one Blender, its worker thread, and the FIFO of requests waiting for it."""

    def __init__(self, blender: Blender, max_queue: int):
        self.blender = blender
        self.max_queue = max_queue
        self.waiting = 0
        self._lock = asyncio.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="blendin-engine")

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _acquire(self) -> None:
        """Wait for the models, first come first served; 503 when too many already wait."""
        if self.waiting >= self.max_queue:
            raise ApiError(503, f"the server is busy ({self.waiting} requests waiting); retry later",
                           type="server_error", code="server_busy")
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1

    async def exclusive(self, fn):
        """Wait for the models, run fn() on the worker, give the models back."""
        await self._acquire()
        try:
            return await self.call(fn)
        finally:
            self._lock.release()

    async def open(self, request, prompt, kwargs: dict) -> "Run | None":
        """Wait for the models, then start the generation; None if the client left meanwhile."""
        await self._acquire()
        try:
            if await request.is_disconnected():
                self._lock.release()
                return None
            steps = await self.call(partial(self.start, prompt, kwargs))
        except BaseException:
            self._lock.release()
            raise
        return Run(self, steps)

    def start(self, prompt, kwargs: dict):
        """Worker thread: set the request's Alignment Vector lambdas, then start its generation
        (the Blender re-reads its caches when the scales changed)."""
        kwargs = dict(kwargs)
        scales = kwargs.pop("av_scales", None)
        if scales is not None:
            self.blender.base.set_adapter_scales(scales)
        return self.blender.generate(prompt, **kwargs)

    def release(self, steps) -> None:
        """Give the models to the next request. The generator's close() is queued on the worker
        behind any step still running there, and ahead of the next request's start."""
        self._worker.submit(steps.close)
        self._lock.release()


class Run:
    """One generation holding the slot; `close()` (idempotent) stops it and frees the slot."""

    def __init__(self, slot: Slot, steps):
        self.slot, self._steps, self._open = slot, steps, True
        self.stats: dict = {}

    async def bursts(self) -> AsyncIterator[list[Step]]:
        try:
            while True:
                steps, stats = await self.slot.call(_pull, self.slot.blender, self._steps, PULL_S)
                yield steps
                if stats is not None:
                    self.stats = stats
                    return
        finally:
            self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.slot.release(self._steps)


# ---- responses ----------------------------------------------------------------------------------------
FINISH = {"stop": "stop", "length": "length", "context": "length"}


def _usage(stats: dict) -> dict:
    prompt = stats["prompt_tokens"]["base"] or stats["prompt_tokens"]["guide"]  # method "guide": no base
    completion = stats["tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Server:
    """The HTTP side: validates requests, turns them into Blender calls, formats OpenAI replies."""

    def __init__(self, blender: Blender, *, model_id: str, defaults: dict, api_key: str | None = None,
                 max_tokens_limit: int = 4096, max_queue: int = 64):
        self.blender, self.model_id, self.defaults = blender, model_id, defaults
        self.api_key = api_key
        self.n_ctx = min(m.n_ctx for m in (blender.base, blender.guide) if m is not None)
        self.max_tokens_limit = min(max_tokens_limit, self.n_ctx)
        self.slot = Slot(blender, max_queue)
        self.created = int(time.time())
        self.av_defaults = blender.base.adapter_scales()  # the --av lambdas; requests override by name

    # --- request handling ----------------------------------------------------------------------
    def check_key(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    async def parse(self, request, schema):
        self.check_key(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"the body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large")
        try:
            return schema.model_validate_json(bytes(body))
        except ValidationError as e:
            raise _validation_error(e) from None

    async def prepare(self, req, prompt, max_tokens: int | None, top_logprobs: int, prompt_param: str) -> dict:
        """The Blender arguments of a request, after checking that it fits the context."""
        try:
            base_tokens, guide_tokens = await asyncio.to_thread(self.blender.prompts, prompt)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), param=prompt_param) from None
        longest = max(len(base_tokens), len(guide_tokens))
        room = self.n_ctx - longest
        if room < 1:
            raise ApiError(400, f"the prompt has {longest} tokens; the context holds {self.n_ctx}",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(self.defaults["max_tokens"], room)
        elif max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {self.max_tokens_limit}",
                           param="max_tokens", code="invalid_value")
        elif max_tokens > room:
            raise ApiError(400, f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the "
                           f"context of {self.n_ctx} tokens", param="max_tokens", code="context_length_exceeded")
        d = self.defaults
        kw = dict(max_tokens=max_tokens, top_logprobs=top_logprobs,
                  temperature=d["temperature"] if req.temperature is None else req.temperature,
                  top_p=d["top_p"] if req.top_p is None else req.top_p,
                  top_k=d["top_k"] if req.top_k is None else req.top_k,
                  min_p=d["min_p"] if req.min_p is None else req.min_p,
                  seed=d["seed"] if req.seed is None else req.seed,
                  stop=d["stop"] if req.stop is None else req.stop)
        for name in ("method", "gamma", "alpha", "beta", "lambda_", "max_intervention_rate"):
            if getattr(req, name) is not None:
                kw[name] = getattr(req, name)
        base = self.blender.base
        if req.av_scales is not None or base.adapter_names:
            scales = list(self.av_defaults)
            for name, value in (req.av_scales or {}).items():
                if name not in base.adapter_names:
                    raise ApiError(400, f"no Alignment Vector named {name!r}; this server has: "
                                   f"{', '.join(base.adapter_names) or 'none (start it with --av PATH:LAMBDA)'}",
                                   param="av_scales", code="invalid_value")
                if not math.isfinite(value):
                    raise ApiError(400, f"av_scales[{name!r}] must be finite", param="av_scales",
                                   code="invalid_value")
                scales[base.adapter_names.index(name)] = value
            kw["av_scales"] = scales
        if kw.get("method", self.blender.defaults["method"]) == "proxy" and self.blender.anti is None:
            raise ApiError(400, "method 'proxy' needs the anti model, which this server was not started with",
                           param="method", code="invalid_value")
        return kw

    async def candidates(self, req, prompt, kwargs: dict, fmt) -> Any:
        """n (or best_of) candidates as parallel sequences; with best_of, the n best by reward."""
        from . import best_of_n as bon
        if req.stream:
            raise ApiError(400, "n > 1 and best_of cannot be streamed", param="stream", code="invalid_value")
        total = req.best_of or req.n
        if req.n > total:
            raise ApiError(400, f"best_of ({total}) must be >= n ({req.n})", param="best_of", code="invalid_value")
        if req.best_of and self.blender.guide is None:
            raise ApiError(400, "best_of ranks by the implicit reward, which needs a guide", param="best_of")
        kw = {k: v for k, v in kwargs.items() if k != "top_logprobs"}
        seed = kw.pop("seed")
        scales = kw.pop("av_scales", None)

        def run():
            if scales is not None:
                self.blender.base.set_adapter_scales(scales)
            cands = bon.generate_candidates(self.blender, prompt, total, seed=seed, **kw)
            rewards = bon.implicit_reward(self.blender)(prompt, cands) if req.best_of else [0.0] * total
            return cands, rewards
        try:
            cands, rewards = await self.slot.exclusive(run)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
        order = sorted(range(total), key=lambda i: -rewards[i])[: req.n] if req.best_of else list(range(req.n))
        completion = sum(len(c.tokens) for c in cands)
        prompt_tokens = len(self.blender.prompts(prompt)[0])
        return JSONResponse({**fmt.head(fmt.whole_object),
                             "choices": [fmt.choice(k, cands[i].text, FINISH[cands[i].finish_reason])
                                         for k, i in enumerate(order)],
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                       "total_tokens": prompt_tokens + completion},
                             "blend": {"candidates": [{"seed": seed + i, "reward": rewards[i] if req.best_of else None,
                                                       "interventions": cands[i].interventions,
                                                       "tokens": len(cands[i].tokens)} for i in range(total)]}})

    async def generate(self, request, req, prompt, kwargs: dict, fmt) -> Any:
        """Run a generation; `fmt` turns steps into response objects (see ChatFormat)."""
        try:
            run = await self.slot.open(request, prompt, kwargs)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
        if run is None:
            return Response(status_code=204)  # the client is gone; nobody reads this
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        if req.stream:
            return StreamingResponse(self._sse(run, fmt, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(run.close))
        steps: list[Step] = []
        try:
            async for burst in run.bursts():
                steps += burst
                if await request.is_disconnected():
                    return Response(status_code=204)
        finally:
            run.close()
        return JSONResponse(fmt.whole(steps, run.stats))

    async def _sse(self, run: Run, fmt, include_usage: bool) -> AsyncIterator[str]:
        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        try:
            yield event(fmt.chunk(None, first=True))
            async for burst in run.bursts():
                # one write per burst: a client that left costs one failed write, not one per token
                events = "".join(event(fmt.chunk(step)) for step in burst if fmt.shows(step))
                if events:
                    yield events
            yield event(fmt.final(run.stats))
            if include_usage:
                yield event(fmt.usage_chunk(run.stats))
        except Exception as e:  # the status line is sent: report the error in the stream, as OpenAI does
            yield event(ApiError(500, f"generation failed: {e}", type="server_error").body())
        yield "data: [DONE]\n\n"


# ---- OpenAI response shapes -----------------------------------------------------------------------------
class _Format:
    def __init__(self, server: Server, logprobs: int | None):
        self.server, self.logprobs = server, logprobs
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.model_id}

    def _token(self, token: int) -> tuple[str, list[int]]:
        raw = self.server.blender.base.piece(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _counted(self, steps: list[Step]) -> list[Step]:
        """Steps that have a token to report (not the end-of-generation token)."""
        return [s for s in steps if not self.server.blender.base.is_eog(s.token)]

    def shows(self, step: Step) -> bool:
        """Whether a step gets a chunk of its own when streaming (text, or a token's logprobs)."""
        return bool(step.text) or (self.logprobs is not None and not self.server.blender.base.is_eog(step.token))


class ChatFormat(_Format):
    prefix = "chatcmpl"
    whole_object = "chat.completion"

    def choice(self, index: int, text: str, finish: str) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def _logprobs(self, steps: list[Step]) -> dict | None:
        if self.logprobs is None:
            return None
        content = []
        for s in self._counted(steps):
            text, raw = self._token(s.token)
            top = []
            for t, lp in s.top_logprobs:
                ttext, traw = self._token(t)
                top.append({"token": ttext, "logprob": lp, "bytes": traw})
            content.append({"token": text, "logprob": s.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content}

    def whole(self, steps: list[Step], stats: dict) -> dict:
        return {**self.head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(s.text for s in steps)},
                             "logprobs": self._logprobs(steps), "finish_reason": FINISH[stats["finish_reason"]]}],
                "usage": _usage(stats), "blend": json_safe(stats)}

    def chunk(self, step: Step | None, first: bool = False) -> dict:
        delta = {"role": "assistant", "content": ""} if first else {"content": step.text}
        return {**self.head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta,
                             "logprobs": None if first else self._logprobs([step]), "finish_reason": None}]}

    def final(self, stats: dict) -> dict:
        return {**self.head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": {}, "logprobs": None,
                             "finish_reason": FINISH[stats["finish_reason"]]}],
                "blend": json_safe(stats)}

    def usage_chunk(self, stats: dict) -> dict:
        return {**self.head("chat.completion.chunk"), "choices": [], "usage": _usage(stats)}


class CompletionFormat(_Format):
    prefix = "cmpl"
    whole_object = "text_completion"

    def choice(self, index: int, text: str, finish: str) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def __init__(self, server: Server, logprobs: int | None):
        super().__init__(server, logprobs)
        self.offset = 0  # text_offset of the next token

    def _logprobs(self, steps: list[Step]) -> dict | None:
        if self.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for s in self._counted(steps):
            text, _ = self._token(s.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(s.logprob)
            out["top_logprobs"].append({self._token(t)[0]: lp for t, lp in s.top_logprobs})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def whole(self, steps: list[Step], stats: dict) -> dict:
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": "".join(s.text for s in steps), "logprobs": self._logprobs(steps),
                             "finish_reason": FINISH[stats["finish_reason"]]}],
                "usage": _usage(stats), "blend": json_safe(stats)}

    def chunk(self, step: Step | None, first: bool = False) -> dict | None:
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": "" if first else step.text,
                             "logprobs": None if first else self._logprobs([step]), "finish_reason": None}]}

    def final(self, stats: dict) -> dict:
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": "", "logprobs": None,
                             "finish_reason": FINISH[stats["finish_reason"]]}],
                "blend": json_safe(stats)}

    def usage_chunk(self, stats: dict) -> dict:
        return {**self.head("text_completion"), "choices": [], "usage": _usage(stats)}


# ---- the app ----------------------------------------------------------------------------------------------
def create_app(server: Server):
    """The FastAPI application around a Server."""
    app = FastAPI(title="blendin_cpp", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "busy": server.slot.busy, "waiting": server.slot.waiting}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        blend = {"lambda" if k == "lambda_" else k: v for k, v in server.blender.defaults.items()}
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "blendin_cpp", "n_ctx": server.n_ctx, "blend": blend}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await server.parse(request, ChatRequest)
        messages = [m.as_dict() for m in req.messages]
        top = (req.top_logprobs or 0) if req.logprobs else 0
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        kwargs = await server.prepare(req, messages, max_tokens, top, "messages")
        fmt = ChatFormat(server, top if req.logprobs else None)
        if req.n > 1 or req.best_of:
            return await server.candidates(req, messages, kwargs, fmt)
        return await server.generate(request, req, messages, kwargs, fmt)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await server.parse(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt must be one string (batches are not supported)", param="prompt",
                               code="invalid_value")
            prompt = prompt[0]
        kwargs = await server.prepare(req, prompt, req.max_tokens, req.logprobs or 0, "prompt")
        fmt = CompletionFormat(server, req.logprobs)
        if req.n > 1 or req.best_of:
            return await server.candidates(req, prompt, kwargs, fmt)
        return await server.generate(request, req, prompt, kwargs, fmt)

    return app


# ---- the command ----------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions)")
    add_model_args(p)
    add_blend_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("BLENDIN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $BLENDIN_API_KEY; none: open)")
    s.add_argument("--model-name", help="the model id clients see (default: base+guide file names)")
    s.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 503")
    s.add_argument("--n-seq", type=int, default=4, help="parallel sequences per model, for n / best_of requests")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import uvicorn
    for name in ("max_tokens_limit", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches it can use it "
              "(set --api-key or BLENDIN_API_KEY)", file=sys.stderr)
    blender = blender_from_args(args, log=sys.stderr, n_seq_max=args.n_seq)
    model_id = args.model_name or "+".join(Path(m.path).stem for m in (blender.base, blender.guide) if m)
    defaults = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, seed=args.seed, stop=args.stop)
    server = Server(blender, model_id=model_id, defaults=defaults, api_key=args.api_key,
                    max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0
