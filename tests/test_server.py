"""`python -m blendin_cpp serve` as a subprocess on 127.0.0.1: the official openai client, a bounded
load test, and every malformed request answered with an OpenAI-style 4xx."""
import asyncio
import json
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import load_server  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CTX = 2048
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def serve(model_args, tmp_path_factory):
    port = load_server.free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = load_server.start_server(model_args, port=port, log_path=str(log),
                                    extra=["--api-key", KEY, "--ctx", str(CTX)])
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    assert proc.wait(30) in (0, -signal.SIGTERM), log.read_text()[-2000:]  # uvicorn re-raises SIGTERM


@pytest.fixture(scope="module")
def generated_server(model_dir, tmp_path_factory):
    """Two generated models: random weights, so a generation runs to max_tokens."""
    yield from serve(load_server.generated_model_args(model_dir), tmp_path_factory)


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """The bundled demo pair (no model arguments) when it is there, else the generated pair."""
    if (ROOT / "models" / "demo" / "base.gguf").exists():
        yield from serve(["--threads", "1"], tmp_path_factory)
    else:
        yield request.getfixturevalue("generated_server")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body, headers=AUTH, timeout=60):
    return httpx.post(f"{server}{path}", json=body, headers=headers, timeout=timeout)


# ---- the openai client ----------------------------------------------------------------------------
def test_openai_chat_completion(client, server):
    r = client.chat.completions.create(model="any", messages=CHAT, max_tokens=24,
                                       extra_body={"method": "blendin", "gamma": 0.5})
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    # the end token is not a token of the text, so usage does not count it (blend's "tokens" does)
    assert r.usage.completion_tokens == r.model_extra["blend"]["tokens"] - (c.finish_reason == "stop") <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 <= r.model_extra["blend"]["intervention_rate"] <= 1
    assert r.model == client.models.list().data[0].id


def test_openai_n_candidates(client):
    """n > 1: candidates as parallel sequences, one seed each (seed, seed + 1, ...)."""
    r = client.chat.completions.create(model="any", messages=CHAT, max_tokens=12, n=3, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    one = client.chat.completions.create(model="any", messages=CHAT, max_tokens=12, temperature=1.0, seed=8)
    assert r.choices[1].message.content == one.choices[0].message.content
    assert r.usage.completion_tokens == sum(c["tokens"] for c in r.model_extra["blend"]["candidates"])


def test_best_of_returns_the_highest_rewards(client):
    r = client.completions.create(model="any", prompt="The capital of France is", max_tokens=12, n=2, best_of=4,
                                  temperature=1.0, seed=3)
    cands = r.model_extra["blend"]["candidates"]
    assert len(r.choices) == 2 and len(cands) == 4
    rewards = sorted((c["reward"] for c in cands), reverse=True)
    assert rewards[0] >= rewards[1] >= rewards[2]


def test_openai_streamed_chat_equals_plain(client):
    kw = dict(model="any", messages=CHAT, max_tokens=24)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert finals[0].model_extra["blend"]["tokens"] == whole.model_extra["blend"]["tokens"]
    assert chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_usage_counts_the_same_tokens_on_every_path(client):
    """Plain, streamed and n-candidate answers count the text's tokens, never the end token."""
    kw = dict(model="any", messages=CHAT, max_tokens=24)
    whole = client.chat.completions.create(logprobs=True, **kw)
    assert whole.choices[0].finish_reason == "stop"  # ended by the end token, which is not counted
    assert whole.usage.completion_tokens == len(whole.choices[0].logprobs.content)  # one entry per text token
    two = client.chat.completions.create(n=2, **kw)  # greedy: both candidates are the plain answer
    assert [c.message.content for c in two.choices] == [whole.choices[0].message.content] * 2
    assert two.usage.completion_tokens == 2 * whole.usage.completion_tokens
    assert two.usage.prompt_tokens == whole.usage.prompt_tokens


def test_openai_completion(client):
    r = client.completions.create(model="any", prompt="Once upon a time", max_tokens=16,
                                  extra_body={"method": "nudging"})
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    streamed = client.completions.create(model="any", prompt="Once upon a time", max_tokens=16, stream=True,
                                         extra_body={"method": "nudging"})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_openai_logprobs(client):
    r = client.chat.completions.create(model="any", messages=CHAT, max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and len(content) <= 8
    for t in content:
        # greedy: the chosen token is the final distribution's likeliest
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token
    streamed = client.chat.completions.create(model="any", messages=CHAT, max_tokens=8, logprobs=True, top_logprobs=3,
                                              stream=True)
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    # the same tokens; the KV cache reused across requests may change the last bits of a logprob
    assert [t.token for t in tokens] == [t.token for t in content]
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in content], abs=1e-3)
    c = client.completions.create(model="any", prompt="Once upon a time", max_tokens=8, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_models_and_health(server):
    models = httpx.get(f"{server}/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and len(models["data"]) == 1
    assert models["data"][0]["deterministic"] is False  # serve's default: the faster kernels
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "busy": False, "running": 0, "job": None,
                                                   "waiting": 0, "parallel": 4}


def test_ctrl_c_stops_the_server_cleanly(model_dir, tmp_path):
    """Ctrl-C (SIGINT) while a stream runs: the server finishes, exits 0 and frees its models itself
    (the engine thread ends first), so nothing is left for the interpreter's exit to report."""
    port = load_server.free_port()
    log = tmp_path / "server.log"
    proc = load_server.start_server(load_server.generated_model_args(model_dir), port=port, log_path=str(log),
                                    extra=["--log-level", "info"])
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                          json={"prompt": "Hello", "max_tokens": 200, "stream": True}) as r:
            next(r.iter_lines())  # generating now
            proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Finished server process" in text and "leaked" not in text, text[-2000:]


