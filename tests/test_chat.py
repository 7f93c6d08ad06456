"""`python -m blendin_cpp chat`: driven as a person would in a pseudo-terminal, piped for scripting,
and the multi-turn KV cache reuse of its Chat class measured on the engine's counters.

On the bundled demo pair when models/demo/ has it (the chat's default, so no model arguments),
on generated models otherwise."""
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest

import blendin_cpp as bc
from blendin_cpp import demo
from blendin_cpp.chat import Chat
from blendin_cpp.testing import random_llama

try:
    import pexpect
except ImportError:  # the `test` extra has it
    pexpect = None
needs_pty = pytest.mark.skipif(pexpect is None, reason="needs pexpect")

SUMMARY = r"\[\d+ tokens, [\d.]+ tok/s, intervention rate \d+%, mean alpha [\d.]+"
COLOR_CODES = ("\x1b[33m", "\x1b[32m")  # blend, guide


def has_demo() -> bool:
    try:
        demo.demo_dir()
        return True
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def pair(model_dir, shared_tokenizer):
    """(base path, guide path, the chat's model arguments)."""
    if has_demo():
        return demo.demo_path("base"), demo.demo_path("guide"), []
    base = str(random_llama(model_dir / "c_base.gguf", n_embd=64, n_layer=2, seed=31, logit_std=5,
                            tokenizer=shared_tokenizer))
    guide = str(random_llama(model_dir / "c_guide.gguf", n_embd=32, n_layer=1, n_head=2, seed=32, logit_std=4,
                             tokenizer=shared_tokenizer))
    return base, guide, ["--base", base, "--guide", guide]


def chat_cmd(pair, *extra):
    return [sys.executable, "-m", "blendin_cpp", "chat", *pair[2], "--threads", "1", *extra]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    return {**env, "TERM": "dumb", **extra}


def spawn(pair, *extra, **env):
    cmd = chat_cmd(pair, *extra)
    child = pexpect.spawn(cmd[0], cmd[1:], env=clean_env(**env), encoding="utf-8", codec_errors="replace",
                          timeout=60, dimensions=(50, 200))
    child.logfile_read = io.StringIO()  # everything the terminal showed
    child.expect_exact(">>> ")
    return child


def screen(child) -> str:
    return child.logfile_read.getvalue()


# ---- a person at a terminal ---------------------------------------------------------------------
def left_cleanly(child) -> None:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@needs_pty
def test_terminal_session(pair):
    child = spawn(pair, "--gamma", "0.9", "--ctx", "16384")
    assert re.search(r"loading base model \S+ \.\.\. done \([\d.]+ s\)", screen(child))
    assert re.search(r"loading guide model \S+ \.\.\. done", screen(child))

    # two turns, a /set between them
    child.sendline("What is the capital of Steatair?")
    child.expect(SUMMARY)
    child.expect_exact(">>> ")
    child.sendline("/set temperature 0.7")
    child.expect_exact("temperature = 0.7")
    child.sendline("/set temperature hot")
    child.expect_exact("error: temperature must be a number, not 'hot'")
    child.expect_exact(">>> ")
    child.sendline("And what colour is its flag?")
    child.expect(SUMMARY)
    child.expect_exact(">>> ")

    # /stats: the second answer reused the first turn from the KV caches
    child.sendline("/stats")
    child.expect(r"base : prompt (\d+) tokens, (\d+) reused from the cache")
    prompt, reused = int(child.match.group(1)), int(child.match.group(2))
    assert 0 < reused < prompt
    child.expect(r"session: 2 answers \(0 interrupted\)")
    child.expect(r"settings: method blendin, gamma 0.9")
    child.expect_exact(">>> ")

    # Ctrl+C stops an answer and the chat goes on. With end tokens ignored, the answer runs until
    # max_tokens or half the (large) context: seconds, so the Ctrl+C lands inside it; should one
    # still end first (a stop string), try another seed.
    child.sendline("/set max_tokens 100000")
    child.sendline("/set temperature 50")
    child.sendline("/set ignore_eos 1")
    for seed in range(6):
        child.sendline(f"/set seed {seed}")
        child.expect_exact(f"seed = {seed}")
        child.sendline("/reset")  # a short prompt: nothing to drop, the answer starts at once
        child.expect_exact("new conversation")
        child.expect_exact(">>> ")
        child.sendline("Tell me a very long story.")
        child.expect_exact("Tell me a very long story.\r\n")  # the terminal's echo
        child.expect(r"\S")  # the answer has begun
        child.sendcontrol("c")
        if child.expect([r"\[interrupted after \d+ tokens", SUMMARY]) == 0:
            break
        child.expect_exact(">>> ")  # the Ctrl+C came after the answer: harmless
    else:
        pytest.fail("every answer ended before the Ctrl+C")
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"last answer: interrupted after \d+ tokens")
    child.expect(r"session: \d+ answers \((\d) interrupted\)")
    assert child.match.group(1) == "1"
    child.expect_exact(">>> ")

    child.sendline("/bye")
    left_cleanly(child)
    shown = screen(child)
    assert any(code in shown for code in COLOR_CODES), "no token was coloured by its source"
    assert "Traceback" not in shown


