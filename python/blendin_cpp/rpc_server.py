"""`python -m blendin_cpp rpc-server`: llama.cpp's own RPC server (ggml-rpc) on this machine's CPU,
so that another machine's `--rpc HOST:PORT` (or `Model(rpc=[...])`) can put a model's layers
here. Only `pip install` of this package is needed on this machine (with llama-cpp-python built
with -DGGML_RPC=on). ggml's RPC protocol has no authentication and no encryption: anyone who
can reach the port can use it, so it listens on 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import argparse
import ipaddress
import sys
import threading

from . import _core

LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_rpc_server(args) -> int:
    if not _core.rpc_available():
        raise ValueError("this llama-cpp-python was built without llama.cpp's RPC backend: reinstall it with "
                         'CMAKE_ARGS="-DGGML_RPC=on" pip install --no-cache-dir --force-reinstall '
                         "llama-cpp-python==0.3.36")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    endpoint = f"{host}:{args.port}"
    if not is_loopback(args.host):
        print(f"warning: listening on {endpoint}: ggml's RPC protocol has no authentication or encryption; "
              "anyone who can reach this port can run computations and read or write this server's memory "
              "buffers. Use it only on a network you trust.", file=sys.stderr, flush=True)
    failed: list[BaseException] = []

    def serve():
        try:
            _core.rpc_serve(endpoint, args.cache or "", args.threads or 0)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failed.append(e)

    # ggml's server loop never returns while it serves; the main thread stays free for Ctrl+C
    worker = threading.Thread(target=serve, name="ggml-rpc-server", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    if failed:
        raise ValueError(str(failed[0]))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("rpc-server", help="serve this machine's CPU to another machine's --rpc (llama.cpp's RPC server)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface: see the warning)")
    p.add_argument("--port", type=int, default=50052, help="TCP port (default 50052)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--cache", metavar="DIR",
                   help="keep received tensors in DIR, so that loading the same model again sends only hashes")
    p.set_defaults(func=cmd_rpc_server)
