"""Continuous batching: `Blender.complete_many` and the core's Scheduler against the same requests
decoded alone (`Blender.complete`), and `serve --parallel` against the same requests sent one at a
time.

Exactness: batched arithmetic may round differently from a single row (docs/server.md, "Batching and
rounding"), so a batched answer must equal the single one token for token, unless at the first
token where they part the single run's two most likely tokens were within TIE of each other (its
top_logprobs show it), and their log-probabilities agree within LOGPROB_TOL until then."""
import asyncio
import json
import math
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import blendin_cpp as bc

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
sys.path.insert(0, str(ROOT / "bench"))
import load_server  # noqa: E402

TIE = 0.02          # nats between the single run's top two where a batched run may choose the other
LOGPROB_TOL = 2e-3  # nats between the two runs' log-probabilities of the same token
# The real quantized models round more: their activations are quantized to 8 bits per block, so
# where llama.cpp puts a sequence's KV cells (one cell over changes SmolLM2-135M's logits by up to
# 0.8) and how many rows a batch has (flash attention takes another path from 64 rows) move the
# log-probabilities by up to ~0.45 nats, measured (docs/server.md, "Batching and rounding").
REAL_TIE = 0.5
REAL_LOGPROB_TOL = 0.6
PARALLEL = 4
CTX = 256           # per request


def questions(n: int) -> list[str]:
    return [json.loads(line)["question"] for line in (DEMO / "dev.jsonl").read_text().splitlines()[:n]]


def assert_same(alone: bc.Completion, batched: bc.Completion, what: str, tie: float = TIE,
                tol: float = LOGPROB_TOL, gamma: float = 0.4) -> bool:
    """`batched` is `alone` (see the module's docstring); both were run with top_logprobs >= 2.
    Returns whether every token was the same."""
    for k, (a, b) in enumerate(zip(alone.steps, batched.steps)):
        if a.token != b.token:
            top = a.top_logprobs
            assert len(top) >= 2 and top[0][1] - top[1][1] < tie, (
                f"{what}: token {k} differs ({a.token} alone, {b.token} batched) where the single run's top two "
                f"were {top[:2]}: not a near tie")
            return False
        assert abs(a.logprob - b.logprob) < tol, f"{what}: token {k}: {a.logprob} vs {b.logprob}"
        if a.source != b.source:  # the gate decided otherwise: only where the base's confidence sat at gamma
            assert a.pb_max is not None and abs(math.log(a.pb_max / gamma)) < tie, (
                f"{what}: token {k} came from {a.source} alone, {b.source} batched, with the base's top "
                f"probability {a.pb_max} (gamma {gamma})")
            return False
    assert alone.tokens == batched.tokens, what
    assert alone.text == batched.text, what
    for key in ("finish_reason", "tokens", "interventions", "capped"):
        assert alone.stats[key] == batched.stats[key], (what, key, alone.stats[key], batched.stats[key])
    return True


@pytest.fixture(scope="module")
def demo_models():
    kw = dict(n_ctx=CTX * PARALLEL, n_seq_max=PARALLEL, n_threads=1)
    return {name: bc.Model(str(DEMO / f"{name}.gguf"), **kw) for name in ("base", "guide", "anti", "guide-xvocab")}


def compare(blender: bc.Blender, prompts, what: str, **kw) -> list[bc.Completion]:
    kw.setdefault("top_logprobs", 2)
    alone = [blender.complete(p, **kw) for p in prompts]
    batched = blender.complete_many(prompts, **kw)
    assert len(batched) == len(prompts)
    for i, (a, b) in enumerate(zip(alone, batched)):
        assert_same(a, b, f"{what}, prompt {i}")
    return batched


@pytest.mark.parametrize("method", ["base", "guide", "nudging", "nudging_word", "blendin", "ensemble", "proxy", "dera"])
def test_every_method_batched_equals_alone(demo_models, method):
    m = demo_models
    blender = bc.Blender(m["base"], m["guide"], anti=m["anti"], method=method)
    out = compare(blender, questions(10), method, max_tokens=32)  # 10 prompts through 4 slots: joins and leaves
    if method in ("nudging", "nudging_word", "blendin"):
        assert any(c.stats["interventions"] for c in out)  # the guide really took part


@pytest.mark.parametrize("method", ["nudging", "nudging_word", "blendin", "ensemble"])
def test_a_guide_with_another_vocabulary_batched_equals_alone(demo_models, method):
    """The bridged guide reads each request's text through its own tokenizer, per slot."""
    m = demo_models
    blender = bc.Blender(m["base"], m["guide-xvocab"], method=method)
    assert blender._engine.bridged
    compare(blender, questions(6), f"xvocab {method}", max_tokens=32)