# ---- concurrency ----------------------------------------------------------------------------------
def test_load_32_clients(server):
    rep = asyncio.run(load_server.run_load(server, clients=32, per_client=3, hang_ups=4, api_key=KEY, timeout_s=240))
    print(json.dumps({k: v for k, v in rep.items() if k != "mismatches"}))
    assert rep["mismatches"] == []
    assert rep["completed"] == 96 - 4 and rep["hung_up"] == 4 and rep["unique_ids"]
    assert rep["health"] == {"status": "ok", "busy": False, "running": 0, "job": None, "waiting": 0, "parallel": 4}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_hang_up_frees_the_slot_at_once(generated_server, stream):
    server = generated_server
    body = {"prompt": "The weather today is", "max_tokens": 1500, "method": "base"}
    t0 = time.perf_counter()
    alone = post(server, "/v1/completions", body).json()
    full_s = time.perf_counter() - t0
    assert alone["usage"]["completion_tokens"] == 1500, "pick a prompt that does not end early"
    if stream:
        with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, headers=AUTH) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 4:
                    break  # leaving the block closes the connection
    else:
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/completions", body, timeout=full_s / 8)
    t0 = time.perf_counter()
    short = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert short.status_code == 200
    assert time.perf_counter() - t0 < full_s / 2, "the abandoned generation kept the models"


# ---- malformed requests -----------------------------------------------------------------------------
CHAT_PATH, COMPLETION_PATH = "/v1/chat/completions", "/v1/completions"
PROMPT = {"prompt": "Hello", "max_tokens": 4}


def chat(**kw):
    return {"messages": CHAT, "max_tokens": 4, **kw}


