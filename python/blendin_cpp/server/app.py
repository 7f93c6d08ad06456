"""The HTTP side: validates requests, turns them into Blender calls, formats OpenAI replies."""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from .. import _core
from ..blender import REPETITION, Blender, PromptTokens, Step
from ..model import ContextLengthError
from .openai_format import FINISH, ChatFormat, CompletionFormat, usage
from .parameters import parameter_table
from .schemas import ApiError, ChatRequest, CompletionRequest, check_no_ops, validation_error
from .scoring import complete_prompts, model_method, read_prompts
from .batcher import Batcher, Run, gather_while_connected
from .guard import Guard
from .metrics import CONTENT_TYPE, Metrics
from .tokenizer import add_tokenizer_routes

MAX_BODY_BYTES = 1 << 20
WEBUI_DIR = Path(__file__).parent / "webui"
# the chat page loads nothing from anywhere but this server (people run it offline), and no other
# site may frame it
WEBUI_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                           "base-uri 'none'",
                 "X-Content-Type-Options": "nosniff"}


def run_error(e: BaseException) -> ApiError:
    """A generation's error as an answer: the request's own (ValueError: its parameters or input)
    400, the engine stopping 503 (already an ApiError), anything else 500."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ValueError):
        return ApiError(400, str(e), code="invalid_value")
    return ApiError(500, f"generation failed: {e}", type="server_error")


class Server:
    """The server's state: the Blender and the batcher that runs it, the request defaults, the
    limits. `allowed_hosts`: the Host names answered besides IP addresses and localhost (None: no
    Host check, for an app mounted in process); `allowed_origins`: the browser origins allowed
    besides the server's own pages (see guard.py)."""

    def __init__(self, blender: Blender, *, model_id: str, defaults: dict, api_key: str | None = None,
                 max_tokens_limit: int = 4096, max_queue: int = 64, parallel: int = 1,
                 allowed_hosts: set[str] | None = None, allowed_origins: set[str] = frozenset()):
        self.blender, self.model_id, self.defaults = blender, model_id, defaults
        self.api_key = api_key
        self.allowed_hosts, self.allowed_origins = allowed_hosts, allowed_origins
        for role, m in blender._roles().items():  # messages name the served model, never a file on this machine
            m.name = f"the {role} model of {model_id!r}"
        self.batcher = Batcher(blender, parallel, max_queue)
        self.metrics = Metrics(self.batcher, blender._roles())
        self.n_ctx = self.batcher.slot_ctx  # each request's context: the models' cells are shared by the slots
        self.max_tokens_limit = min(max_tokens_limit, self.n_ctx)
        self.created = int(time.time())
        self.av_defaults = blender.base.adapter_scales()  # the --av scales; requests override by name
        for m in (blender.base, blender.guide):
            if m is not None:
                m._vocab_text  # what refuses a prompt too long to tokenize, read now rather than on a request

    def close(self) -> None:
        """End the engine thread (after its current step): it holds the models until then."""
        self.batcher.close()

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
            raise validation_error(e) from None

    async def prepare(self, req, prompt, max_tokens: int | None, top_logprobs: int,
                      prompt_param: str) -> tuple[PromptTokens, dict]:
        """The request's prompt, tokenized once for both models, and its Blender arguments, after
        checking that it fits the context."""
        try:  # off the event loop: rendering and tokenizing a long prompt take time
            tokens = await asyncio.to_thread(self.blender.prompts, prompt)
        except ContextLengthError as e:
            raise ApiError(400, f"the prompt has at least {e.min_tokens} tokens; the context holds {self.n_ctx} "
                           "tokens per request", param=prompt_param, code="context_length_exceeded") from None
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), param=prompt_param) from None
        method = self.blender.defaults["method"] if req.method is None else req.method
        # the models the method reads: "base" never reads the guide's (longer, templated) prompt
        base_used, guide_used = _core.uses_roles(method)[:2]
        longest = max(len(tokens.base) if base_used else 0, len(tokens.guide) if guide_used else 0)
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
                  stop=d["stop"] if req.stop is None else req.stop, ignore_eos=req.ignore_eos)
        if req.trace:  # as `generate --trace`: with the vocabulary-sized diagnostics
            kw["diagnostics"] = True
        for name in ("method", "gamma", "alpha", "beta", "lambda_", "max_intervention_rate", "guide_ends", *REPETITION):
            if getattr(req, name) is not None:
                kw[name] = getattr(req, name)
            elif name in d:
                kw[name] = d[name]
        base = self.blender.base
        if req.av_scales is not None or base.adapter_names:
            scales = list(self.av_defaults)
            for name, value in (req.av_scales or {}).items():
                if name not in base.adapter_names:
                    raise ApiError(400, f"no Alignment Vector named {name!r}; this server has: "
                                   f"{', '.join(base.adapter_names) or 'none (start it with --av PATH:SCALE)'}",
                                   param="av_scales", code="invalid_value")
                if not math.isfinite(value):
                    raise ApiError(400, f"av_scales[{name!r}] must be finite", param="av_scales",
                                   code="invalid_value")
                scales[base.adapter_names.index(name)] = value
            kw["av_scales"] = scales
        if kw.get("method", self.blender.defaults["method"]) == "proxy" and self.blender.anti is None:
            raise ApiError(400, "method 'proxy' needs the anti model, which this server was not started with",
                           param="method", code="invalid_value")
        return tokens, kw

    def prompt_tokens(self, tokens: PromptTokens, kwargs: dict) -> int:
        """The prompt's length for usage: the base's, or the guide's where the guide writes alone."""
        return len(tokens.guide) if self.method_of(kwargs) == "guide" else len(tokens.base)

    def method_of(self, kwargs: dict) -> str:
        return kwargs.get("method", self.blender.defaults["method"])

    def finished(self, tokens: PromptTokens, kwargs: dict, stats: dict, completion_tokens: int) -> None:
        """A generation that ran to its end, for /metrics."""
        self.metrics.finished(self.method_of(kwargs), stats, self.prompt_tokens(tokens, kwargs), completion_tokens)

    async def run_to_end(self, request, tokens: PromptTokens, kwargs: dict):
        """One generation pulled to its end: (steps, stats, completion tokens), or None when the
        client left (the generation then stops)."""
        try:
            run = await self.batcher.open(request, tokens, kwargs)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
        if run is None:
            return None
        steps = []
        try:
            async for burst in run.bursts():
                steps += burst
                if await request.is_disconnected():
                    return None
        except Exception as e:
            raise run_error(e) from None
        finally:
            run.close()
        self.finished(tokens, kwargs, run.stats, run.completion_tokens)
        return steps, run.stats, run.completion_tokens

    async def candidates(self, request, req, tokens: PromptTokens, kwargs: dict, fmt) -> Any:
        """n (or best_of) candidates, seeds seed, seed + 1, ...: each a request of its own in the
        batch (each the answer its seed gets alone); with best_of, the n best by the implicit
        reward, scored with the models alone. A client that leaves stops them all."""
        from .. import best_of_n as bon
        if req.stream:
            raise ApiError(400, "n > 1 and best_of cannot be streamed", param="stream", code="invalid_value")
        if req.trace:
            raise ApiError(400, "n > 1 and best_of cannot be traced (trace is per token of one answer)",
                           param="trace", code="invalid_value")
        total = req.best_of or req.n
        if req.n > total:
            raise ApiError(400, f"best_of ({total}) must be >= n ({req.n})", param="best_of", code="invalid_value")
        if req.best_of and self.blender.guide is None:
            raise ApiError(400, "best_of ranks by the implicit reward, which needs a guide", param="best_of")
        kw = {k: v for k, v in kwargs.items() if k != "top_logprobs"}
        seed = kw["seed"]
        runs = await gather_while_connected(request, [self.run_to_end(request, tokens, {**kw, "seed": seed + i})
                                                      for i in range(total)])
        if runs is None or any(r is None for r in runs):
            return Response(status_code=204)  # the client is gone; nobody reads this
        is_end = self.blender.is_end
        cands = [bon.Candidate(text="".join(s.text for s in steps),
                               tokens=[s.token for s in steps if not is_end(s.token)],
                               finish_reason=stats["finish_reason"], interventions=stats["interventions"])
                 for steps, stats, _ in runs]
        rewards = [0.0] * total
        if req.best_of:
            scales = kw.get("av_scales")

            def score():
                if scales is not None:
                    self.blender.base.set_adapter_scales(scales)
                return bon.implicit_reward(self.blender)(tokens, cands)
            try:
                rewards = await self.batcher.exclusive(request, score, "best_of_reward")
            except (ValueError, TypeError) as e:
                raise ApiError(400, str(e)) from None
            if rewards is None:
                return Response(status_code=204)
        order = sorted(range(total), key=lambda i: -rewards[i])[: req.n] if req.best_of else list(range(req.n))
        return JSONResponse({**fmt.head(fmt.whole_object),
                             "choices": [fmt.choice(k, cands[i].text, FINISH[cands[i].finish_reason])
                                         for k, i in enumerate(order)],
                             "usage": usage(self.prompt_tokens(tokens, kwargs), sum(len(c.tokens) for c in cands)),
                             "blend": {"candidates": [{"seed": seed + i, "reward": rewards[i] if req.best_of else None,
                                                       "interventions": cands[i].interventions,
                                                       "tokens": len(cands[i].tokens)} for i in range(total)]}})

    async def generate(self, request, req, tokens: PromptTokens, kwargs: dict, fmt) -> Any:
        """Run a generation; `fmt` turns steps into response objects (see ChatFormat)."""
        if not req.stream:
            done = await self.run_to_end(request, tokens, kwargs)
            if done is None:
                return Response(status_code=204)  # the client is gone; nobody reads this
            steps, stats, completion_tokens = done
            return JSONResponse(fmt.whole(steps, stats, usage(self.prompt_tokens(tokens, kwargs), completion_tokens)))
        try:
            run = await self.batcher.open(request, tokens, kwargs)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
        if run is None:
            return Response(status_code=204)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(self._sse(run, fmt, include_usage, tokens, kwargs),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(run.close))

    async def _sse(self, run: Run, fmt, include_usage: bool, tokens: PromptTokens, kwargs: dict) -> AsyncIterator[str]:
        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        try:
            yield event(fmt.chunk(None, first=True))
            async for burst in run.bursts():
                # one write per burst: a client that left costs one failed write, not one per token
                events = "".join(event(fmt.chunk(step)) for step in burst if fmt.shows(step))
                if events:
                    yield events
            self.finished(tokens, kwargs, run.stats, run.completion_tokens)
            yield event(fmt.final(run.stats))
            if include_usage:
                yield event(fmt.usage_chunk(usage(self.prompt_tokens(tokens, kwargs), run.completion_tokens)))
        except Exception as e:  # the status line is sent: report the error in the stream, as OpenAI does
            yield event(run_error(e).body())
        yield "data: [DONE]\n\n"


