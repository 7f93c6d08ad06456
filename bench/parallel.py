"""Continuous batching in `serve --parallel N`, measured on a real pair over loopback HTTP.

For every N in --clients (default 1, 2, 4, 8, 16): a server started with --parallel N, and N
clients that send the same fixed set of chat requests between them (--requests of them, greedy,
--max-tokens each with ignore_eos, so every answer has the same length and the work is the same at
every N). The table gives the aggregate tokens/s and its ratio to N = 1 (the same requests sent one
at a time), each request's latency (p50/p95), whether every answer equals its answer at N = 1,
and the KV cache the server reports. `--deterministic both` runs every N on a server without
--deterministic (serve's default) and on one with it, one after the other, and gives their ratio.
Then the fairness row: with --parallel 4, three long
requests (--long-tokens) run and short ones (16 tokens) are sent, all at once, behind them;
their latency against the same short requests on a --parallel 1 server (where they wait for the
long ones) and on an idle server.

    python bench/parallel.py --pair real
    python bench/parallel.py --pair qwen --requests 16 --json qwen_parallel.json
    python bench/parallel.py --base B.gguf --guide G.gguf       # any pair (the GPU kit's stand-ins)
    python bench/parallel.py --pair qwen --clients 1,4,8 --deterministic both --no-fairness

Only 127.0.0.1 is contacted; every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_server import free_port, start_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds for any one request: a bound, never reached on a healthy server


def questions(n: int) -> list[str]:
    rows = [json.loads(x)["question"] for x in (ROOT / "models/real/questions.jsonl").read_text().splitlines() if x]
    return [rows[i % len(rows)] for i in range(n)]


def body(question: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "ignore_eos": True}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class Server:
    """`serve --pair PAIR --parallel N` on a free loopback port, for a `with` block."""

    def __init__(self, parallel: int, args, deterministic: bool = False):
        self.port = free_port()
        self.log = Path(tempfile.mkdtemp(prefix="bench_parallel_")) / "server.log"
        self.proc = start_server([*model_args(args), "--threads", str(args.threads), "--method", args.method],
                                 port=self.port, log_path=str(self.log), wait_s=600,
                                 extra=["--parallel", str(parallel), "--ctx", str(args.ctx),
                                        "--deterministic" if deterministic else "--no-deterministic"])
        self.url = f"http://127.0.0.1:{self.port}"
        line = next((x for x in self.log.read_text().splitlines() if "requests at once" in x), "")
        m = re.search(r"KV cache ([\d.]+) MiB \(([\d.]+) MiB per slot\)", line)
        self.kv_mib, self.kv_slot_mib = (float(m[1]), float(m[2])) if m else (None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


async def ask(client: httpx.AsyncClient, b: dict) -> tuple[str, int, float]:
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=b)
    r.raise_for_status()
    d = r.json()
    return d["choices"][0]["message"]["content"], d["usage"]["completion_tokens"], time.perf_counter() - t0


async def throughput(url: str, n_clients: int, bodies: list[dict]) -> dict:
    """`n_clients` clients take the requests from one queue until none is left."""
    queue = list(enumerate(bodies))
    answers: dict[int, str] = {}
    latencies: list[float] = []
    tokens = 0

    async def client_loop(c: httpx.AsyncClient):
        nonlocal tokens
        while queue:
            i, b = queue.pop(0)
            text, n, s = await ask(c, b)
            answers[i] = text
            latencies.append(s)
            tokens += n

    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=64)) as c:
        await ask(c, bodies[0])  # warm-up: graphs, caches, the first allocation
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for _ in range(n_clients)))
        wall = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95),
            "answers": [answers[i] for i in range(len(bodies))]}


async def behind_long_ones(url: str, args) -> list[float]:
    """Latency of short requests, sent together once 3 long ones are in."""
    shorts = [body(q, 16) for q in questions(args.shorts)]
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
        await ask(c, shorts[0])  # warm-up
        longs = [asyncio.create_task(ask(c, body(q, args.long_tokens))) for q in questions(3)]
        deadline = time.monotonic() + 60
        while (await c.get("/health")).json()["running"] + (await c.get("/health")).json()["waiting"] < 3:
            if time.monotonic() > deadline:
                raise RuntimeError("the long requests never reached the server")
            await asyncio.sleep(0.05)
        out = await asyncio.gather(*(ask(c, b) for b in shorts))
        await asyncio.gather(*longs)
    return [s for _, _, s in out]


async def idle_latency(url: str, args) -> list[float]:
    shorts = [body(q, 16) for q in questions(args.shorts)]
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
        await ask(c, shorts[0])
        return [(await ask(c, b))[2] for b in shorts]


def model_args(args) -> list[str]:
    """The servers' model arguments: --base/--guide when given, else --pair."""
    return ["--base", args.base, "--guide", args.guide] if args.base else ["--pair", args.pair]


def model_paths(args) -> list[str]:
    from blendin_cpp import real_models
    if args.base:
        return [args.base, args.guide]
    p = real_models.PAIRS[args.pair]
    return [str(real_models.fetch(name)) for name in (p.base, p.guide)]