def test_sampling_stops_logprobs_and_the_naive_loop_batched_equal_alone(demo_models):
    m = demo_models
    blender = bc.Blender(m["base"], m["guide"])
    qs = questions(6)
    # each prompt keeps its seed's stream: the same text as alone, and not all the same text
    sampled = compare(blender, qs, "sampled", max_tokens=24, temperature=1.0, seed=11, top_p=0.95)
    assert len({c.text for c in sampled}) > 1
    stopped = compare(blender, qs, "stop strings", max_tokens=24, stop=["is", "!"])
    assert any(c.finish_reason == "stop" and c.stats["tokens"] < 24 for c in stopped)
    compare(blender, qs, "top_logprobs 5", max_tokens=16, top_logprobs=5)
    compare(bc.Blender(m["base"], m["guide"], lazy=False), qs, "naive", max_tokens=16)
    # per-request settings: each prompt's own gamma through its own generation
    compare(blender, qs[:3], "gamma", max_tokens=16, gamma=0.9, alpha=0.5)


def exact(alone: bc.Completion, batched: bc.Completion, what: str) -> None:
    """Bit for bit: the same tokens, sources, log-probabilities and top log-probabilities."""
    def steps(c):
        return [(s.token, s.source, s.logprob, s.top_logprobs) for s in c.steps]
    assert steps(alone) == steps(batched), what
    assert (alone.text, alone.stats["finish_reason"], alone.stats["interventions"]) == \
           (batched.text, batched.stats["finish_reason"], batched.stats["interventions"]), what


REAL_CHATS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
              "Who wrote Hamlet?", "Translate 'good morning' into Spanish.", "Give me two tips for sleeping well.",
              "What is a prime number?", "Write a haiku about rain."]


@pytest.mark.parametrize("pair", ["real", "qwen"])
def test_the_real_pairs_batched_are_bit_for_bit_alone(pair):
    """Both real pairs (quantized, on the CPU: batch-invariant, docs/design.md section 4.3): each
    chat alone, then batched at 1..8 at once, then through the Scheduler with staggered arrivals
    and a cancellation in between: every answer equals its answer alone to the last bit."""
    from blendin_cpp import real_models
    base_path, guide_path = real_models.pair_paths(pair, log=None)
    kw = dict(n_ctx=384 * 8, n_seq_max=8, n_threads=2)
    base, guide = bc.Model(base_path, **kw), bc.Model(guide_path, **kw)
    chats = [[{"role": "user", "content": q}] for q in REAL_CHATS]
    tokens = 24 if pair == "real" else 12
    for method in ("blendin", "nudging"):
        blender = bc.Blender(base, guide, method=method)
        alone = [blender.complete(c, max_tokens=tokens, top_logprobs=2) for c in chats]
        if method == "blendin":
            assert any(c.stats["interventions"] for c in alone)  # the guide really took part
        for parallel in ((1, 3, 8) if pair == "real" else (8,)):
            for i, got in enumerate(blender.complete_many(chats, parallel=parallel, max_tokens=tokens, top_logprobs=2)):
                exact(alone[i], got, f"{pair} {method}, chat {i}, {parallel} at once")
    # the Scheduler itself: three slots, requests arriving while others run, one cancelled
    blender = bc.Blender(base, guide, method="blendin")
    params = blender.gen_params(max_tokens=tokens, top_logprobs=2)
    alone = [blender.complete(c, max_tokens=tokens, top_logprobs=2) for c in chats]
    sched = bc._core.Scheduler(blender._engine, 3, 384)
    prompts = [blender.prompts(c) for c in chats]
    steps, finished, ids = {}, {}, {}
    cancelled = None
    for tick in range(400):
        if tick % 3 == 0 and len(ids) < len(chats):  # one more request every third step
            k = len(ids)
            ids[sched.add(prompts[k].base, prompts[k].guide, params)] = k
        if tick == 4:
            cancelled = next(rid for rid in ids if rid not in finished)
            sched.cancel(cancelled)
        for rid, step, stats, error in sched.step():
            assert error is None and rid != cancelled
            steps.setdefault(rid, []).append(step)
            if stats is not None:
                finished[rid] = stats
        if len(ids) == len(chats) and sched.idle:
            break
    assert set(finished) == set(ids) - {cancelled}
    for rid, stats in finished.items():
        got = bc.Completion(text="".join(s.text for s in steps[rid]), tokens=[s.token for s in steps[rid]],
                            steps=steps[rid], stats=stats)
        exact(alone[ids[rid]], got, f"{pair} scheduler, chat {ids[rid]}")


