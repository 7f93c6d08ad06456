"""A server you can leave running (issue 32): one request never harms another, work stops when its
client leaves, a browser page elsewhere cannot drive it, and it can be watched (/health, /metrics).
Where a crash or a hang is possible the case runs in a subprocess, or against a server subprocess
with bounded waits."""
import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

import blendin_cpp as bc
from blendin_cpp import _core
from blendin_cpp.demo import demo_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import load_server  # noqa: E402

COMPLETIONS, CHAT, HEALTH = "/v1/completions", "/v1/chat/completions", "/health"
ALLOWED_ORIGIN = "http://app.example:3000"
QUESTION = "Question: What is 38 + 41?\nAnswer:"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo pair with 4 slots, on 127.0.0.1, with one extra browser origin allowed."""
    port = load_server.free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = load_server.start_server(["--threads", "1"], port=port, log_path=str(log),
                                    extra=["--parallel", "4", "--allowed-origins", ALLOWED_ORIGIN])
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


def run_script(code: str, timeout: float = 180) -> dict:
    """Run `code` in a fresh interpreter (a crash or a hang cannot take the tests with it); it prints
    one JSON line last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def idle_within(server: str, seconds: float) -> dict:
    """Poll /health until nothing runs or waits (at most `seconds`); the last answer."""
    deadline = time.monotonic() + seconds
    while True:
        h = httpx.get(server + HEALTH, timeout=10).json()
        if not h["busy"] or time.monotonic() > deadline:
            return h
        time.sleep(0.25)


# ---- 1. a request cannot poison its batch -------------------------------------------------------------
@pytest.mark.parametrize("name,value", [("lambda_", 3e38), ("beta", 3e38), ("gamma", 1e300), ("temperature", 1e300)])
def test_absurd_numbers_are_refused_naming_the_parameter(name, value):
    blender = bc.Blender(bc.Model(demo_path("base"), n_ctx=128), bc.Model(demo_path("guide"), n_ctx=128))
    kw = {"temperature": value} if name == "temperature" else {"settings": {name: value}}
    with pytest.raises(ValueError) as e:
        blender.gen_params(**kw)
    shown = name.rstrip("_")
    assert str(e.value).startswith(f"{shown} must be a number in [")
    assert str(e.value).endswith(f"got {value:g}")  # the value given, not the float it would have become (inf)


def test_every_real_parameter_has_a_finite_range():
    """The ranges live in the core (cpp/params.cpp): none of the real numbers is unbounded."""
    for name, (lo, hi, _lo_open, _hi_open, integer, _text) in bc.blender.RANGES.items():
        if not integer:
            assert abs(lo) < 1e6 and abs(hi) < 1e6, name


def test_a_poisoned_request_fails_alone(server):
    """Twelve requests decode while one asks for lambda = 3e38 (DeRa), another for temperature 1e300:
    those two get a 400 naming the parameter, the twelve their answers, equal to each alone."""
    bodies = [{"prompt": f"Question: What is {10 + i} + {20 + i}?\nAnswer:", "max_tokens": 12} for i in range(12)]

    async def main():
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            alone = [(await c.post(COMPLETIONS, json=b)).json()["choices"][0]["text"] for b in bodies[:3]]
            sent = [c.post(COMPLETIONS, json=b) for b in bodies]
            sent.insert(5, c.post(COMPLETIONS, json={**bodies[0], "method": "dera", "lambda": 3e38}))
            sent.insert(9, c.post(COMPLETIONS, json={**bodies[1], "temperature": 1e300}))
            return alone, await asyncio.gather(*sent)

    alone, answers = asyncio.run(main())
    dera, hot = answers.pop(5), answers.pop(8)
    assert dera.status_code == 400 and dera.json()["error"]["param"] == "lambda", dera.text
    assert hot.status_code == 400 and hot.json()["error"]["param"] == "temperature", hot.text
    assert [a.status_code for a in answers] == [200] * 12
    assert [a.json()["choices"][0]["text"] for a in answers[:3]] == alone