def batch_costs(args, deterministic: bool) -> dict[str, list[float]]:
    """What batching can gain at most: each model's decode of k rows (one token for each of k
    sequences) against one row, measured here (`Model.decode_seconds`)."""
    import blendin_cpp as bc
    out = {}
    for path in model_paths(args):
        m = bc.Model(path, n_ctx=512, n_threads=args.threads, deterministic=deterministic)
        one = m._handle.decode_seconds(1)
        out[Path(path).stem] = [m._handle.decode_seconds(k) / one for k in (2, 4, 8)]
        del m
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="real", help="a named pair (python -m blendin_cpp models list)")
    ap.add_argument("--base", help="with --guide: this pair of GGUF files instead of --pair")
    ap.add_argument("--guide")
    ap.add_argument("--clients", default="1,2,4,8,16", help="comma-separated client counts (= --parallel)")
    ap.add_argument("--requests", type=int, default=16, help="requests in the fixed set")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--ctx", type=int, default=512, help="context per request (--ctx of the servers)")
    ap.add_argument("--method", default="blendin")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shorts", type=int, default=5, help="short requests in the fairness row")
    ap.add_argument("--long-tokens", type=int, default=192)
    ap.add_argument("--deterministic", choices=("off", "on", "both"), default="off",
                    help="the servers' --deterministic (default off, as serve's); both: each N with and without")
    ap.add_argument("--fairness", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the fairness row")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    if (args.base is None) != (args.guide is None):
        raise SystemExit("--base and --guide go together")
    counts = [int(x) for x in args.clients.split(",")]
    bodies = [body(q, args.max_tokens) for q in questions(args.requests)]
    rows = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.deterministic]
    costs = {}
    for det in modes:
        for name, c in batch_costs(args, det).items():
            costs[f"{name} deterministic {'on' if det else 'off'}"] = c
            print(f"{name} (deterministic {'on' if det else 'off'}): a decode of 2, 4, 8 rows costs {c[0]:.2f}x, "
                  f"{c[1]:.2f}x, {c[2]:.2f}x one row (so batching 8 can gain at most {8 / c[2]:.2f}x on it)",
                  flush=True)
    pair = f"{Path(args.base).stem} + {Path(args.guide).stem}" if args.base else args.pair
    print(f"pair {pair}, method {args.method}, {args.requests} chat requests of {args.max_tokens} tokens, "
          f"--ctx {args.ctx}, {args.threads} threads", flush=True)
    print(f"{'clients':>8} {'determ.':>8} {'tok/s':>8} {'x one at a time':>16} {'p50 s':>7} {'p95 s':>7} "
          f"{'same answers':>13} {'KV MiB':>8} {'per slot':>9}", flush=True)
    first: dict[bool, dict] = {}
    for n in counts:
        for det in modes:
            with Server(n, args, det) as srv:
                r = asyncio.run(throughput(srv.url, n, bodies))
            r.update(clients=n, deterministic=det, kv_mib=srv.kv_mib, kv_slot_mib=srv.kv_slot_mib)
            f = first.setdefault(det, r)
            r["ratio"] = r["tokens_per_s"] / f["tokens_per_s"]
            r["same"] = sum(a == b for a, b in zip(r["answers"], f["answers"]))
            rows.append(r)
            print(f"{n:>8} {'on' if det else 'off':>8} {r['tokens_per_s']:>8.1f} {r['ratio']:>15.2f}x "
                  f"{r['p50_s']:>7.2f} {r['p95_s']:>7.2f} {r['same']:>6}/{len(bodies):<6} {srv.kv_mib or 0:>8.1f} "
                  f"{srv.kv_slot_mib or 0:>9.1f}", flush=True)
    if len(modes) == 2:
        print("\n--deterministic against serve's default (tok/s on / off): " + ", ".join(
            f"{n} clients {on['tokens_per_s'] / off['tokens_per_s']:.2f}"
            for n, off, on in ((n, *(r for r in rows if r["clients"] == n)) for n in counts)), flush=True)
    if not args.fairness:
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "batch_costs": costs, "rows": rows}, indent=1))
        return 0
    fair = {}
    with Server(1, args, modes[0]) as srv:
        fair["idle"] = asyncio.run(idle_latency(srv.url, args))
        fair["parallel 1"] = asyncio.run(behind_long_ones(srv.url, args))
    with Server(4, args, modes[0]) as srv:
        fair["parallel 4"] = asyncio.run(behind_long_ones(srv.url, args))
    print(f"\na 16-token request behind 3 requests of {args.long_tokens} tokens ({args.shorts} of them, sent "
          f"together):")
    for k, xs in fair.items():
        label = "alone on an idle server" if k == "idle" else f"--parallel {k.split()[1]}"
        print(f"  {label:<24} p50 {statistics.median(xs):6.2f} s   p95 {percentile(xs, 0.95):6.2f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "batch_costs": costs, "rows": rows, "fairness": fair}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