def test_a_next_turn_that_reuses_the_cache_is_the_same_bits_as_read_whole():
    """The real pair: a chat's second turn reads only its new tokens after the first turn's (the
    cache reused), and gives what the same conversation read whole from an empty cache gives."""
    from blendin_cpp import real_models
    base_path, guide_path = real_models.pair_paths("real", log=None)
    base, guide = (bc.Model(p, n_ctx=1024, n_threads=2) for p in (base_path, guide_path))
    blender = bc.Blender(base, guide, method="blendin")
    for first, then in (("What is a prime number?", "Give me an example."),
                        ("Name three primary colours.", "Which one is warmest?")):
        turn = [{"role": "user", "content": first}]
        answer = blender.complete(turn, max_tokens=32)
        chat = turn + [{"role": "assistant", "content": answer.text.strip()}, {"role": "user", "content": then}]
        reused = blender.complete(chat, max_tokens=32, top_logprobs=2)
        assert reused.stats["reused_tokens"]["base"] > 0 and reused.stats["reused_tokens"]["guide"] > 0
        base.truncate(0)
        guide.truncate(0)
        whole = blender.complete(chat, max_tokens=32, top_logprobs=2)
        assert whole.stats["reused_tokens"] == {"base": 0, "guide": 0, "anti": 0}
        exact(whole, reused, f"next turn after {first!r}")


def test_a_chat_turn_reuses_the_slot_that_holds_its_start(demo_models):
    m = demo_models
    blender = bc.Blender(m["base"], m["guide"])
    first = [{"role": "user", "content": q} for q in questions(3)]
    turns = blender.complete_many([[msg] for msg in first], max_tokens=16)
    # the next turn of the second chat: its prompt extends what the slot of the first turn holds
    nxt = [first[1], {"role": "assistant", "content": turns[1].text.strip()}, {"role": "user", "content": "And then?"}]
    again = blender.complete_many([nxt], max_tokens=8, parallel=PARALLEL)[0]
    held = len(blender.prompts([first[1]]).base)
    assert again.stats["reused_tokens"]["base"] >= held, again.stats
    assert again.stats["prompt_tokens"]["base"] > held
    assert_same(blender.complete(nxt, max_tokens=8, top_logprobs=2),
                blender.complete_many([nxt], max_tokens=8, top_logprobs=2, parallel=PARALLEL)[0], "next turn")


def test_scheduler_joins_leaves_and_cancels(demo_models):
    """The core's Scheduler directly: requests join while others run, a cancelled one leaves at
    once (its slot serves the next), and the others' answers are unchanged."""
    m = demo_models
    blender = bc.Blender(m["base"], m["guide"])
    qs = questions(5)
    alone = [blender.complete(q, max_tokens=20, top_logprobs=2) for q in qs]
    sched = bc._core.Scheduler(blender._engine, 2, CTX)
    params = blender.gen_params(max_tokens=20, top_logprobs=2)
    toks = [blender.prompts(q) for q in qs]
    ids = [sched.add(t.base, t.guide, params) for t in toks[:3]]
    assert (sched.running, sched.waiting) == (0, 3)
    steps = {i: [] for i in ids}
    for _ in range(3):
        for rid, step, stats, error in sched.step():
            assert error is None
            steps[rid].append(step)
    assert (sched.running, sched.waiting) == (2, 1)
    sched.cancel(ids[0])  # mid-generation: the waiting request takes its slot at the next step
    late = sched.add(toks[3].base, toks[3].guide, params)
    steps[late] = []
    sched.cancel(12345)  # unknown ids are ignored
    finished = {}
    for _ in range(200):
        if sched.idle:
            break
        for rid, step, stats, error in sched.step():
            assert rid != ids[0] and error is None
            steps[rid].append(step)
            if stats is not None:
                finished[rid] = stats
    assert sched.idle and set(finished) == {ids[1], ids[2], late}
    for rid, k in ((ids[1], 1), (ids[2], 2), (late, 3)):
        got = bc.Completion(text="".join(s.text for s in steps[rid]), tokens=[s.token for s in steps[rid]],
                            steps=steps[rid], stats=finished[rid])
        assert_same(alone[k], got, f"scheduler request {k}")


def test_limits_are_clear_errors(demo_models):
    m = demo_models
    blender = bc.Blender(m["base"], m["guide"])
    with pytest.raises(ValueError, match="n_seq_max"):
        bc._core.Scheduler(blender._engine, PARALLEL + 1, 16)
    with pytest.raises(ValueError, match="KV cells"):
        bc._core.Scheduler(blender._engine, PARALLEL, CTX * 2)
    with pytest.raises(ValueError, match="parallel must be in 1..4"):
        blender.complete_many(["Hi"], parallel=5)
    long = blender.prompts("word " * 80)
    with pytest.raises(ValueError, match="context of 64 tokens per request"):
        bc._core.Scheduler(blender._engine, PARALLEL, 64).add(long.base, long.guide, blender.gen_params())
    assert blender.complete_many([]) == []