NON_FINITE = """
import json
import blendin_cpp as bc
from blendin_cpp import _core
from blendin_cpp.testing import make_tokenizer, random_llama
tok = make_tokenizer(1024, seed=7)
# logits around 1e36: finite for each model alone, but 100 times them (DeRa's lambda = 100, within
# its range) overflows a float
paths = [random_llama(f"{DIR}/huge_{i}.gguf", n_embd=32, n_layer=1, n_head=2, seed=20 + i, logit_std=1e36,
                      tokenizer=tok) for i in (0, 1)]
base, guide = (bc.Model(p, n_ctx=256, n_seq_max=2, n_threads=1) for p in paths)
blender = bc.Blender(base, guide)
prompt = blender.prompts("Hello there")
sched = _core.Scheduler(blender._engine, 2, 128)
dera = sched.add(prompt.base, prompt.guide, blender.gen_params(max_tokens=6, settings={"method": "dera", "lambda_": 100}))
plain = sched.add(prompt.base, prompt.guide, blender.gen_params(max_tokens=6, settings={"method": "base"}))
out = {"errors": {}, "finished": [], "tokens": []}
for _ in range(20):
    if sched.idle:
        break
    for rid, step, stats, error in sched.step():
        if error is not None:
            out["errors"][str(rid)] = [type(error).__name__, str(error)]
        elif rid == plain:
            out["tokens"].append(step.token)
            if stats is not None:
                out["finished"].append(rid)
alone = blender.complete(prompt, max_tokens=6, method="base")
out.update(dera=dera, plain=plain, alone=alone.tokens, n_vocab=base.n_vocab)
print(json.dumps(out))
"""


def test_a_non_finite_distribution_fails_only_its_request(tmp_path):
    """Models whose logits overflow under DeRa's arithmetic: the DeRa request ends with a ValueError
    that says so; the request decoding beside it goes on to its end, as it would alone."""
    out = run_script(NON_FINITE.replace("{DIR}", str(tmp_path)))
    assert list(out["errors"]) == [str(out["dera"])]
    kind, message = out["errors"][str(out["dera"])]
    assert kind == "ValueError" and "dera distribution is not finite" in message
    assert out["finished"] == [out["plain"]] and out["tokens"] == out["alone"]


# ---- 2. an error that belongs to one request ends that request -------------------------------------
def test_complete_many_keeps_the_other_prompts_results(monkeypatch):
    """One prompt's failure (made here: the scheduler reports it) ends that prompt alone; the others
    run to their ends, and PromptsFailed carries their results and the failure."""
    blender = bc.Blender(bc.Model(demo_path("base"), n_ctx=512, n_seq_max=3),
                         bc.Model(demo_path("guide"), n_ctx=512, n_seq_max=3))
    prompts = ["What is 38 + 41?", "What is the capital of Gafashe?", "What is 12 + 30?"]
    alone = [blender.complete(p, max_tokens=12) for p in prompts]
    real = _core.Scheduler

    class FailingSecond:  # the real scheduler, whose second request fails at its third step
        def __init__(self, *a):
            self.inner, self.steps = real(*a), 0

        def add(self, *a):
            return self.inner.add(*a)

        @property
        def idle(self):
            return self.inner.idle

        def step(self):
            self.steps += 1
            events = self.inner.step()
            if self.steps == 3:
                second = sorted({e[0] for e in events})[1]
                self.inner.cancel(second)
                events = [e for e in events if e[0] != second] + [(second, None, None, ValueError("made to fail"))]
            return events

    monkeypatch.setattr(bc.blender._core, "Scheduler", FailingSecond)
    with pytest.raises(bc.PromptsFailed) as e:
        blender.complete_many(prompts, max_tokens=12)
    assert list(e.value.errors) == [1] and str(e.value.errors[1]) == "made to fail"
    assert e.value.results[1] is None
    assert [e.value.results[i].tokens for i in (0, 2)] == [alone[i].tokens for i in (0, 2)]
    assert "1 of 3 prompts failed" in str(e.value)


