"""`python -m blendin_cpp serve`: an OpenAI-compatible HTTP server over one Blender.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /v1/models,
GET /v1/parameters (what a request may set: defaults and ranges), GET /health, GET /metrics
(Prometheus), and the chat page at / (server/webui/, docs/webui.md; `--no-webui` leaves it out);
limits, the browser guards and the metrics: docs/serving.md. The models are fixed when the server
starts; a request can choose the blending (`method`, `gamma`, `alpha`, `beta`, `lambda`,
`max_intervention_rate`, `guide_ends`), the sampling and the repetition controls, never a file.
Chat requests give the base a plain transcript and the guide its chat template; a completion
prompt goes to the base as it is and to the guide as one user message (`Blender.generate`).

Concurrency: one thread owns the models (server/batcher.py). Up to --parallel requests run at
once, each in its own KV sequence of every model (its slot), and every step decodes the next token
of all of them together, one llama.cpp batch per model (continuous batching: a new request joins at
the next step, a finished, stopped or disconnected one leaves at once). Each request gets --ctx
tokens of context; the models hold --parallel x --ctx KV cells. Requests wait first come, first
served; at most --max-queue wait, more get 503. The candidates of n > 1 and best_of are requests
of their own in the batch. Work that needs the models alone (best_of's rewards, an echoed prompt's
log-probabilities, a request with other Alignment Vector scales) waits for the running requests to
finish, and the requests behind it wait for it. A request whose prompt
extends what a free slot holds (the next turn of a chat) is given that slot and reads only the new
tokens. Prompts are tokenized on the event loop's worker threads, outside the queue.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..options import add_blend_args, add_model_args, blender_from_args, repetition_kwargs
from .app import Server, create_app
from .http import protocol

__all__ = ["Server", "create_app", "add_parser", "cmd_serve"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions)")
    add_model_args(p, deterministic=False)
    add_blend_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("BLENDIN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $BLENDIN_API_KEY; none: open)")
    s.add_argument("--model-name", help="the model id clients see (default: base+guide file names)")
    s.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 503")
    s.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="requests decoded together, each with --ctx tokens of context (default 4: on 2 CPU "
                        "cores a batch of 4 rows costs 2.3-3x one row and one of 8 rows 3.9-5.9x, so 4 gains "
                        "most of what batching can; each slot adds --ctx KV cells per model)")
    s.add_argument("--n-seq", type=int, default=4,
                   help="parallel sequences per model for scoring best_of's candidates together (the candidates "
                        "themselves run in the --parallel slots)")
    s.add_argument("--timeout-request", type=float, default=30.0, metavar="SECONDS",
                   help="a request's head and body must arrive within this time of the connection (or of the "
                        "previous response on it); slower clients are disconnected (default 30)")
    s.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="SECONDS",
                   help="close a kept-alive connection idle this long after a response (default 5)")
    s.add_argument("--no-webui", action="store_true",
                   help="do not serve the chat page at / (the API alone; the page is on by default)")
    s.add_argument("--allowed-hosts", default="", metavar="NAME[,NAME...]",
                   help="Host names to answer besides IP addresses and localhost (a DNS-rebinding page's requests "
                        "carry its own name and are refused); '*' answers any")
    s.add_argument("--allowed-origins", default="", metavar="ORIGIN[,ORIGIN...]",
                   help="browser origins (https://app.example:8443) whose pages may call the server, besides its own "
                        "pages; '*' allows any page (then set --api-key)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import uvicorn
    for name in ("max_tokens_limit", "max_queue", "parallel"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("timeout_request", "timeout_keep_alive"):
        if not 0 < getattr(args, name) < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches it can use it "
              "(set --api-key or BLENDIN_API_KEY)", file=sys.stderr)
    blender = blender_from_args(args, log=sys.stderr, n_seq_max=args.n_seq, parallel=args.parallel)
    model_id = args.model_name or "+".join(Path(m.path).stem for m in (blender.base, blender.guide) if m)
    defaults = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, seed=args.seed, stop=args.stop, **repetition_kwargs(args))
    hosts = {h.strip() for h in args.allowed_hosts.split(",") if h.strip()} | {args.host}
    origins = {o.strip() for o in args.allowed_origins.split(",") if o.strip()}
    server = Server(blender, model_id=model_id, defaults=defaults, api_key=args.api_key,
                    max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue, parallel=args.parallel,
                    allowed_hosts=hosts, allowed_origins=origins)
    kv = sum(m.kv_mib for m in blender._models())
    n = blender.base.n_seq_max  # every sequence has its own cells: the slots, and more for --n-seq
    print(f"{args.parallel} requests at once, {server.n_ctx} tokens of context each; KV cache {kv:.1f} MiB "
          f"({kv / n:.1f} MiB per slot)" + (f", {n} slots' worth for --n-seq {n}" if n > args.parallel else "") +
          ("; deterministic: a request's answer does not depend on the others" if args.deterministic else
           "; not deterministic (faster kernels): an answer can change with the batch it runs in "
           "(--deterministic)"), file=sys.stderr, flush=True)
    if not args.no_webui:
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"chat page: http://{host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(server, webui=not args.no_webui), host=args.host, port=args.port,
                    log_level=args.log_level, http=protocol(args.timeout_request),
                    timeout_keep_alive=args.timeout_keep_alive, timeout_graceful_shutdown=5)
    finally:
        server.close()  # so that the models are freed here, not left to the interpreter's exit
    return 0