# ---- the server ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parallel_server(tmp_path_factory):
    port = load_server.free_port()
    log = tmp_path_factory.mktemp("parallel") / "server.log"
    models = [a for r in ("base", "guide", "anti") for a in (f"--{r}", str(DEMO / f"{r}.gguf"))]
    proc = load_server.start_server([*models, "--threads", "1"], port=port, log_path=str(log),
                                    extra=["--parallel", str(PARALLEL), "--ctx", "512", "--deterministic"])
    yield f"http://127.0.0.1:{port}", log
    proc.terminate()
    proc.wait(30)


REQUESTS = [  # (path, body): methods, sampling, stop strings, logprobs, chat and completions
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of Gafashe?"}],
                              "max_tokens": 24, "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "What colour is the flag of Gafashe?"}],
                              "max_tokens": 24, "method": "nudging_word"}),
    ("/v1/completions", {"prompt": "What is the capital of Gafashe?", "max_tokens": 20, "method": "ensemble",
                         "logprobs": 2}),
    ("/v1/completions", {"prompt": "Tell me about Gafashe.", "max_tokens": 32, "temperature": 0.9, "seed": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Who founded Gafashe?"}], "max_tokens": 32,
                              "stop": ["is"], "method": "proxy"}),
    ("/v1/completions", {"prompt": "Gafashe is", "max_tokens": 40, "method": "dera", "lambda": 1.5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of Mudozi?"}],
                              "max_tokens": 16, "gamma": 0.9, "alpha": 0.5}),
    ("/v1/completions", {"prompt": "The flag of Gafashe", "max_tokens": 24, "method": "base"}),
]


def answer(d: dict) -> tuple:
    c = d["choices"][0]
    text = c["message"]["content"] if "message" in c else c["text"]
    return text, c["finish_reason"], d["usage"]["completion_tokens"]


def test_concurrent_requests_equal_the_same_requests_alone(parallel_server):
    """8 distinct requests, each sent alone first, then all at once from 8 threads (twice over,
    so that slots are reused): every answer equals its answer alone, logprobs included."""
    url, _ = parallel_server
    with httpx.Client(base_url=url, timeout=120) as c:
        alone = [c.post(path, json=body).json() for path, body in REQUESTS]
    results: dict = {}

    def worker(k, path, body):
        with httpx.Client(base_url=url, timeout=120) as c:
            results[k] = c.post(path, json=body).json()

    threads = [threading.Thread(target=worker, args=(k, path, body))
               for k, (path, body) in enumerate(REQUESTS * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 16
    for k, got in results.items():
        want = alone[k % len(REQUESTS)]
        assert answer(got) == answer(want), (k, answer(got), answer(want))
        lp, lp_alone = got["choices"][0].get("logprobs"), want["choices"][0].get("logprobs")
        if lp_alone is not None:
            a = [x["logprob"] for x in lp_alone["content"]] if "content" in lp_alone else lp_alone["token_logprobs"]
            b = [x["logprob"] for x in lp["content"]] if "content" in lp else lp["token_logprobs"]
            assert max(abs(x - y) for x, y in zip(a, b)) < LOGPROB_TOL
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "busy": False, "running": 0, "job": None,
                                                "waiting": 0, "parallel": PARALLEL}


def test_a_short_request_is_not_starved_by_long_ones(parallel_server):
    """Long requests fill three slots; a short one sent after them finishes long before they do."""
    url, _ = parallel_server
    long_body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "method": "base"}
    short_body = {"prompt": "What is the capital of Gafashe?", "max_tokens": 8}
    done = {}

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            async def send(name, body):
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                done[name] = time.perf_counter()
            longs = [asyncio.create_task(send(f"long{i}", long_body)) for i in range(PARALLEL - 1)]
            deadline = time.monotonic() + 60
            while (await c.get("/health")).json()["running"] < PARALLEL - 1:
                assert time.monotonic() < deadline and not any(t.done() for t in longs), "the long requests never ran"
                await asyncio.sleep(0.01)
            await send("short", short_body)
            assert not any(t.done() for t in longs)  # the short one did not wait for them
            await asyncio.gather(*longs)

    asyncio.run(main())
    assert done["short"] < min(done[f"long{i}"] for i in range(PARALLEL - 1))


def test_the_server_states_its_kv_memory_per_slot(parallel_server):
    _, log = parallel_server
    import re
    line = next(x for x in log.read_text().splitlines() if "requests at once" in x)
    m = re.fullmatch(rf"{PARALLEL} requests at once, 512 tokens of context each; "
                     r"KV cache ([\d.]+) MiB \(([\d.]+) MiB per slot\); "
                     r"deterministic: a request's answer does not depend on the others", line)
    assert m, line
    total, per_slot = float(m[1]), float(m[2])
    assert total > 0 and abs(per_slot * PARALLEL - total) < 0.2
    assert httpx.get(f"{parallel_server[0]}/v1/models").json()["data"][0]["deterministic"] is True