# ---- 3. the engine thread: a failure, and close ------------------------------------------------------
# an in-process server on the demo pair with PARALLEL slots of 512 tokens; main() talks to it as c
IN_PROCESS = """
import asyncio, json
import httpx
import blendin_cpp as bc
from blendin_cpp import server as srv
from blendin_cpp.demo import demo_path
base, guide = (bc.Model(demo_path(r), n_ctx=512 * 2, n_seq_max=2, n_threads=1) for r in ("base", "guide"))
defaults = dict(max_tokens=8, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=[])
server = srv.Server(bc.Blender(base, guide), model_id="demo", defaults=defaults, parallel=PARALLEL)
out = {}

async def main():
    transport = httpx.ASGITransport(app=srv.create_app(server))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
"""

ENGINE_FAILS = IN_PROCESS.replace("PARALLEL", "2") + """
        body = {"prompt": "What is 38 + 41?", "max_tokens": 8}
        out["before"] = (await c.post("/v1/completions", json=body)).status_code
        def boom():
            raise RuntimeError("the engine broke")
        server.batcher._admit = boom  # what the engine thread does next fails
        r = await c.post("/v1/completions", json=body)
        out["failed"] = [r.status_code, r.json()["error"]["message"]]
        h = await c.get("/health")
        out["health"] = [h.status_code, h.json()]
        r = await c.post("/v1/completions", json=body)
        out["later"] = [r.status_code, r.json()["error"]["message"]]

asyncio.run(asyncio.wait_for(main(), 60))
server.close()
print(json.dumps(out))
"""

CLOSE = IN_PROCESS.replace("PARALLEL", "1") + """
        long = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
        running = asyncio.create_task(c.post("/v1/completions", json=long))
        waiting = asyncio.create_task(c.post("/v1/completions", json=long))
        while server.batcher.counts() != (1, 1):
            await asyncio.sleep(0.05)
        await asyncio.to_thread(server.close)
        for name, task in (("running", running), ("waiting", waiting)):
            r = await task
            out[name] = [r.status_code, r.json()["error"]["message"]]
        r = await c.post("/v1/completions", json=long)
        out["later"] = [r.status_code, r.json()["error"]["message"]]

asyncio.run(asyncio.wait_for(main(), 90))
print(json.dumps(out))
"""


def test_an_engine_thread_failure_fails_every_request_and_shows_in_health():
    out = run_script(ENGINE_FAILS)
    assert out["before"] == 200
    assert out["failed"][0] == 503 and "the engine thread stopped: RuntimeError: the engine broke" in out["failed"][1]
    status, health = out["health"]
    assert status == 503 and health["status"] == "error" and "the engine broke" in health["error"]
    assert out["later"] == out["failed"]


def test_close_fails_the_running_and_waiting_requests():
    out = run_script(CLOSE)
    for name in ("running", "waiting", "later"):
        assert out[name] == [503, "the server is shutting down"], name


# ---- 4. sequences above the scheduler's slots ---------------------------------------------------------
def test_each_sequence_has_its_own_cells_whatever_the_batch():
    """Two prompts fill both sequences (128 cells each of 256) to the end of their context; one
    prompt alone gets the same 128 cells, no more."""
    kw = dict(n_ctx=256, n_seq_max=2, n_threads=1)
    blender = bc.Blender(bc.Model(demo_path("base"), **kw), bc.Model(demo_path("guide"), **kw))
    two = blender.complete_many(["Once upon a time", "The weather today is"], max_tokens=400, ignore_eos=True)
    assert [c.finish_reason for c in two] == ["context", "context"]
    (one,) = blender.complete_many(["Once upon a time"], max_tokens=400, ignore_eos=True, parallel=1)
    assert one.finish_reason == "context" and len(one.tokens) == len(two[0].tokens) < 128


