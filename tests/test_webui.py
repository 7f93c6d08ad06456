"""The chat page at / (python/blendin_cpp/server/webui/) in a real browser: Debian's chromium and
chromium-driver, driven by selenium, against `python -m blendin_cpp serve` with the bundled demo
models on 127.0.0.1. Also the API the page reads: `trace` (each token's source, alpha, pb_max,
pg_max in the stream) and GET /v1/parameters.

Without chromium these tests skip on a developer's machine and fail in CI (CI=true): install it
with `apt-get install chromium chromium-driver`. BLENDIN_WEBUI_SCREENSHOT=PATH also writes the
screenshot the docs show (docs/webui.png) to PATH.
"""
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import load_server  # noqa: E402

DEMO = ROOT / "models" / "demo"
AVS = [ROOT / "models" / "av" / "capitals-expert.gguf", ROOT / "models" / "av" / "sums-expert.gguf"]
QUESTION = "What is the capital of Gafashe?"
CHAT = [{"role": "user", "content": QUESTION}]
LONG = "hi"  # on long_server's models, greedy answers to this one run to max_tokens (no end token)
WAIT_S = 60  # the longest a page may take to show what a test waits for


def need(what: str):
    """A missing browser skips here and fails in CI, where it must be installed."""
    message = f"{what} is needed for the browser tests: apt-get install chromium chromium-driver; pip install selenium"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo pair with two Alignment Vectors (so the settings show their scales); room for long answers."""
    port = load_server.free_port()
    log = tmp_path_factory.mktemp("webui") / "server.log"
    av = [a for path in AVS for a in ("--av", f"{path}:0.0")]
    proc = load_server.start_server(["--threads", "1", *av], port=port, log_path=str(log),
                                    extra=["--ctx", "4096", "--max-tokens-limit", "4000"])
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """Two generated random-weight models: greedy blendin answers run to max_tokens (the demo
    models end theirs after a sentence), long enough to stop one halfway."""
    directory = tmp_path_factory.mktemp("webui_long")
    port = load_server.free_port()
    proc = load_server.start_server(load_server.generated_model_args(directory), port=port,
                                    log_path=str(directory / "server.log"),
                                    extra=["--ctx", "4096", "--max-tokens-limit", "4000"])
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        need("selenium")
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver_path):
        need("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,860", "--lang=en-US", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


def api(server, body: dict, path="/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=120)


class Page:
    """The chat page in the browser, through its test hooks (data-testid)."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait
        self.driver, self.url = driver, url
        self.wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.05)

    def open(self, fresh: bool = True) -> "Page":
        self.driver.get(self.url)
        if fresh:  # no conversations or settings from an earlier test
            self.driver.execute_script("localStorage.clear()")
            self.driver.get(self.url)
        self.wait.until(lambda d: self.js("return document.querySelectorAll('[data-testid=method] option').length"))
        return self

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def el(self, testid: str):
        return self.driver.find_element("css selector", f'[data-testid="{testid}"]')

    def ask(self, question: str) -> None:
        self.el("prompt").send_keys(question)
        self.el("send").click()

    def answers(self) -> list[dict]:
        """Each assistant message: its method, [(source, text)] per token element, stats and warning."""
        return self.js("""
            return [...document.querySelectorAll('[data-testid=assistant]')].map(a => ({
                method: a.dataset.method,
                tokens: [...a.querySelectorAll('[data-source]')].map(t => [t.dataset.source, t.textContent]),
                stats: a.querySelector('[data-testid=stats]').textContent,
                warning: a.querySelector('[data-testid=warning]').textContent,
                streaming: a.classList.contains('streaming')}))""")

    def wait_answers(self, n: int) -> list[dict]:
        """Once there are n answers and all of them have ended (their stats line is there)."""
        self.wait.until(lambda d: len(a := self.answers()) == n and all(x["stats"] for x in a))
        return self.answers()

    def set_param(self, name: str, value: str) -> None:
        if not self.el("settings").is_displayed():
            self.el("settings-button").click()
        field = self.el(f"param-{name}")
        field.clear()
        field.send_keys(value)

    def choose_method(self, method: str) -> None:
        from selenium.webdriver.support.ui import Select
        Select(self.el("method")).select_by_value(method)