@needs_pty
def test_ctrl_c_twice_or_ctrl_d_leaves(pair):
    child = spawn(pair)
    time.sleep(0.3)  # let readline settle at the prompt, as a person's first keystroke would
    child.sendcontrol("c")
    child.expect(r"Ctrl\+C again or Ctrl\+D to leave")
    child.expect_exact(">>> ")
    child.sendcontrol("c")
    left_cleanly(child)

    child = spawn(pair)
    child.sendeof()
    left_cleanly(child)


@needs_pty
@pytest.mark.parametrize("how", ["--no-color", "NO_COLOR"])
def test_colour_can_be_switched_off(pair, how):
    child = spawn(pair, "--gamma", "0.9", *(["--no-color"] if how == "--no-color" else []),
                  **({"NO_COLOR": "1"} if how == "NO_COLOR" else {}))
    child.sendline("What is the capital of Steatair?")
    child.expect(SUMMARY)
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    assert "\x1b[" not in screen(child)


# ---- scripting ----------------------------------------------------------------------------------
def test_piped_session(pair, tmp_path):
    saved = tmp_path / "chat.json"
    script = "\n".join([
        "What is the capital \\",
        "of Steatair?",
        "/set gamma 0.9",
        "/set gamma -1",
        "/set top_k 2.5",
        "/method telepathy",
        "/frobnicate",
        '"""And what colour',
        'is its flag?',
        '"""',
        "/stats",
        f"/save {saved}",
        "",
    ])
    r = subprocess.run(chat_cmd(pair), input=script, capture_output=True, text=True, timeout=120,
                       env=clean_env())
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stdout + r.stderr
    assert ">>>" not in r.stdout  # no prompts when nobody types
    assert len(re.findall(SUMMARY, r.stderr)) == 2
    for message in ("error: gamma must be a number in [0, 10], got -1",  # the core's check and wording
                    "error: top_k must be an integer, not '2.5'",
                    "error: unknown method 'telepathy'",
                    "error: unknown command /frobnicate; /help lists the commands"):
        assert message in r.stderr
    assert "session: 2 answers (0 interrupted)" in r.stdout

    doc = json.loads(saved.read_text())
    msgs = doc["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 2  # the demo pair: no system prompt
    assert msgs[0]["content"] == "What is the capital \nof Steatair?"
    assert msgs[2]["content"] == "And what colour\nis its flag?"
    assert doc["settings"]["gamma"] == 0.9
    for answer in msgs[1::2]:
        assert answer["interrupted"] is False and answer["stats"]["tokens"] == len(answer["tokens"])
        assert {t["source"] for t in answer["tokens"]} <= {"base", "blend", "guide"}
        assert "".join(t["text"] for t in answer["tokens"]) == answer["content"]
        assert answer["content"] in r.stdout
        if answer["stats"]["warning"]:  # the guide steered too much: say so
            assert f"warning: {answer['stats']['warning']}" in r.stderr


def test_bad_model_path_is_one_line(pair):
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "chat", "--base", "missing.gguf", "--guide", pair[1]],
                       input="", capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["loading base model missing.gguf ... error: model file not found: "
                                             "'missing.gguf'"]


# ---- the Chat class -----------------------------------------------------------------------------
@pytest.fixture
def chat(pair):
    base, guide = (bc.Model(p, n_ctx=1024, n_threads=1) for p in pair[:2])
    return Chat(bc.Blender(base, guide, gamma=0.9), dict(max_tokens=24))


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_second_turn_decodes_only_the_new_tokens(chat):
    blender = chat.blender
    q1, q2 = "What is the capital of Steatair?", "And what colour is its flag?"
    texts1 = chat.prompt_texts(q1)
    tokens1 = blender.prompts(*texts1)
    first = list(chat.ask(q1))
    texts2 = chat.prompt_texts(q2)
    tokens2 = blender.prompts(*texts2)
    second = list(chat.ask(q2))
    st1, st2 = chat.turns[0].stats, chat.turns[1].stats

    # the chat extends what each model read: turn 1's prompt, then the answer as it was written
    answer = chat.turns[0].answer
    guide_text1, guide_text2 = (blender.guide.render_chat(t[1]) for t in (texts1, texts2))
    assert texts2[0].startswith(texts1[0] + answer) and guide_text2.startswith(guide_text1 + answer)

    # each model reuses all of its cache that the new prompt extends: at least turn 1's prompt
    for role, p1, p2 in zip(("base", "guide"), tokens1, tokens2):
        n_cached = st1["reused_tokens"][role] + st1["decoded_tokens"][role]
        assert n_cached <= len(p1) + len(first) - 1  # the last token of an answer is never decoded
        cached = (p1 + [s.token for s in first])[:n_cached]
        assert st2["prompt_tokens"][role] == len(p2)
        assert st2["reused_tokens"][role] == common_prefix(cached, p2) >= len(p1)
    # the base decodes the prompt past what it reused, then one token per generated token but the last
    assert st2["decoded_tokens"]["base"] == len(tokens2[0]) - st2["reused_tokens"]["base"] + len(second) - 1
    if has_demo():
        # trained models write the tokens the tokenizer would: all of turn 1 is reused
        assert st2["reused_tokens"]["base"] == len(tokens1[0]) + len(first) - 1


