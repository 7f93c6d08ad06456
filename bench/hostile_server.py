"""Hostile clients against `python -m blendin_cpp serve` on the demo pair (issue 32's cases): a
request that tries to poison its batch, clients that hang up on long work, the largest echo list
with log-probabilities a request may ask for, and a browser page elsewhere.

Prints, per case and in all: requests sent, answers equal to the same request alone, innocent
requests failed, seconds from a hang-up to the server being idle, the server's peak RSS, and the
longest /health answer while the cases ran (polled every 0.1 s).

    python bench/hostile_server.py

Only 127.0.0.1 is contacted; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_server  # noqa: E402

COMPLETIONS = "/v1/completions"


def innocent(i: int) -> dict:
    return {"prompt": f"Question: What is {10 + i} + {20 + i}?\nAnswer:", "max_tokens": 16}


POISON = [{"prompt": "Hi", "method": "dera", "lambda": 3e38}, {"prompt": "Hi", "method": "proxy", "beta": 3e38},
          {"prompt": "Hi", "temperature": 1e300}, {"prompt": "Hi", "gamma": 1e300}]


async def poll_health(c: httpx.AsyncClient, stop: asyncio.Event, longest: list) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await c.get("/health", timeout=60)
        longest[0] = max(longest[0], time.perf_counter() - t0)
        await asyncio.sleep(0.1)


async def idle_after(c: httpx.AsyncClient, limit: float = 120) -> float:
    """Seconds until /health says nothing runs or waits."""
    t0 = time.perf_counter()
    while (await c.get("/health", timeout=60)).json()["busy"] and time.perf_counter() - t0 < limit:
        await asyncio.sleep(0.1)
    return time.perf_counter() - t0


async def hang_up(c: httpx.AsyncClient, body: dict, after: float) -> None:
    try:
        await c.post(COMPLETIONS, json=body, timeout=after)
    except httpx.TimeoutException:
        return
    raise RuntimeError("the request ended before its client hung up: make it longer")


async def main(url: str) -> dict:
    fig = {"sent": 0, "equal": 0, "compared": 0, "innocent_failed": 0}
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        longest, stop = [0.0], asyncio.Event()
        poller = asyncio.create_task(poll_health(c, stop, longest))

        # 1. poison beside 12 innocent requests, 3 times
        alone = [(await c.post(COMPLETIONS, json=innocent(i))).json()["choices"][0]["text"] for i in range(12)]
        fig["sent"] += 12
        refused = []
        for _ in range(3):
            sent = [c.post(COMPLETIONS, json=innocent(i)) for i in range(12)] + [c.post(COMPLETIONS, json=p)
                                                                                for p in POISON]
            answers = await asyncio.gather(*sent)
            fig["sent"] += len(sent)
            for i, a in enumerate(answers[:12]):
                fig["innocent_failed"] += a.status_code != 200
                fig["compared"] += 1
                fig["equal"] += a.status_code == 200 and a.json()["choices"][0]["text"] == alone[i]
            refused += [(a.status_code, a.json()["error"]["param"]) for a in answers[12:]]
        fig["poison_answers"] = sorted(set(refused))

        # 2. best-of-16 whose client hangs up after 3 s; an 8-token request sent at 0.5 s
        best = {"prompt": "Once upon a time", "n": 16, "best_of": 16, "max_tokens": 480, "ignore_eos": True,
                "temperature": 1.0}

        async def short():
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            r = await c.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 8})
            fig["innocent_failed"] += r.status_code != 200
            return time.perf_counter() - t0
        waited = asyncio.create_task(short())
        await hang_up(c, best, 3)
        fig["best_of_hangup_to_idle_s"] = await idle_after(c)
        fig["short_request_beside_best_of_s"] = await waited
        fig["sent"] += 2

        # 3. an echo list of 1,000 40-token prompts whose client hangs up after 5 s
        prompts = [[5 + (7 * i + k) % 900 for k in range(40)] for i in range(1000)]
        await hang_up(c, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1}, 5)
        fig["echo_hangup_to_idle_s"] = await idle_after(c)
        fig["sent"] += 1

        # 4. what issue 32 sent: 20,000 prompts; 3,000 with logprobs 100 (both refused now)
        for body in ({"prompt": [[5, 7, 9, 11]] * 20000, "echo": True, "max_tokens": 1},
                     {"prompt": [[5 + k for k in range(12)]] * 3000, "echo": True, "logprobs": 100, "max_tokens": 1}):
            r = await c.post(COMPLETIONS, json=body)
            fig.setdefault("oversized_answers", []).append(r.status_code)
            fig["sent"] += 1
        # near the largest allowed: 200 60-token prompts with logprobs 20 (about 256,000 log-probabilities)
        t0 = time.perf_counter()
        r = await c.post(COMPLETIONS, json={"prompt": [[5 + (3 * i + k) % 900 for k in range(60)] for i in range(200)],
                                            "echo": True, "logprobs": 20, "max_tokens": 1})
        fig["largest_echo"] = {"status": r.status_code, "bytes": len(r.content), "s": time.perf_counter() - t0}
        fig["sent"] += 1

        # 5. a page elsewhere
        page = [await c.post(COMPLETIONS, content=b'{"prompt": "Hi", "max_tokens": 2}',
                             headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}),
                await c.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2},
                             headers={"Origin": "http://evil.example"})]
        fig["browser_answers"] = [r.status_code for r in page]
        fig["sent"] += 2

        stop.set()
        await poller
        fig["longest_health_s"] = longest[0]
        fig["health_after"] = (await c.get("/health")).json()
    return fig


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run() -> int:
    from blendin_cpp.demo import demo_path
    port = load_server.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc = load_server.start_server(["--anti", demo_path("anti"), "--threads", "2"], port=port,
                                        log_path=str(log), extra=["--parallel", "4", "--ctx", "512"])
        try:
            fig = asyncio.run(main(f"http://127.0.0.1:{port}"))
            fig["peak_rss_mib"] = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    for k, v in fig.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