# ---- 5, 6. work stops when its client leaves; bounded answers --------------------------------------
def hang_up(server: str, body: dict, after: float) -> dict:
    """Send `body` from a client that hangs up after `after` seconds; /health as seen midway."""
    import threading
    seen = []

    def watch():
        time.sleep(after / 2)
        seen.append(httpx.get(server + HEALTH, timeout=10).json())
    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + COMPLETIONS, json=body, timeout=after)
    watcher.join()
    return seen[0]


def test_best_of_n_stops_when_its_client_leaves_and_shows_in_health(server):
    midway = hang_up(server, {"prompt": "Once upon a time", "n": 16, "best_of": 16, "max_tokens": 400,
                              "ignore_eos": True, "temperature": 1.0}, after=3)
    assert midway["busy"] and midway["running"] + midway["waiting"] >= 4, midway  # the candidates are visible
    after = idle_within(server, 15)
    assert not after["busy"] and after["running"] == 0 and after["waiting"] == 0, after


def test_an_echo_list_stops_when_its_client_leaves(server):
    prompts = [[5 + (7 * i + k) % 900 for k in range(40)] for i in range(1000)]
    midway = hang_up(server, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1}, after=3)
    assert midway["busy"] and (midway["job"] == "echo_scoring" or midway["running"]), midway
    after = idle_within(server, 15)
    assert not after["busy"], after