def test_the_system_prompt_is_the_guides_alone(chat):
    chat.system = "Keep it short."
    base_text, guide_messages = chat.prompt_texts("What is 38 + 41?")
    assert base_text == "Question: What is 38 + 41?\nAnswer:"  # the base's transcript has no system paragraph
    assert guide_messages[0] == {"role": "system", "content": "Keep it short."}
    assert "Keep it short." in chat.blender.guide.render_chat(guide_messages)
    # the same rule for every caller, and for clients that render the base's prompt from its template
    chat_messages = guide_messages[:1] + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                          {"role": "user", "content": "X?"}]
    assert bc.base_transcript(chat_messages) == "Question: Hi\nAnswer: Hello\nQuestion: X?\nAnswer:"
    from blendin_cpp.chat_template import BASE_TRANSCRIPT_TEMPLATE, render
    assert render(BASE_TRANSCRIPT_TEMPLATE, chat_messages) == bc.base_transcript(chat_messages)


def test_interrupted_answer_stays_marked(chat):
    stream = chat.ask("Tell me a story.")
    partial = [next(stream) for _ in range(3)]
    stream.close()
    (turn,) = chat.turns
    assert turn.interrupted and turn.stats is None and turn.steps == partial
    assert chat.messages("next")[1] == {"role": "assistant", "content": "".join(s.text for s in partial)}


def test_old_turns_are_dropped_when_the_context_is_full(pair):
    base, guide = (bc.Model(p, n_ctx=128, n_threads=1) for p in pair[:2])
    chat = Chat(bc.Blender(base, guide), dict(max_tokens=40))
    question = "Tell me about the capital of Steatair and its flag, please."
    dropped = 0
    for _ in range(6):
        dropped += chat.make_room(question)
        assert chat.prompt_tokens(question) + 40 <= 128  # room for a whole answer
        list(chat.ask(question))
    assert dropped > 0 and chat.first == dropped and len(chat.turns) == 6
    assert len(chat.messages()) == 2 * (6 - dropped)


def test_the_demo_banner_says_what_the_models_know():
    """On the bundled pair the banner says what the demo world holds and suggests questions from
    the dev split, which the pair then answers as its training taught it."""
    expected = {json.loads(line)["question"]: json.loads(line)["answer"]
                for line in (demo.demo_dir() / "dev.jsonl").read_text().splitlines()}
    questions = demo.EXAMPLE_QUESTIONS
    assert all(q in expected for q in questions)
    for q in questions:  # each as the first question of a conversation, as the banner advises
        r = subprocess.run([sys.executable, "-m", "blendin_cpp", "chat", "--threads", "1"], input=q + "\n",
                           capture_output=True, text=True, timeout=120, env=clean_env())
        assert r.returncode == 0, r.stderr
        assert "made-up world of countries, with their capitals and flag colours" in r.stderr
        assert "Try: " + "  ".join(f'"{q}"' for q in questions) + " (/reset between questions)" in r.stderr
        assert "system prompt" not in r.stderr  # trained on questions alone: none by default
        assert r.stdout == " " + expected[q] + "\n"


def test_another_pair_gets_its_model_names(model_dir, shared_tokenizer):
    paths = [str(random_llama(model_dir / f"banner_{role}.gguf", n_embd=32, n_layer=1, n_head=2, seed=seed,
                              tokenizer=shared_tokenizer)) for role, seed in (("base", 61), ("guide", 62))]
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "chat", "--base", paths[0], "--guide", paths[1],
                        "--threads", "1"], input="", capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0, r.stderr
    names = [bc.Model(p, n_ctx=64).metadata["general.name"] for p in paths]
    assert f"\nbase: {names[0]}\nguide: {names[1]}\n" in r.stderr
    assert "made-up world" not in r.stderr
    from blendin_cpp.chat import CHAT_SYSTEM
    assert f"system prompt: {CHAT_SYSTEM!r} (/system changes it)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "chat", "--base", paths[0], "--guide", paths[1],
                        "--threads", "1", "--system", ""], input="", capture_output=True, text=True, timeout=60,
                       env=clean_env())
    assert r.returncode == 0 and "system prompt" not in r.stderr, r.stderr
