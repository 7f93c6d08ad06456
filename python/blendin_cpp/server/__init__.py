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

import os
import sys
from pathlib import Path

from ..options import add_blend_args, add_model_args, blender_from_args
from .app import Server, create_app
from .http import protocol

__all__ = ["Server", "create_app", "add_parser", "cmd_serve"]


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
    s.add_argument("--timeout-request", type=float, default=30.0, metavar="SECONDS",
                   help="a request's head and body must arrive within this time of the connection (or of the "
                        "previous response on it); slower clients are disconnected (default 30)")
    s.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="SECONDS",
                   help="close a kept-alive connection idle this long after a response (default 5)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import uvicorn
    for name in ("max_tokens_limit", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("timeout_request", "timeout_keep_alive"):
        if not 0 < getattr(args, name) < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds")
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
                http=protocol(args.timeout_request), timeout_keep_alive=args.timeout_keep_alive,
                timeout_graceful_shutdown=5)
    return 0