def create_app(server: Server, *, webui: bool = True):
    """The FastAPI application around a Server; with `webui`, the chat page at / (docs/webui.md)."""
    app = FastAPI(title="blendin_cpp", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, metrics=server.metrics, hosts=server.allowed_hosts, origins=server.allowed_origins)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=kind).body(), status_code=e.status_code)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, e: ClientDisconnect):
        # the client left while sending its body: nobody reads this answer, and nothing failed
        return JSONResponse(ApiError(400, "the client disconnected before its request arrived",
                                     code="client_disconnected").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        """"ok" while the engine thread runs ("error", 503, with the reason once it stopped); busy
        while anything runs or waits, a job with the models alone included."""
        st = server.batcher.state()
        body = {"status": "ok" if st["failure"] is None else "error",
                "busy": bool(st["running"] or st["job"] or st["waiting"]), "running": st["running"],
                "job": st["job"], "waiting": st["waiting"], "parallel": server.batcher.parallel}
        if st["failure"] is not None:
            body["error"] = st["failure"]
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        blend = {"lambda" if k == "lambda_" else k: v for k, v in server.blender.defaults.items()}
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "blendin_cpp", "n_ctx": server.n_ctx, "blend": blend,
                                            "deterministic": all(m.deterministic for m in server.blender._models())}]}

    @app.get("/v1/parameters")
    async def parameters(request: Request):
        server.check_key(request)
        return parameter_table(server)

    if webui:
        @app.get("/")
        async def chat_page():
            return FileResponse(WEBUI_DIR / "index.html", headers=WEBUI_HEADERS)

        app.mount("/webui", StaticFiles(directory=WEBUI_DIR), name="webui")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await server.parse(request, ChatRequest)
        check_no_ops(req)
        model_method(req)
        request.state.method = req.method or server.blender.defaults["method"]
        messages = [m.as_dict() for m in req.messages]
        top = (req.top_logprobs or 0) if req.logprobs else 0
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        tokens, kwargs = await server.prepare(req, messages, max_tokens, top, "messages")
        fmt = ChatFormat(server, top if req.logprobs else None, req.trace)
        if req.n > 1 or req.best_of:
            return await server.candidates(request, req, tokens, kwargs, fmt)
        return await server.generate(request, req, tokens, kwargs, fmt)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await server.parse(request, CompletionRequest)
        check_no_ops(req)
        model_method(req)
        request.state.method = req.method or server.blender.defaults["method"]
        prompts = read_prompts(server, req)  # strings or token ids
        if req.echo or len(prompts) > 1:
            return await complete_prompts(server, request, req, prompts)
        prompt = prompts[0][0]
        tokens, kwargs = await server.prepare(req, prompt, req.max_tokens, req.logprobs or 0, "prompt")
        fmt = CompletionFormat(server, req.logprobs, req.trace)
        if req.n > 1 or req.best_of:
            return await server.candidates(request, req, tokens, kwargs, fmt)
        return await server.generate(request, req, tokens, kwargs, fmt)

    add_tokenizer_routes(app, server)
    return app