@pytest.mark.parametrize("body,param", [
    ({"prompt": [[5, 7, 9]] * 1025, "max_tokens": 1}, "prompt"),
    ({"prompt": [[5, 7, 9, 11, 13] * 4] * 300, "echo": True, "logprobs": 100, "max_tokens": 1}, "logprobs"),
], ids=["too-many-prompts", "too-many-logprobs"])
def test_a_request_is_bounded(server, body, param):
    r = httpx.post(server + COMPLETIONS, json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "at most" in r.json()["error"]["message"]


# ---- 7. text_offset after an echo ----------------------------------------------------------------------
def test_generated_text_offsets_continue_after_the_echo(server):
    r = httpx.post(server + COMPLETIONS, json={"prompt": QUESTION, "echo": True, "logprobs": 1, "max_tokens": 4,
                                               "ignore_eos": True}, timeout=60).json()
    lp = r["choices"][0]["logprobs"]
    offsets, tokens = lp["text_offset"], lp["tokens"]
    generated = offsets[-4:]
    assert generated[0] == len(QUESTION)
    assert generated == sorted(generated) and offsets[:-4] == sorted(offsets[:-4])
    text = r["choices"][0]["text"]
    for off, tok in zip(generated, tokens[-4:]):
        assert text[off:].startswith(tok)


# ---- 8, 9. the context a request has, and how errors name things ----------------------------------------
def in_process(n_ctx: int, parallel: int = 1):
    from blendin_cpp import server as srv
    kw = dict(n_ctx=n_ctx, n_seq_max=parallel, n_threads=1)
    blender = bc.Blender(bc.Model(demo_path("base"), **kw), bc.Model(demo_path("guide"), **kw))
    defaults = dict(max_tokens=4, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=[])
    return srv, srv.Server(blender, model_id="demo", defaults=defaults, parallel=parallel)


def post_in_process(srv, server, path, body):
    async def main():
        transport = httpx.ASGITransport(app=srv.create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            return await c.post(path, json=body)
    try:
        return asyncio.run(main())
    finally:
        server.close()


def test_method_base_counts_only_the_base_prompt():
    """The guide's chat template makes its prompt longer; `base` never reads it."""
    srv, server = in_process(64)
    text = "Question: " + " ".join(["What is 38 + 41?"] * 6) + "\nAnswer:"
    tokens = server.blender.prompts(text)
    assert len(tokens.base) + 4 <= 64 < len(tokens.guide)  # fits the base, not the guide
    r = post_in_process(srv, server, COMPLETIONS, {"prompt": text, "method": "base", "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_errors_name_the_served_model_and_the_request_context():
    srv, server = in_process(512, parallel=2)  # 256 tokens per request
    r = post_in_process(srv, server, COMPLETIONS, {"prompt": "x" * 200_000, "max_tokens": 4})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "256 tokens per request" in message, message
    assert ".gguf" not in message and "512" not in message
    assert server.blender.base.name == "the base model of 'demo'"


# ---- 10. browser pages elsewhere -----------------------------------------------------------------------
@pytest.mark.parametrize("headers,status,code", [
    ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403, "origin_not_allowed"),
    ({"Content-Type": "application/json", "Host": "evil.example"}, 403, "host_not_allowed"),
    ({"Content-Type": "application/json", "Origin": ALLOWED_ORIGIN}, 200, None),
    ({"Content-Type": "application/json; charset=utf-8", "Host": "localhost"}, 200, None),
], ids=["text-plain", "other-origin", "rebound-host", "allowed-origin", "localhost"])
def test_browser_pages_elsewhere_cannot_drive_the_server(server, headers, status, code):
    body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    r = httpx.post(server + COMPLETIONS, content=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code


def test_the_servers_own_pages_may_post(server):
    """A page served by the server itself posts with its own origin (relative URLs)."""
    r = httpx.post(server + CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                   headers={"Origin": server}, timeout=60)
    assert r.status_code == 200, r.text


# ---- 11. small things ----------------------------------------------------------------------------------
def test_complete_many_refuses_a_single_prompt_and_calls_from_on_done():
    blender = bc.Blender(bc.Model(demo_path("base"), n_ctx=256), bc.Model(demo_path("guide"), n_ctx=256))
    with pytest.raises(TypeError, match="list of prompts"):
        blender.complete_many("Hi!")
    seen = []

    def on_done(i, c):
        with pytest.raises(bc.BlendError, match="same thread") as e:
            blender.complete("Hi")
        seen.append(str(e.value))
    blender.complete_many(["Hi"], max_tokens=2, on_done=on_done)
    assert len(seen) == 1


def test_demo_models_default_to_their_trained_context(capsys):
    import argparse
    from blendin_cpp import options
    p = argparse.ArgumentParser()
    options.add_model_args(p)
    args = p.parse_args(["--threads", "1"])
    models = options.load_models(args)
    assert models["base"].n_ctx == 512 and "warning" not in capsys.readouterr().err
    options.load_models(p.parse_args(["--threads", "1", "--ctx", "1024"]))
    assert "beyond the 512 tokens the demo models were trained on" in capsys.readouterr().err


# ---- 12. /metrics ---------------------------------------------------------------------------------------
def test_metrics_in_the_prometheus_text_format(server):
    from prometheus_client.parser import text_string_to_metric_families
    ok = httpx.post(server + COMPLETIONS, json={"prompt": QUESTION, "max_tokens": 6, "method": "nudging"}, timeout=60)
    assert ok.status_code == 200
    assert httpx.post(server + COMPLETIONS, json={"prompt": "Hi", "top_p": 2}, timeout=60).status_code == 400
    r = httpx.get(server + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]
    assert value("blendin:requests_total", endpoint=COMPLETIONS, method="nudging", status="200") >= 1
    assert value("blendin:requests_total", endpoint=COMPLETIONS, method="blendin", status="400") >= 1
    assert value("blendin:generation_tokens_total", method="nudging") >= ok.json()["usage"]["completion_tokens"]
    assert value("blendin:prompt_tokens_total", method="nudging") >= ok.json()["usage"]["prompt_tokens"]
    assert value("blendin:time_to_first_token_seconds_count", method="nudging") >= 1
    assert value("blendin:time_per_output_token_seconds_count", method="nudging") >= 1
    assert value("blendin:request_intervention_rate_count", method="nudging") >= 1
    assert value("blendin:interventions_total", method="nudging") >= ok.json()["blend"]["interventions"]
    assert value("blendin:kv_cache_tokens", model="base") > 0
    assert 0 < value("blendin:kv_cache_usage_ratio", model="base") <= 1
    assert value("blendin:num_slots") == 4 and value("blendin:engine_up") == 1
    for name in ("blendin:num_requests_running", "blendin:num_requests_waiting", "blendin:num_jobs_running"):
        assert value(name) >= 0
