"""The base's layers over llama.cpp's RPC backend on loopback against the same base local.

Starts `python -m blendin_cpp rpc-server` processes on 127.0.0.1 (one, then two), each behind a
byte-counting relay, loads the base on them with the guide local, and runs the same greedy BlendIn
generations as with everything local. Prints tokens/s (median of --repeats), the ratio to local,
and the bytes sent each way per generated token (prompt reading excluded: counted from the first
generated token on). Loopback has no network latency: on a real network each token also pays
one round trip per server.

    python bench/rpc.py [--pair demo|real|qwen] [--tokens 48] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import blendin_cpp as bc
from blendin_cpp import real_models
from blendin_cpp.demo import demo_path

QUESTIONS = ["What is the capital of Gafashe?", "What is 12 + 34?", "Name a colour.", "Say hello."]


class CountingRelay:
    """Forwards TCP connections to a server and counts the bytes each way."""

    def __init__(self, target: int):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.target = target
        self.up = self.down = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for a, b, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self.pump, args=(a, b, up), daemon=True).start()

    def pump(self, src, dst, up):
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
        except OSError:
            pass
        for s in (src, dst):  # one side hung up: so does the other (the server then takes its next client)
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def start_server(threads: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the servers share this machine's cores with the client: OpenMP threads that spin while they
    # wait for the next request would take the cores the client needs (on a machine of its own a
    # server can spin)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-m", "blendin_cpp", "rpc-server", "--port", str(port), "--threads",
                             str(threads)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "transport" in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, port


def run(blender: bc.Blender, tokens: int, relays=()) -> tuple[float, float, float]:
    """(tokens/s, bytes up per token, bytes down per token) over QUESTIONS."""
    n = 0
    elapsed = 0.0
    up0 = down0 = 0
    for q in QUESTIONS:
        gen = blender.generate([{"role": "user", "content": q}], max_tokens=tokens, temperature=0.0)
        next(gen)  # the prompt is read and the first token out: count from here
        t0 = time.perf_counter()
        up0 += sum(r.up for r in relays)
        down0 += sum(r.down for r in relays)
        n += sum(1 for _ in gen)
        elapsed += time.perf_counter() - t0
        up0 -= sum(r.up for r in relays)
        down0 -= sum(r.down for r in relays)
    return n / elapsed, -up0 / max(n, 1), -down0 / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="demo", choices=["demo", *real_models.PAIRS])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.pair == "demo":
        base_path, guide_path = demo_path("base"), demo_path("guide")
    else:
        pair = real_models.PAIRS[args.pair]
        base_path, guide_path = str(real_models.fetch(pair.base)), str(real_models.fetch(pair.guide))
    kw = dict(n_ctx=512, n_threads=args.threads)
    guide = bc.Model(guide_path, **kw)
    procs = [start_server(args.threads) for _ in range(2)]
    relays = [CountingRelay(port) for _, port in procs]
    try:
        # loaded one at a time: ggml's server serves one client at a time, so a model on server 0
        # must be freed before the next one connects there
        configs = [("local", [], lambda: bc.Model(base_path, **kw)),
                   ("rpc, 1 server", relays[:1], lambda: bc.Model(base_path, rpc=[relays[0].endpoint], **kw)),
                   ("rpc, 2 servers", relays, lambda: bc.Model(base_path, rpc=[r.endpoint for r in relays], **kw))]
        results = {}
        for name, used, load in configs:
            blender = bc.Blender(load(), guide, method="blendin")
            run(blender, 4, used)  # warm-up
            runs = [run(blender, args.tokens, used) for _ in range(args.repeats)]
            results[name] = tuple(statistics.median(r[i] for r in runs) for i in range(3))
            del blender
        local = results["local"][0]
        print(f"pair {args.pair}: base {base_path.rsplit('/', 1)[-1]} (layers as said), guide local; greedy BlendIn, "
              f"{len(QUESTIONS)} questions x {args.tokens} tokens, median of {args.repeats}, {args.threads} threads\n")
        print("| base | tok/s | vs local | bytes up / token | bytes down / token |")
        print("|---|---:|---:|---:|---:|")
        for name, (tps, up, down) in results.items():
            print(f"| {name} | {tps:.1f} | {tps / local:.2f}x | {up:,.0f} | {down:,.0f} |")
    finally:
        for proc, _ in procs:
            proc.kill()


if __name__ == "__main__":
    main()
