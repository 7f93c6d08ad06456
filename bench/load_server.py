"""Load test of `python -m blendin_cpp serve` on loopback: many concurrent clients, mixed streaming
and plain requests, a few clients that hang up mid-stream.

Every completed response is checked against the same request sent alone (greedy or seeded, so the
answer is fixed): same text, same finish reason, same token count; ids are unique. Afterwards the
server must be healthy and idle. Prints throughput (requests/s, tokens/s) and latency (p50/p95).

    python bench/load_server.py                       # generated test models
    python bench/load_server.py --base B.gguf --guide G.gguf
    python bench/load_server.py --url http://127.0.0.1:8000   # a server already running
    python bench/load_server.py --demo --parallel 1,4,8,16    # one server per --parallel value

Only 127.0.0.1 is ever contacted; counts and times are bounded.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# distinct requests: chat and completion, several methods, greedy and seeded sampling
JOBS = [
    ("chat", {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}),
    ("chat", {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Name a colour."}], "max_tokens": 24, "method": "nudging"}),
    ("completion", {"prompt": "Once upon a time there was", "max_tokens": 48}),
    ("completion", {"prompt": "The weather today is", "max_tokens": 16, "method": "base"}),
    ("chat", {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 40,
              "temperature": 0.8, "seed": 7}),
    ("chat", {"messages": [{"role": "user", "content": "Add 2 and 2."}], "max_tokens": 20, "method": "ensemble"}),
    ("completion", {"prompt": "Numbers like 12 and 345", "max_tokens": 40, "method": "dera", "lambda": 1.5}),
    ("completion", {"prompt": "A small model answers", "max_tokens": 64, "gamma": 0.6, "alpha": 0.5}),
]
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def text_of(kind: str, choice: dict, streamed: bool) -> str:
    if kind == "chat":
        return (choice["delta"] if streamed else choice["message"]).get("content") or ""
    return choice["text"]


async def send(client: httpx.AsyncClient, kind: str, body: dict, *, stream: bool, hang_up_after: int | None = None):
    """One request. Returns {"text", "finish", "tokens", "ids", "latency", "first"}, or None for a
    client that hung up on purpose after `hang_up_after` chunks."""
    t0 = time.perf_counter()
    body = {**body, "stream": stream}
    if not stream:
        r = await client.post(PATHS[kind], json=body)
        r.raise_for_status()
        d = r.json()
        c = d["choices"][0]
        return {"text": text_of(kind, c, False), "finish": c["finish_reason"], "tokens": d["usage"]["completion_tokens"],
                "ids": {d["id"]}, "latency": time.perf_counter() - t0, "first": None}
    body["stream_options"] = {"include_usage": True}
    parts, ids, finish, tokens, first, done, n = [], set(), None, None, None, False, 0
    async with client.stream("POST", PATHS[kind], json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            assert not done, "data after [DONE]"
            d = json.loads(line[6:])
            assert "error" not in d, d
            ids.add(d["id"])
            n += 1
            if hang_up_after is not None and n >= hang_up_after:
                return None  # leaving the block closes the connection mid-stream
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            for c in d["choices"]:
                piece = text_of(kind, c, True)
                if piece and first is None:
                    first = time.perf_counter() - t0
                parts.append(piece)
                finish = c["finish_reason"] or finish
    assert done, "the stream did not end with [DONE]"
    return {"text": "".join(parts), "finish": finish, "tokens": tokens, "ids": ids,
            "latency": time.perf_counter() - t0, "first": first}


async def run_load(url: str, *, clients: int = 32, per_client: int = 3, hang_ups: int = 4,
                   api_key: str | None = None, timeout_s: float = 180) -> dict:
    """Baselines (each distinct request alone), then `clients` concurrent clients sending
    `per_client` requests each; the first `hang_ups` clients hang up mid-stream on their first
    request. Returns a report: counts, mismatches, figures."""
    assert url.startswith(("http://127.0.0.1", "http://localhost")), "loopback only"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as client:
        baseline = [await send(client, kind, body, stream=False) for kind, body in JOBS]
        # the same requests one at a time again, on a warm server: the reference for the figures
        t0 = time.perf_counter()
        alone = [await send(client, kind, body, stream=False) for kind, body in JOBS]
        alone_s = time.perf_counter() - t0

        async def one_client(i: int) -> list:
            out = []
            for j in range(per_client):
                k = (i * per_client + j) % len(JOBS)
                stream = (i + j) % 2 == 0
                hang_up = 2 if (i < hang_ups and j == 0) else None
                res = await send(client, *JOBS[k], stream=stream or hang_up is not None, hang_up_after=hang_up)
                out.append((k, stream or hang_up is not None, res))
            return out

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(clients))), timeout_s)
        wall = time.perf_counter() - t0
        health = (await client.get("/health")).json()
        after = await send(client, *JOBS[0], stream=False)  # the server still answers correctly

    done = [(k, s, r) for rs in results for k, s, r in rs if r is not None]
    mismatches = []
    for k, s, r in done:
        b = baseline[k]
        if (r["text"], r["finish"], r["tokens"]) != (b["text"], b["finish"], b["tokens"]):
            mismatches.append({"job": k, "stream": s, "got": r["text"][:60], "want": b["text"][:60],
                               "finish": (r["finish"], b["finish"]), "tokens": (r["tokens"], b["tokens"])})
    if (after["text"], after["finish"]) != (baseline[0]["text"], baseline[0]["finish"]):
        mismatches.append({"job": "after", "got": after["text"][:60]})
    ids = [i for _, _, r in done for i in r["ids"]]
    lat = sorted(r["latency"] for _, _, r in done)
    firsts = sorted(r["first"] for _, s, r in done if s and r["first"] is not None)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    tokens = sum(r["tokens"] for _, _, r in done)
    alone_tokens_per_s = sum(r["tokens"] for r in alone) / alone_s
    return {"clients": clients, "sent": clients * per_client, "hung_up": clients * per_client - len(done),
            "completed": len(done), "streamed": sum(1 for _, s, _ in done if s), "mismatches": mismatches,
            "unique_ids": len(set(ids)) == len(ids) and all(len(r["ids"]) == 1 for _, _, r in done),
            "health": health, "wall_s": wall, "requests_per_s": len(done) / wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "latency_p50_s": statistics.median(lat), "latency_p95_s": pct(lat, 0.95),
            "first_token_p50_s": statistics.median(firsts) if firsts else float("nan"),
            "first_token_p95_s": pct(firsts, 0.95),
            "alone_tokens_per_s": alone_tokens_per_s, "alone_latency_p50_s": statistics.median(r["latency"] for r in alone)}


# ---- a server to test ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_args: list[str], *, port: int, log_path: str, extra: list[str] = (),
                 wait_s: float = 120) -> subprocess.Popen:
    """`python -m blendin_cpp serve` on 127.0.0.1:port; returns once /health answers."""
    cmd = [sys.executable, "-m", "blendin_cpp", "serve", *model_args, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *extra]
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {Path(log_path).read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not come up in {wait_s} s: {Path(log_path).read_text()[-2000:]}")


def generated_model_args(directory: Path) -> list[str]:
    """Two generated models sharing one tokenizer (what the tests use), one thread each."""
    from blendin_cpp.testing import make_tokenizer, random_llama
    tok = make_tokenizer(1024, seed=7)
    base = random_llama(directory / "load_base.gguf", n_embd=64, n_layer=2, seed=11, logit_std=5, n_ctx=4096,
                        tokenizer=tok)
    guide = random_llama(directory / "load_guide.gguf", n_embd=32, n_layer=1, n_head=2, seed=12, logit_std=4,
                         n_ctx=4096, tokenizer=tok)
    return ["--base", str(base), "--guide", str(guide), "--threads", "1"]


def report(rep: dict) -> None:
    print(f"{rep['sent']} requests from {rep['clients']} clients: {rep['completed']} completed "
          f"({rep['streamed']} streamed), {rep['hung_up']} hung up mid-stream, {len(rep['mismatches'])} mismatches, "
          f"ids unique: {rep['unique_ids']}, health after: {rep['health']}")
    print(f"throughput: {rep['requests_per_s']:.1f} requests/s, {rep['tokens_per_s']:.0f} tokens/s "
          f"({rep['tokens']} tokens in {rep['wall_s']:.2f} s) = {rep['tokens_per_s'] / rep['alone_tokens_per_s']:.2f}x "
          f"the same requests sent one at a time")
    print(f"latency: p50 {rep['latency_p50_s'] * 1000:.0f} ms, p95 {rep['latency_p95_s'] * 1000:.0f} ms "
          f"({rep['latency_p50_s'] / rep['alone_latency_p50_s']:.0f}x / "
          f"{rep['latency_p95_s'] / rep['alone_latency_p50_s']:.0f}x a request alone, among {rep['clients'] - 1} other clients); "
          f"first streamed text p50 {rep['first_token_p50_s'] * 1000:.0f} ms, "
          f"p95 {rep['first_token_p95_s'] * 1000:.0f} ms")
    for m in rep["mismatches"][:5]:
        print("mismatch:", m)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a server already running on 127.0.0.1 (default: start one)")
    ap.add_argument("--base")
    ap.add_argument("--guide")
    ap.add_argument("--demo", action="store_true", help="serve the bundled demo pair")
    ap.add_argument("--parallel", default="4", help="comma-separated --parallel values: one server (and run) each")
    ap.add_argument("--ctx", type=int, default=1024, help="--ctx of the servers started (per request)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--hang-ups", type=int, default=4, help="clients that hang up mid-stream")
    ap.add_argument("--api-key", default=os.environ.get("BLENDIN_API_KEY"))
    args = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            model_args = ["--threads", "1"]
        elif args.base:
            model_args = ["--base", args.base, "--guide", args.guide, "--threads", "1"]
        else:
            model_args = generated_model_args(Path(tmp))
        for parallel in ([None] if args.url else [int(x) for x in args.parallel.split(",")]):
            proc, url = None, args.url
            if url is None:
                port = free_port()
                extra = ["--parallel", str(parallel), "--ctx", str(args.ctx)]
                proc = start_server(model_args, port=port, log_path=str(Path(tmp) / "server.log"),
                                    extra=extra + (["--api-key", args.api_key] if args.api_key else []))
                url = f"http://127.0.0.1:{port}"
                print(f"--- serve --parallel {parallel}")
            try:
                rep = asyncio.run(run_load(url, clients=args.clients, per_client=args.requests,
                                           hang_ups=args.hang_ups, api_key=args.api_key))
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
            report(rep)
            ok = ok and not rep["mismatches"] and rep["unique_ids"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
