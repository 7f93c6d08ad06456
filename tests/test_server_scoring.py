"""The server as evaluation harnesses use it (python/blendin_cpp/server/scoring.py, tokenizer.py):
echo with logprobs on /v1/completions scored by the policy, token-id prompts, lists of prompts,
the end token's logprob, vLLM's tokenizer endpoints, fields sent with no-op values, and the
request sequence of lm-evaluation-harness's `local-completions` with `tokenizer_backend=remote`
(replayed here with plain HTTP, so CI needs no lm-eval)."""
import asyncio
import json
from operator import itemgetter

import httpx
import numpy as np
import pytest

import blendin_cpp as bc
from blendin_cpp import demo
from blendin_cpp.chat_template import base_transcript, render
from test_server import AUTH, CTX, KEY, post, serve

openai = pytest.importorskip("openai")

QUESTIONS = [json.loads(line) for line in open(demo.demo_dir() / "dev.jsonl", encoding="utf-8")][:4]
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo pair at the server's defaults (blendin, gamma 0.4, auto alpha, greedy)."""
    yield from serve(["--threads", "1"], tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def blender():
    """The same pair in this process, loaded as the server loads it: what the answers must equal."""
    kw = dict(n_ctx=CTX, n_threads=1)
    return bc.Blender(bc.Model(demo.demo_path("base"), **kw), bc.Model(demo.demo_path("guide"), **kw))


def tokenize(server, text, add_special_tokens=False):
    r = post(server, "/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# ---- vLLM's tokenizer endpoints ---------------------------------------------------------------------
def test_tokenizer_endpoints_in_vllm_shapes(server, blender):
    base = blender.base
    info = httpx.get(f"{server}/tokenizer_info", headers=AUTH).json()
    assert info["bos_token"] == "<s>" and info["eos_token"] == "</s>" and "pad_token" in info
    assert info["add_bos_token"] is True and info["model_max_length"] == CTX
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 38 + 41?"},
            {"role": "assistant", "content": "79."}, {"role": "user", "content": "And 2 + 2?"}]
    # the chat template renders what /v1/chat/completions gives the base
    assert render(info["chat_template"], chat) == base_transcript(chat)

    text = "Question: What is the capital of Gafashe?\nAnswer:"
    r = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert set(r) == {"count", "max_model_len", "tokens", "token_strs"} and r["token_strs"] is None
    assert r["tokens"] == base.tokenize(text, add_special=False) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CTX
    with_bos = post(server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()  # vLLM's default: add
    assert with_bos["tokens"] == [base.special_tokens["bos"]] + r["tokens"]
    assert with_bos["token_strs"][0] == "<s>" and "".join(with_bos["token_strs"][1:]) == text
    # control-token text is the control token, as lm-eval's eos_token_id expects
    assert tokenize(server, info["eos_token"]) == [base.special_tokens["eos"]]
    assert tokenize(server, info["bos_token"]) == [base.special_tokens["bos"]]
    back = post(server, "/detokenize", {"tokens": with_bos["tokens"]}).json()
    assert back == {"prompt": text}  # control tokens left out: the text reads back as the same prompt


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "hi", "text": "hi"}, "text"),
    ("/tokenize", {"text": "hi"}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/detokenize", {"tokens": [1, -2]}, "tokens.1"),
    ("/detokenize", {"tokens": [10 ** 6]}, "tokens"),
    ("/detokenize", {}, "tokens"),
])
def test_tokenizer_endpoints_reject_bad_bodies(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tokenizer_endpoints_need_the_key(server):
    assert httpx.get(f"{server}/tokenizer_info").status_code == 401
    assert post(server, "/tokenize", {"prompt": "hi"}, headers={}).status_code == 401
    assert post(server, "/detokenize", {"tokens": [1]}, headers={}).status_code == 401


# ---- echo: the prompt's log-probabilities under the policy -------------------------------------------------
@pytest.mark.parametrize("method", ["base", "guide", "nudging", "nudging_word", "blendin", "ensemble"])
def test_echo_scores_the_prompt_like_blender_score(server, blender, method):
    """The server reads an echoed prompt as plain text for both models: its numbers are
    Blender.score(..., template=False) on the same tokens (the server adds the base's start token
    before token ids that lack it, and shows only the ids sent, the first with no logprob)."""
    text = "Question: What is the capital of Gafashe?\nAnswer: Sure! Its capital is Mudozi."
    ids = blender.base.tokenize(text, add_special=False)
    r = post(server, COMPLETIONS, {"prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 1, "method": method})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1  # the prompt, then the one generated token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    bos = blender.base.special_tokens["bos"]
    want = blender.score([bos], ids, template=False, method=method, top_logprobs=2)
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], want.logprobs[1:], atol=2e-3, rtol=0)
    assert lp["tokens"][:len(ids)] == [blender.base.piece(t).decode() for t in ids]
    for top, step in zip(lp["top_logprobs"][1:len(ids)], want.steps[1:]):
        assert list(top) == [blender.base.piece(t, special=True).decode() for t, _ in step.top_logprobs]
    assert lp["text_offset"][:3] == [0, len("Question"), len("Question:")]
    assert r.json()["choices"][0]["text"].startswith(text)


def test_echo_of_a_string_prompt_shows_the_start_token(server, blender):
    text = "What is 38 + 41?"
    r = post(server, COMPLETIONS, {"prompt": text, "echo": True, "logprobs": 0, "max_tokens": 3}).json()
    c = r["choices"][0]
    lp = c["logprobs"]
    assert lp["tokens"][0] == "<s>" and lp["token_logprobs"][0] is None
    assert len(lp["tokens"]) == len(blender.base.tokenize(text)) + 3 and lp["top_logprobs"][1] == {}
    plain = post(server, COMPLETIONS, {"prompt": text, "max_tokens": 3}).json()["choices"][0]
    assert c["text"] == text + plain["text"]  # echo changes what is shown, not what is generated
    no_lp = post(server, COMPLETIONS, {"prompt": text, "echo": True, "max_tokens": 3}).json()["choices"][0]
    assert no_lp["text"] == c["text"] and no_lp["logprobs"] is None


def test_end_token_gets_its_logprob(server):
    """A one-token request whose token is the end token: the legacy format lists it (lm-eval
    slices [ctxlen:-1], so a missing last entry would shift every number)."""
    prompt = "Question: What is the capital of Gafashe?\nAnswer: Its capital city is Mudozi."
    c = post(server, COMPLETIONS, {"prompt": prompt, "max_tokens": 1, "logprobs": 1, "method": "base"}).json()
    choice = c["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == ""
    assert choice["logprobs"]["tokens"] == ["</s>"] and -5 < choice["logprobs"]["token_logprobs"][0] <= 0
    assert c["usage"]["completion_tokens"] == 0  # the end token is not a token of the text
    streamed = httpx.post(f"{server}{COMPLETIONS}", headers=AUTH, json={
        "prompt": prompt, "max_tokens": 1, "logprobs": 1, "method": "base", "stream": True}, timeout=60).text
    chunks = [json.loads(x[6:]) for x in streamed.splitlines() if x.startswith("data: {")]
    tokens = [t for ch in chunks for c in ch["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert tokens == ["</s>"]


# ---- token ids and lists of prompts ------------------------------------------------------------------
def test_token_id_prompts_generate_as_their_text(server, blender):
    for q in QUESTIONS[:2]:
        text = f"Question: {q['question']}\nAnswer:"
        ids = blender.base.tokenize(text, add_special=False)
        body = {"max_tokens": 16, "stop": ["\n"]}
        by_text = post(server, COMPLETIONS, {"prompt": text, **body}).json()
        by_ids = post(server, COMPLETIONS, {"prompt": ids, **body}).json()
        as_list = post(server, COMPLETIONS, {"prompt": [ids], **body}).json()  # what lm-eval sends
        assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"] == as_list["choices"][0]["text"]
        assert by_ids["usage"] == by_text["usage"]


def test_lists_of_prompts_answer_in_order(server):
    prompts = [f"Question: {q['question']}\nAnswer:" for q in QUESTIONS]
    r = post(server, COMPLETIONS, {"prompt": prompts, "max_tokens": 12, "stop": ["\n"]})
    assert r.status_code == 200, r.text
    body = r.json()
    one_by_one = [post(server, COMPLETIONS, {"prompt": p, "max_tokens": 12, "stop": ["\n"]}).json() for p in prompts]
    assert [c["index"] for c in body["choices"]] == list(range(len(prompts)))
    assert [c["text"] for c in body["choices"]] == [o["choices"][0]["text"] for o in one_by_one]
    assert body["usage"]["prompt_tokens"] == sum(o["usage"]["prompt_tokens"] for o in one_by_one)
    assert body["usage"]["completion_tokens"] == sum(o["usage"]["completion_tokens"] for o in one_by_one)
    assert [c["blend"]["tokens"] for c in body["choices"]] == [o["blend"]["tokens"] for o in one_by_one]


def test_openai_client_echo_lists_and_no_op_fields(client, blender):
    ids = [blender.base.tokenize(f"Question: {q['question']}\nAnswer:", add_special=False) for q in QUESTIONS[:2]]
    r = client.completions.create(model="demo", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0,
                                  seed=1234, logit_bias={}, suffix=None, user="u", n=1, presence_penalty=0,
                                  frequency_penalty=0, extra_body={"method": "nudging", "metadata": {"run": "t"},
                                                                   "store": False, "response_format": {"type": "text"}})
    assert [c.index for c in r.choices] == [0, 1]
    for c, q, p in zip(r.choices, QUESTIONS, ids):
        assert c.text.startswith(f"Question: {q['question']}\nAnswer:")
        assert len(c.logprobs.tokens) == len(p) + 1 and c.logprobs.token_logprobs[0] is None
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is 38 + 41?"}],
                                          max_tokens=4, tool_choice="none", parallel_tool_calls=False,
                                          response_format={"type": "text"}, logit_bias={}, store=False,
                                          metadata={"run": "t"})
    assert chat.choices[0].message.content


NO_OPS_REFUSED = [
    ("logit_bias", {"logit_bias": {"5": 10}}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("store", {"store": True}),
    ("suffix", {"suffix": " the end"}),
]


@pytest.mark.parametrize("field, extra", NO_OPS_REFUSED, ids=[f for f, _ in NO_OPS_REFUSED])
def test_fields_with_values_that_would_change_something_are_refused(server, field, extra):
    r = post(server, COMPLETIONS, {"prompt": "Hello", "max_tokens": 2, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "gama": 0.5}, "gama"),  # a misspelt field stays an error
    ({"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),  # not a chat field
])
def test_chat_refusals(server, body, param):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("body, param", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": [10 ** 6]}, "prompt"),
    ({"prompt": ["a", "b"], "stream": True}, "stream"),
    ({"prompt": "a", "echo": True, "stream": True}, "stream"),
    ({"prompt": ["a", "b"], "n": 2}, "n"),
    ({"prompt": "a", "echo": "yes"}, "echo"),
    ({"prompt": "a", "gama": 0.5}, "gama"),
])
def test_bad_prompts(server, body, param):
    r = post(server, COMPLETIONS, {"max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_model_name_chooses_the_method(server):
    def text(**kw):
        return post(server, COMPLETIONS, {"prompt": "What is the capital of Gafashe?", "max_tokens": 10, **kw}
                    ).json()["choices"][0]["text"]
    guide, base, default = text(method="guide"), text(method="base"), text()
    assert len({guide, base, default}) == 3
    assert text(model="demo:guide") == guide and text(model="anything:base") == base
    assert text(model="gpt-4") == text(model="llama3:8b") == default  # other names change nothing
    assert text(model="demo:guide", method="base") == base  # the field wins


# ---- the request sequence of lm-evaluation-harness 0.4.13 --------------------------------------------
class RemoteTokenizer:
    """What lm_eval.utils.RemoteTokenizer sends."""

    def __init__(self, server):
        self.server = server
        self.info = httpx.get(f"{server}/tokenizer_info", headers=AUTH).json()

    def encode(self, text):
        return tokenize(self.server, text)

    @property
    def eos_token_id(self):
        return self.encode(self.info["eos_token"])[0]


def encode_pair(tok, context, continuation):
    """lm_eval.api.model.TemplateLM._encode_pair for a causal model."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def parse_logprobs(out, ctxlens):
    """lm_eval.models.openai_completions.LocalCompletionsAPI.parse_logprobs."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(t == max(top.values()) for t, top in zip(lps, tops))))
    return res


def test_lm_eval_request_sequence(server, blender):
    """Multiple choice (loglikelihood, batches of 4 as --batch_size 4 sends them) and generation
    (generate_until) as local-completions sends them, with the harness's own parsing: the
    log-likelihoods are the policy's (Blender.score on the plain-text view), the choices come back
    in order, and the generation equals the string prompt's."""
    tok = RemoteTokenizer(server)
    assert tok.eos_token_id == blender.base.special_tokens["eos"]
    bos = blender.base.special_tokens["bos"]
    capitals = [q["value"] for q in QUESTIONS if q["kind"] == "capital"]
    for q in [q for q in QUESTIONS if q["kind"] == "capital"]:
        context = f"Question: {q['question']}\nAnswer:"
        pairs = [encode_pair(tok, context, f" Sure! Its capital is {c}.") for c in capitals]
        inputs = [ctx + cont for ctx, cont in pairs]
        body = {"model": "demo:nudging", "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1,
                "seed": 1234, "echo": True}
        r = post(server, COMPLETIONS, body, timeout=120)
        assert r.status_code == 200, r.text
        got = parse_logprobs(r.json(), [len(ctx) for ctx, _ in pairs])
        for (ll, greedy), (ctx, cont) in zip(got, pairs):
            want = blender.score([bos], ctx + cont, template=False, method="nudging")
            assert ll == pytest.approx(sum(want.logprobs[len(ctx):]), abs=5e-3)
            assert greedy == all(s.token == s.top_logprobs[0][0] for s in
                                 blender.score([bos], ctx + cont, template=False, method="nudging",
                                               top_logprobs=1).steps[len(ctx):])
        # the right capital is the likeliest under the pair (the base knows the facts)
        assert int(np.argmax([ll for ll, _ in got])) == capitals.index(q["value"])
    # generate_until: token ids in a list, the task's stop strings and the eos text
    q = QUESTIONS[0]
    context = f"Question: {q['question']}\nAnswer:"
    gen = post(server, COMPLETIONS, {"prompt": [tok.encode(context)], "model": "demo", "max_tokens": 32,
                                     "temperature": 0, "stop": ["\n", tok.info["eos_token"]], "seed": 1234,
                                     "method": "nudging_word"}).json()
    plain = post(server, COMPLETIONS, {"prompt": context, "max_tokens": 32, "stop": ["\n"],
                                       "method": "nudging_word"}).json()
    assert gen["choices"][0]["text"] == plain["choices"][0]["text"] == " " + q["answer"]


# ---- a guide with its own tokenizer -----------------------------------------------------------------
def test_echo_with_a_bridged_guide_equals_blender_score():
    from blendin_cpp import server as srv
    kw = dict(n_ctx=512, n_threads=1)
    blender = bc.Blender(bc.Model(demo.demo_path("base"), **kw), bc.Model(demo.demo_path("guide-xvocab"), **kw))
    defaults = dict(max_tokens=4, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=[])
    server = srv.Server(blender, model_id="m", defaults=defaults)
    text = "Question: What is 38 + 41?\nAnswer: Sure! The sum is 79."

    async def main():
        transport = httpx.ASGITransport(app=srv.create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.post(COMPLETIONS, json={"prompt": text, "echo": True, "logprobs": 1, "max_tokens": 1,
                                                    "method": "ensemble"})).json()
    lp = asyncio.run(main())["choices"][0]["logprobs"]
    server.close()
    ids = blender.base.tokenize(text)
    want = blender.score(ids[:1], ids[1:], template=False, method="ensemble")
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], want.logprobs, atol=1e-4, rtol=0)
    assert set(want.sources) == {"blend"}


# ---- the example tasks (examples/lm_eval) -----------------------------------------------------------
def test_example_multiple_choice_items():
    """utils.multiple_choice on the dev questions (a stand-in for datasets.Dataset.map): four
    distinct choices, the expected answer at the label, the others the same sentence with another
    value of the same kind."""
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "examples" / "lm_eval"
    spec = importlib.util.spec_from_file_location("lm_eval_demo_utils", root / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)

    class Rows(list):
        def map(self, fn, with_indices):
            return [dict(d, **fn(d, i)) for i, d in enumerate(self)]
    rows = Rows(json.loads(line) for line in open(demo.demo_dir() / "dev.jsonl", encoding="utf-8"))
    items = utils.multiple_choice(rows)
    assert len(items) == 150 and {d["label"] for d in items} == {0, 1, 2, 3}
    values = {d["kind"]: set() for d in rows}
    for d in rows:
        values[d["kind"]].add(d["value"])
    for d in items:
        assert len(set(d["choices"])) == 4 and d["choices"][d["label"]] == d["answer"]
        for i, c in enumerate(d["choices"]):
            if i != d["label"]:
                other = c[len(d["answer"].split(d["value"])[0]):].rstrip(".")
                assert other in values[d["kind"]] and other != d["value"]
    for task in ("demo_mc.yaml", "demo_gen.yaml"):
        assert "test: models/demo/dev.jsonl" in (root / task).read_text()