BAD = [
    ("malformed-json", CHAT_PATH, b'{"messages": [', 400, "invalid_json", None),
    ("body-not-object", CHAT_PATH, b"[1, 2]", 400, "invalid_json", None),
    ("missing-messages", CHAT_PATH, {"max_tokens": 4}, 400, "missing_required_parameter", "messages"),
    ("empty-messages", CHAT_PATH, {"messages": []}, 400, "invalid_value", "messages"),
    ("bad-role", CHAT_PATH, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value",
     "messages.0.role"),
    ("content-not-text", CHAT_PATH, {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_value",
     "messages.0.content"),
    ("last-not-user", CHAT_PATH, {"messages": [{"role": "assistant", "content": "hi"}]}, 400, None, "messages"),
    ("max-tokens-string", CHAT_PATH, chat(max_tokens="4"), 400, "invalid_value", "max_tokens"),
    ("temperature-bool", CHAT_PATH, chat(temperature=True), 400, "invalid_value", "temperature"),
    ("unknown-method", CHAT_PATH, chat(method="telepathy"), 400, "invalid_value", "method"),
    ("proxy-without-anti", CHAT_PATH, chat(method="proxy"), 400, "invalid_value", "method"),
    ("unknown-field", CHAT_PATH, chat(gama=0.5), 400, "unknown_parameter", "gama"),
    ("gamma-negative", CHAT_PATH, chat(gamma=-1), 400, "invalid_value", "gamma"),
    ("alpha-above-one", CHAT_PATH, chat(alpha=1.5), 400, "invalid_value", "alpha"),
    ("alpha-word", CHAT_PATH, chat(alpha="high"), 400, "invalid_value", "alpha"),
    ("content-part-not-text", CHAT_PATH, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "invalid_value", "messages.0.content"),
    ("top-p-zero", CHAT_PATH, chat(top_p=0), 400, "invalid_value", "top_p"),
    ("max-tokens-zero", CHAT_PATH, chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("max-tokens-over-limit", CHAT_PATH, chat(max_tokens=100000), 400, "invalid_value", "max_tokens"),
    ("n-too-many", CHAT_PATH, chat(n=17), 400, "invalid_value", "n"),
    ("n-streamed", CHAT_PATH, chat(n=2, stream=True), 400, "invalid_value", "stream"),
    ("best-of-below-n", COMPLETION_PATH, {**PROMPT, "n": 3, "best_of": 2}, 400, "invalid_value", "best_of"),
    ("top-logprobs-alone", CHAT_PATH, chat(top_logprobs=2), 400, "invalid_value", "top_logprobs"),
    ("top-logprobs-too-many", CHAT_PATH, chat(logprobs=True, top_logprobs=101), 400, "invalid_value",
     "top_logprobs"),
    ("empty-stop-string", CHAT_PATH, chat(stop=[""]), 400, None, None),
    ("oversize-prompt", COMPLETION_PATH, {"prompt": "word " * 3000}, 400, "context_length_exceeded", "prompt"),
    ("prompt-plus-max-tokens", COMPLETION_PATH, {"prompt": "Hello", "max_tokens": CTX}, 400,
     "context_length_exceeded", "max_tokens"),
    ("empty-prompt", COMPLETION_PATH, {"prompt": "   "}, 400, None, "prompt"),
    ("logprobs-bool", COMPLETION_PATH, {**PROMPT, "logprobs": True}, 400, "invalid_value", "logprobs"),
    ("body-too-large", COMPLETION_PATH, {"prompt": "x" * (2 << 20)}, 413, "body_too_large", None),
]


@pytest.mark.parametrize("path, body, status, code, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_requests(server, path, body, status, code, param):
    if isinstance(body, bytes):
        r = httpx.post(f"{server}{path}", content=body, headers={**AUTH, "Content-Type": "application/json"})
    else:
        r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["none", "wrong", "not-bearer"])
def test_api_key_is_required(server, headers):
    for r in (post(server, CHAT_PATH, chat(), headers=headers), httpx.get(f"{server}/v1/models", headers=headers)):
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("method, path, status", [("GET", CHAT_PATH, 405), ("POST", "/v1/nothing", 404)])
def test_wrong_routes(server, method, path, status):
    r = httpx.request(method, f"{server}{path}", headers=AUTH)
    assert r.status_code == status and r.json()["error"]["message"]


def test_still_healthy_after_bad_requests(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    r = post(server, CHAT_PATH, chat())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_blending_fields_reach_the_blender(server):
    def run(**kw):
        r = post(server, CHAT_PATH, chat(max_tokens=12, **kw))
        assert r.status_code == 200, r.text
        return r.json()
    assert run(method="base")["blend"]["intervention_rate"] == 0
    assert run(method="blendin", gamma=1.01, alpha="auto")["blend"]["intervention_rate"] == 1
    assert run(method="nudging", gamma=0.0)["blend"]["decode_calls"]["guide"] == 0
    plain = run()["choices"][0]["message"]["content"]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    parts = post(server, CHAT_PATH, {"messages": as_parts, "max_tokens": 12}).json()
    assert parts["choices"][0]["message"]["content"] == plain


async def models_held(server):
    """Hold the server's models with a job that runs until the returned event is set (requests
    queue up behind it)."""
    import threading
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(30)
    asyncio.get_running_loop().create_task(server.batcher.exclusive(None, hold, "hold"))
    while not started.is_set():
        await asyncio.sleep(0.001)
    return release


def test_queue_limit(model_dir):
    """In process: with the models busy, max_queue requests wait and the next one gets 503."""
    import blendin_cpp as bc
    from blendin_cpp import server as srv

    args = load_server.generated_model_args(model_dir)
    base, guide = (bc.Model(args[i], n_ctx=256, n_threads=1) for i in (1, 3))
    defaults = dict(max_tokens=4, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=[])
    server = srv.Server(bc.Blender(base, guide), model_id="m", defaults=defaults, max_queue=2)

    async def main():
        transport = httpx.ASGITransport(app=srv.create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            busy = await models_held(server)  # the models are busy
            sent = [asyncio.create_task(c.post(COMPLETION_PATH, json=PROMPT)) for _ in range(3)]
            done, _ = await asyncio.wait(sent, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            (refused,) = done
            assert server.batcher.counts() == (0, 2)
            busy.set()  # the two waiting requests now run
            return refused.result(), await asyncio.gather(*sent)

    refused, responses = asyncio.run(main())
    server.close()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_busy"
    assert sorted(r.status_code for r in responses) == [200, 200, 503]


def test_requests_run_in_arrival_order(model_dir):
    """In process: requests that queue up while the models are busy run first come, first served
    (one at a time: the server's default parallel in process is 1)."""
    import blendin_cpp as bc
    from blendin_cpp import server as srv

    args = load_server.generated_model_args(model_dir)
    base, guide = (bc.Model(args[i], n_ctx=256, n_threads=1) for i in (1, 3))
    defaults = dict(max_tokens=4, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=[])
    server = srv.Server(bc.Blender(base, guide), model_id="m", defaults=defaults)
    finished = []

    async def main():
        transport = httpx.ASGITransport(app=srv.create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            async def one(i):
                await c.post(COMPLETION_PATH, json={"prompt": f"Request {i}", "max_tokens": 8})
                finished.append(i)

            busy = await models_held(server)
            tasks = []
            for i in range(6):
                tasks.append(asyncio.create_task(one(i)))
                while server.batcher.counts()[1] <= i:  # request i is in the queue before i + 1 is sent
                    await asyncio.sleep(0.001)
            busy.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)

    asyncio.run(main())
    server.close()
    assert finished == list(range(6))


# ---- logprobs of multi-byte text ---------------------------------------------------------------------
def test_text_offsets_count_characters_of_the_text(tiny_model):
    """Completions' text_offset: where each token starts in the answer, in characters, for text
    whose characters are split over several tokens (byte tokens of 'ï', CJK and an emoji). The
    expected offsets are computed independently: the characters that the bytes before the token
    complete. Whole answers and streamed chunks give the same offsets."""
    from types import SimpleNamespace

    import blendin_cpp as bc
    from blendin_cpp.server.openai_format import CompletionFormat

    model = bc.Model(tiny_model, n_ctx=128, n_threads=1)
    text = "naïve 日本語 🎉 ok"
    tokens = model.tokenize(text, add_special=False)
    pieces = [model.piece(t) for t in tokens]
    assert b"".join(pieces) == text.encode() and any(len(p) == 1 and p[0] >= 0x80 for p in pieces)
    # the steps as the engine releases them: whole characters only
    steps, held = [], b""
    for t, piece in zip(tokens, pieces):
        held += piece
        try:
            released, held = held.decode(), b""
        except UnicodeDecodeError:
            released = ""
        steps.append(SimpleNamespace(token=t, text=released, logprob=-1.0, top_logprobs=[], finish_reason=None))
    expected = [len(b"".join(pieces[:i]).decode("utf-8", errors="ignore")) for i in range(len(tokens))]
    assert expected[:9] == [0, 1, 2, 2, 3, 4, 5, 6, 6]  # 'ï' is two tokens at offset 2, '日' three at 6

    server = SimpleNamespace(blender=SimpleNamespace(base=model), model_id="m")
    whole = CompletionFormat(server, 0).whole(steps, {"finish_reason": "length"}, {})
    assert whole["choices"][0]["text"] == text
    assert whole["choices"][0]["logprobs"]["text_offset"] == expected
    streamed = CompletionFormat(server, 0)
    offsets = [o for s in steps for o in streamed.chunk(s)["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == expected



# ---- hostile clients on loopback ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timed_server(model_dir, tmp_path_factory):
    """The generated pair, with 2 s for a request to arrive; (url, log file)."""
    port = load_server.free_port()
    log = tmp_path_factory.mktemp("timed") / "server.log"
    proc = load_server.start_server(load_server.generated_model_args(model_dir), port=port, log_path=str(log),
                                    extra=["--ctx", str(CTX), "--timeout-request", "2", "--log-level", "info"])
    yield f"http://127.0.0.1:{port}", log
    proc.terminate()
    assert proc.wait(30) in (0, -signal.SIGTERM), log.read_text()[-2000:]


def test_hostile_prompts_leave_the_server_responsive(timed_server):
    """The issue's probes: a 1 MB body of "<|end|>" * 145000 (once 65 s to its 400, while /health
    took 60 s) and eight bodies of 10,000 short messages (which stalled a normal request for 24 s),
    all at once. Each is refused (it cannot fit the context: refused before it is tokenized), and
    meanwhile /health and a normal request keep answering. Bounds are generous: the point is
    seconds, not a minute."""
    url, _ = timed_server
    forged = {"messages": [{"role": "user", "content": "<|end|>" * 145000}], "max_tokens": 4}
    many = {"messages": [{"role": "user", "content": f"hi {i}"} for i in range(10000)], "max_tokens": 4}
    assert 1_000_000 < len(json.dumps(forged)) < 1 << 20 and len(json.dumps(many)) > 250_000

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            hostile = [asyncio.create_task(c.post(CHAT_PATH, json=body))
                       for body in [forged] + [many] * 8]
            normal = asyncio.create_task(c.post(CHAT_PATH, json=chat()))
            health = []
            while not all(t.done() for t in hostile) or not health:
                t0 = time.perf_counter()
                r = await c.get("/health", timeout=10)
                health.append((r.status_code, time.perf_counter() - t0))
            return await asyncio.gather(*hostile), await normal, health

    hostile, normal, health = asyncio.run(asyncio.wait_for(main(), 60))
    for r in hostile:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert normal.status_code == 200
    assert all(status == 200 and seconds < 5 for status, seconds in health), health


def test_a_client_that_hangs_up_mid_body_is_not_an_error(timed_server):
    url, log = timed_server
    port = int(url.rsplit(":", 1)[1])
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\": \"hel")
            time.sleep(0.2)
    assert post(url, COMPLETION_PATH, PROMPT).status_code == 200
    text = log.read_text()
    assert "Exception in ASGI application" not in text and "Traceback" not in text, text[-3000:]


def test_slow_clients_are_disconnected(timed_server):
    """13 connections that never finish a request (idle, a head or a body sent a few bytes at a
    time) are closed by the server once their 2 s are up; /health answers meanwhile."""
    url, log = timed_server
    port = int(url.rsplit(":", 1)[1])
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"

    async def slow(kind: str) -> float | None:
        """Seconds until the server closed the connection (None: still open after 20 s)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.perf_counter()
        drip = {"idle": b"", "head": head, "body": head + b'{"prompt": "' + b"x" * 80}[kind]
        sent = 0 if kind != "body" else len(head)
        try:
            while time.perf_counter() - t0 < 20:
                if sent < len(drip):
                    writer.write(drip[sent:sent + 2])
                    sent += 2
                try:
                    if await asyncio.wait_for(reader.read(1000), 0.25) == b"":
                        return time.perf_counter() - t0
                except asyncio.TimeoutError:
                    pass
        except ConnectionError:
            return time.perf_counter() - t0
        finally:
            writer.close()
        return None

    async def main():
        conns = [asyncio.create_task(slow(kind)) for kind in ["idle"] * 5 + ["head"] * 4 + ["body"] * 4]
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            health = (await c.get("/health")).status_code
        return await asyncio.gather(*conns), health

    closed, health = asyncio.run(main())
    assert health == 200
    assert all(s is not None for s in closed), closed
    assert log.read_text().count("a request that did not arrive within 2 s: disconnected") >= 13