def open_page(browser, url: str) -> Page:
    browser.set_window_size(1280, 860)
    return Page(browser, url + "/").open()


@pytest.fixture
def page(browser, server):
    return open_page(browser, server)


def chat_fields(server) -> dict:
    """What the page sends for its empty settings: the chat's defaults where they are not the server's."""
    table = httpx.get(f"{server}/v1/parameters", timeout=10).json()
    return {p["name"]: p["chat_default"] for p in table["parameters"]
            if p["name"] != "method" and p["chat_default"] != p["default"]}


def trace(server, body: dict) -> tuple[list[tuple[str, str]], dict]:
    """The API's answer to the page's request, alone: [(source, text)] per token and its statistics."""
    system = httpx.get(f"{server}/v1/parameters", timeout=10).json()["system"]
    if system and "messages" in body:  # the page sends the chat's system prompt first
        body = {**body, "messages": [{"role": "system", "content": system}, *body["messages"]]}
    r = api(server, {**chat_fields(server), **body, "trace": True})
    assert r.status_code == 200, r.text
    d = r.json()
    return [(s["source"], s["text"]) for s in d["steps"]], d["blend"]


# ---- the API the page reads ---------------------------------------------------------------------
def test_trace_streams_each_tokens_source(server):
    """trace: every streamed chunk carries its token's step; their texts are the answer; the final
    chunk the statistics; the whole answer lists the same steps."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)
    body = {"model": "demo", "messages": CHAT, "max_tokens": 24}
    steps, text, stats, used = [], "", None, None
    for chunk in client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True},
                                                extra_body={"trace": True, "gamma": 0.6}):
        extra = chunk.model_extra
        if chunk.choices and chunk.choices[0].delta.content:
            assert len(extra["steps"]) == 1 and extra["steps"][0]["text"] == chunk.choices[0].delta.content
        steps += extra.get("steps", [])
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        stats, used = extra.get("blend", stats), chunk.usage or used
    assert steps and "".join(s["text"] for s in steps) == text
    assert len(steps) == used.completion_tokens  # one step per token of the text
    assert {s["source"] for s in steps} <= {"base", "blend", "guide"} and stats["tokens"] >= len(steps)
    assert all(set(s) >= {"token", "source", "alpha", "pb_max", "pg_max", "intervened", "capped"} for s in steps)
    assert any(s["source"] == "blend" for s in steps) and any(s["source"] == "base" for s in steps)
    whole = client.chat.completions.create(**body, extra_body={"trace": True, "gamma": 0.6})
    # the same steps; this second request reads the prompt's last token alone after the first's
    # cache, and the demo pair's f32/f16 weights round a one-row decode a little differently
    # (docs/server.md, "Batching and rounding"): the numbers agree to rounding
    key = ("token", "text", "source", "intervened", "capped", "looped", "finish_reason")
    assert [[s[k] for k in key] for s in whole.model_extra["steps"]] == [[s[k] for k in key] for s in steps]
    for a, b in zip(whole.model_extra["steps"], steps):
        for k in ("pb_max", "pg_max", "alpha", "logprob"):
            assert (a[k] is None) == (b[k] is None), k
            assert a[k] is None or a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), k
    # as `generate --trace`: with the vocabulary-sized diagnostics where the guide was consulted
    assert all((s["overlap"] is None) == (s["pg_max"] is None) for s in steps)
    plain = client.chat.completions.create(**body, stream=True)
    assert all("steps" not in c.model_extra for c in plain)


def test_trace_is_refused_where_there_is_no_single_answer(server):
    r = api(server, {"messages": CHAT, "n": 2, "trace": True, "temperature": 1.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "trace"
    r = api(server, {"prompt": ["a", "b"], "trace": True}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "trace"
    r = api(server, {"prompt": "Question: hi\nAnswer:", "max_tokens": 4, "trace": True}, path="/v1/completions")
    assert r.status_code == 200 and len(r.json()["steps"]) >= r.json()["usage"]["completion_tokens"]


def test_parameters_are_the_servers_table(server):
    from blendin_cpp.blender import RANGES
    table = httpx.get(f"{server}/v1/parameters", timeout=10).json()
    params = {p["name"]: p for p in table["parameters"]}
    assert params["method"]["choices"][:2] == ["base", "guide"] and "blendin" in params["method"]["choices"]
    assert "proxy" not in params["method"]["choices"]  # started without the anti model
    assert params["method"]["default"] == "blendin"
    lo, hi, lo_open, hi_open, integer, text = RANGES["top_p"]
    assert params["top_p"].items() >= {"type": "number", "min": lo, "max": hi, "min_exclusive": lo_open,
                                       "max_exclusive": hi_open, "range": text, "default": 1.0}.items()
    assert params["gamma"]["max"] == RANGES["gamma"][1] and params["gamma"]["default"] == 0.4
    # the repetition controls are in the table through the core's ranges
    assert params["dry_multiplier"]["default"] == 0.0 and params["loop_gate"]["type"] == "integer"
    assert params["alpha"]["choices"] == ["auto"] and params["alpha"]["default"] == "auto"
    assert params["max_tokens"]["type"] == "integer" and params["max_tokens"]["max"] == 4000
    assert "top_logprobs" not in params and "stream" not in params
    assert table["av_scales"] == {"capitals-expert": 0.0, "sums-expert": 0.0}
    # every parameter listed is one a request may send
    r = api(server, {"messages": CHAT, "max_tokens": 2, **{p: params[p]["default"] for p in params
                                                           if params[p]["default"] is not None}})
    assert r.status_code == 200, r.text


def test_the_page_starts_from_the_chats_defaults_unless_serve_set_its_own(server, tmp_path):
    """The terminal chat's defaults (greedy, guide_ends, the repetition controls) are what the page
    sends for empty fields; API clients keep the server's (OpenAI's: no penalties); a value given to
    `serve` is the page's too."""
    from blendin_cpp.chat import CHAT_DEFAULTS
    want = {k: v for k, v in CHAT_DEFAULTS.items() if k in ("guide_ends", "frequency_penalty", "dry_multiplier",
                                                            "loop_gate")}
    assert chat_fields(server) == want and want["frequency_penalty"] > 0 and want["guide_ends"] is True
    table = {p["name"]: p for p in httpx.get(f"{server}/v1/parameters", timeout=10).json()["parameters"]}
    assert table["frequency_penalty"]["default"] == 0.0 and table["temperature"]["chat_default"] == 0.0
    port = load_server.free_port()
    proc = load_server.start_server(["--threads", "1", "--frequency-penalty", "0.5", "--loop-gate", "6"], port=port,
                                    log_path=str(tmp_path / "server.log"))
    try:
        url = f"http://127.0.0.1:{port}"
        own = chat_fields(url)
        table = {p["name"]: p for p in httpx.get(f"{url}/v1/parameters", timeout=10).json()["parameters"]}
    finally:
        proc.terminate()
        proc.wait(30)
    # serve's values are the API's defaults and the page's: the page need not send them
    assert own == {"guide_ends": True, "dry_multiplier": 0.8}
    assert table["frequency_penalty"]["default"] == table["frequency_penalty"]["chat_default"] == 0.5
    assert table["loop_gate"]["default"] == table["loop_gate"]["chat_default"] == 6


def sent_body(page: Page, question: str) -> dict:
    """The body of the chat request the page sends for `question` (its fetch, recorded)."""
    page.js("window.sent = []; const f = window.fetch; window.fetch = (url, opts) => {"
            " if (String(url).includes('chat/completions')) window.sent.push(JSON.parse(opts.body));"
            " return f(url, opts); }")
    page.ask(question)
    page.wait_answers(1)
    (body,) = page.js("return window.sent")
    return body


def test_the_page_sends_the_chats_defaults_and_what_is_typed(page, server):
    page.set_param("dry_multiplier", "1.5")
    body = sent_body(page, QUESTION)
    assert body.items() >= {**chat_fields(server), "dry_multiplier": 1.5}.items(), body
    assert "temperature" not in body  # the chat's is the server's: left to it
    assert body["messages"] == [{"role": "user", "content": QUESTION}]  # the demo pair: no system prompt


def test_on_another_pair_the_page_sends_the_chats_system_prompt_first(browser, long_server):
    from blendin_cpp.chat import CHAT_SYSTEM
    assert httpx.get(f"{long_server}/v1/parameters", timeout=10).json()["system"] == CHAT_SYSTEM
    page = open_page(browser, long_server)
    page.set_param("max_tokens", "4")
    body = sent_body(page, LONG)
    assert body["messages"] == [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": LONG}]


def test_the_page_is_served_from_the_package_alone(server):
    from blendin_cpp.server.app import WEBUI_DIR
    r = httpx.get(f"{server}/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    files = sorted(p.name for p in WEBUI_DIR.iterdir())
    assert {"index.html", "app.js", "api.js", "answer.js", "settings.js", "store.js", "style.css"} <= set(files)
    for name in files:
        text = (WEBUI_DIR / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
        if name != "index.html":
            got = httpx.get(f"{server}/webui/{name}", timeout=10)
            assert got.status_code == 200 and got.text == text
    assert "javascript" in httpx.get(f"{server}/webui/app.js", timeout=10).headers["content-type"]


def test_no_webui_leaves_the_api_alone():
    """--no-webui: no page at /, the API as before (in process, on the demo pair)."""
    import blendin_cpp as bc
    from blendin_cpp.cli import build_parser
    from blendin_cpp.server import Server, create_app

    assert build_parser().parse_args(["serve", "--no-webui"]).no_webui
    assert not build_parser().parse_args(["serve"]).no_webui
    base, guide = (bc.Model(str(DEMO / f"{n}.gguf"), n_ctx=256, n_threads=1) for n in ("base", "guide"))
    defaults = dict(max_tokens=4, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=[])
    server = Server(bc.Blender(base, guide), model_id="m", defaults=defaults)

    async def go(webui):
        transport = httpx.ASGITransport(app=create_app(server, webui=webui))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [await c.get(p) for p in ("/", "/webui/app.js", "/v1/parameters")]
    try:
        off, on = asyncio.run(go(False)), asyncio.run(go(True))
    finally:
        server.close()
    assert [r.status_code for r in off] == [404, 404, 200]
    assert off[0].json()["error"]["code"] == "not_found"
    assert [r.status_code for r in on] == [200, 200, 200]


# ---- the page in the browser --------------------------------------------------------------------
def test_answer_tokens_coloured_by_source_with_tooltip_and_stats(page, server):
    """The answer is the server's, token by token with the sources the trace gives; a tooltip per
    token; the stats line; a second turn reads the first."""
    from selenium.webdriver.common.action_chains import ActionChains
    page.ask(QUESTION)
    (answer,) = page.wait_answers(1)
    want, stats = trace(server, {"messages": CHAT, "method": "blendin"})
    assert [tuple(t) for t in answer["tokens"]] == want
    assert answer["method"] == "blendin"
    assert answer["stats"].startswith(f"{stats['tokens']} tokens \u00b7 intervention rate "
                                      f"{round(100 * stats['intervention_rate'])}% \u00b7 ")
    assert "tok/s" in answer["stats"] and answer["stats"].endswith("method blendin")
    assert page.el("stats").is_displayed()

    first = page.driver.find_elements("css selector", '[data-testid="assistant"] [data-source]')[0]
    ActionChains(page.driver).move_to_element(first).perform()
    page.wait.until(lambda d: page.el("tooltip").is_displayed())
    tip = page.el("tooltip").text
    source, text = want[0]
    assert f"source  {source}" in tip and "alpha" in tip and "base top p" in tip and "guide top p" in tip
    assert json.dumps(text.replace(" ", "\u2423"), ensure_ascii=False) in tip
    gate = {"blend": "open: the guide was consulted", "base": "closed: the base was confident enough"}[source]
    assert f"gate  {gate}" in tip

    page.ask("And its flag?")
    second = page.wait_answers(2)[1]
    history = [*CHAT, {"role": "assistant", "content": "".join(t for _, t in want)},
               {"role": "user", "content": "And its flag?"}]
    assert [tuple(t) for t in second["tokens"]] == trace(server, {"messages": history, "method": "blendin"})[0]


def test_method_base_gives_only_base_tokens(page, server):
    from selenium.webdriver.common.action_chains import ActionChains
    page.choose_method("base")
    page.ask(QUESTION)
    (answer,) = page.wait_answers(1)
    assert answer["tokens"] and {s for s, _ in answer["tokens"]} == {"base"}
    assert answer["stats"].endswith("method base") and "intervention rate 0%" in answer["stats"]
    token = page.driver.find_element("css selector", '[data-testid="assistant"] [data-source]')
    ActionChains(page.driver).move_to_element(token).perform()
    page.wait.until(lambda d: "gate  none: the base writes alone" in page.el("tooltip").text)
    page.open(fresh=False)  # the choice is kept
    assert page.el("method").get_attribute("value") == "base"


def test_settings_change_takes_effect(page, server):
    """A value typed in the panel goes with the request: max_tokens 3 ends the answer at 3 tokens."""
    page.set_param("max_tokens", "3")
    page.ask(QUESTION)
    (answer,) = page.wait_answers(1)
    assert len(answer["tokens"]) == 3 and "ended by length" in answer["stats"]


def test_refused_value_shows_the_servers_message(page, server):
    page.set_param("temperature", "-1")
    page.ask(QUESTION)
    message = api(server, {"messages": CHAT, "temperature": -1}).json()["error"]["message"]
    page.wait.until(lambda d: page.el("error").is_displayed())
    assert page.el("error").text == message and "temperature" in message
    assert page.answers() == []  # nothing was said: the question is back in the box
    assert page.el("prompt").get_attribute("value") == QUESTION
    assert "invalid" in page.driver.find_element("css selector", '[data-param="temperature"]').get_attribute("class")
    page.set_param("alpha", "sometimes")
    page.set_param("temperature", "0")
    page.el("send").click()
    message = api(server, {"messages": CHAT, "alpha": "sometimes"}).json()["error"]["message"]
    page.wait.until(lambda d: page.el("error").text == message)


def test_compare_answers_with_base_guide_and_the_method(page, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    page.el("compare").click()
    page.ask(QUESTION)
    answers = page.wait_answers(3)
    assert [a["method"] for a in answers] == ["base", "guide", "blendin"]
    assert {s for s, _ in answers[0]["tokens"]} == {"base"}
    assert {s for s, _ in answers[1]["tokens"]} == {"guide"}
    assert answers[2]["tokens"] and all(a["stats"].endswith(f"method {a['method']}") for a in answers)
    # side by side on a wide window
    tops = page.js("return [...document.querySelectorAll('[data-testid=assistant]')]"
                   ".map(a => Math.round(a.getBoundingClientRect().top))")
    assert len(set(tops)) == 1
    page.driver.set_window_size(1280, 520)  # the screenshot: what there is to see, little empty page
    blend = page.driver.find_elements("css selector", '[data-method="blendin"] [data-source="blend"]')
    target = (blend or page.driver.find_elements("css selector", '[data-method="blendin"] [data-source]'))[0]
    ActionChains(page.driver).move_to_element(target).perform()
    page.wait.until(lambda d: page.el("tooltip").is_displayed())
    shot = tmp_path / "webui.png"
    assert page.driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("BLENDIN_WEBUI_SCREENSHOT"):
        shutil.copy(shot, os.environ["BLENDIN_WEBUI_SCREENSHOT"])


def test_stop_mid_answer(browser, long_server):
    """Tokens with their sources appear while the answer streams; Stop ends it there, and the
    server frees the request at once."""
    page = open_page(browser, long_server)
    page.set_param("max_tokens", "4000")
    # the random models' answers run long only in their loop: none of the chat's ways out of it
    for name, off in (("guide_ends", "false"), ("frequency_penalty", "0"), ("dry_multiplier", "0")):
        page.set_param(name, off)
    page.ask(LONG)
    seen = []
    page.wait.until(lambda d: (a := page.answers()) and a[0]["streaming"] and len(a[0]["tokens"]) >= 3
                    and (seen.append(len(a[0]["tokens"])) or len(set(seen)) >= 2))
    assert {s for s, _ in page.answers()[0]["tokens"]} <= {"base", "blend", "guide"}
    page.el("stop").click()
    (answer,) = page.wait_answers(1)
    assert answer["stats"].endswith("stopped") and not answer["streaming"]
    n = len(answer["tokens"])
    assert 3 <= n < 4000
    deadline = time.monotonic() + 10
    while httpx.get(f"{long_server}/health", timeout=5).json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{long_server}/health", timeout=5).json()["running"] == 0
    assert len(page.answers()[0]["tokens"]) == n  # nothing more arrived
    assert page.el("send").is_displayed() and not page.el("stop").is_displayed()


def test_excessive_intervention_warning(browser, long_server):
    """gamma 1: the guide is consulted at every token, and the server's warning shows under the answer."""
    page = open_page(browser, long_server)
    page.choose_method("nudging")
    page.set_param("gamma", "1")
    page.set_param("max_tokens", "24")
    page.ask(LONG)
    (answer,) = page.wait_answers(1)
    request = {"messages": [{"role": "user", "content": LONG}], "method": "nudging", "gamma": 1, "max_tokens": 24}
    _, stats = trace(long_server, request)
    assert stats["warning"] and answer["warning"] == f"warning: {stats['warning']}"


def test_conversations_are_kept_in_the_browser(page, server):
    page.ask(QUESTION)
    (first,) = page.wait_answers(1)
    page.open(fresh=False)  # reload: the conversation is still there, tokens and colours included
    assert page.answers() == [first]
    titles = page.js("return [...document.querySelectorAll('#conversations .open')].map(b => b.textContent)")
    assert titles == [QUESTION]
    page.el("new-chat").click()
    assert page.answers() == []
    page.choose_method("base")
    page.ask("What colour is the flag of Gafashe?")
    page.wait_answers(1)
    buttons = page.driver.find_elements("css selector", "#conversations .open")
    assert [b.text for b in buttons] == ["What colour is the flag of Gafashe?", QUESTION]
    buttons[1].click()
    assert page.answers() == [first]


def test_copy_an_answer(page, server, browser):
    browser.execute_cdp_cmd("Browser.grantPermissions", {"origin": server, "permissions": ["clipboardReadWrite",
                                                                                         "clipboardSanitizedWrite"]})
    page.ask(QUESTION)
    (answer,) = page.wait_answers(1)
    page.el("copy").click()
    page.wait.until(lambda d: page.el("copy").text == "copied")
    copied = page.driver.execute_async_script("navigator.clipboard.readText().then(arguments[0])")
    assert copied == "".join(t for _, t in answer["tokens"]) and copied


def test_phone_width(page, server):
    page.driver.set_window_size(390, 844)
    page.open(fresh=False)
    page.el("compare").click()
    page.ask(QUESTION)
    page.wait_answers(3)
    assert page.js("return document.documentElement.scrollWidth <= window.innerWidth")
    assert page.js("return document.getElementById('sidebar').getBoundingClientRect().right <= 0")
    lefts = page.js("return [...document.querySelectorAll('[data-testid=assistant]')]"
                    ".map(a => Math.round(a.getBoundingClientRect().left))")
    assert len(set(lefts)) == 1  # the three answers one under another
    page.driver.find_element("id", "toggle-sidebar").click()
    page.wait.until(lambda d: page.js("return document.getElementById('sidebar').getBoundingClientRect().left >= 0"))


def test_api_key_typed_in_the_settings(browser, tmp_path):
    """A server started with --api-key: the page says what is missing and works once the key is typed."""
    from selenium.webdriver.common.keys import Keys
    port = load_server.free_port()
    proc = load_server.start_server(["--threads", "1"], port=port, log_path=str(tmp_path / "server.log"),
                                    extra=["--api-key", "k3y"])
    try:
        page = Page(browser, f"http://127.0.0.1:{port}/")
        browser.get(page.url)
        page.js("localStorage.clear()")
        browser.get(page.url)
        page.wait.until(lambda d: page.el("error").is_displayed())
        assert "API key" in page.el("error").text and page.el("settings").is_displayed()
        browser.find_element("id", "api-key").send_keys("k3y", Keys.TAB)
        page.wait.until(lambda d: not page.el("error").is_displayed())
        page.ask(QUESTION)
        (answer,) = page.wait_answers(1)
        assert answer["tokens"] and answer["stats"].endswith("method blendin")
    finally:
        proc.terminate()
        proc.wait(30)
