"""Bad input gets a clear Python exception, never an abort. Every case runs in a child process, so
an abort inside llama.cpp would show up as a dead child instead of killing the test run."""
import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(r'''
    import json, sys
    import blendin_cpp as bc
    cases = json.loads(sys.argv[1])
    out = {}
    for name, (path, kwargs, action) in cases.items():
        try:
            m = bc.Model(path, **kwargs)
            if action == "detokenize_oov":
                m.detokenize([m.n_vocab + 5])
            elif action == "logits_oov":
                m.logits([1, -3])
            elif action == "decode_past_ctx":
                m.decode([1] * m.n_ctx, range(m.n_ctx))
                m.decode([1], [m.n_ctx])
            elif action == "decode_gap":
                m.decode([1], [5])
            elif action == "logits_too_long":
                m.logits([1] * (m.n_ctx + 1))
            out[name] = ["no error", ""]
        except Exception as e:
            out[name] = [type(e).__name__, str(e)]
    print(json.dumps(out))
''')


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_model):
    import dataclasses

    import gguf
    from blendin_cpp.testing import make_tokenizer, random_llama

    d = tmp_path_factory.mktemp("bad")
    (d / "empty.gguf").write_bytes(b"")
    (d / "text.gguf").write_text("this is not a model\n" * 10)
    data = open(tiny_model, "rb").read()
    (d / "truncated_header.gguf").write_bytes(data[:200])
    (d / "truncated_data.gguf").write_bytes(data[: len(data) // 2])
    (d / "subdir.gguf").mkdir()
    # a GGUF without llama.feed_forward_length: written by the normal writer with that key skipped
    original = gguf.GGUFWriter.add_feed_forward_length
    gguf.GGUFWriter.add_feed_forward_length = lambda self, n: None
    try:
        random_llama(d / "missing_key.gguf", seed=3)
    finally:
        gguf.GGUFWriter.add_feed_forward_length = original
    # llama.cpp aborts (GGML_ASSERT) on a block count outside 1..512 and on a duplicated token
    original = gguf.GGUFWriter.add_block_count
    for n in (0, 1000):
        gguf.GGUFWriter.add_block_count = lambda self, _, n=n: original(self, n)
        try:
            random_llama(d / f"blocks_{n}.gguf", seed=3)
        finally:
            gguf.GGUFWriter.add_block_count = original
    tok = make_tokenizer(1024, seed=7)
    tokens = list(tok.tokens)
    tokens[600] = tokens[500]
    random_llama(d / "duplicate_token.gguf", seed=3, tokenizer=dataclasses.replace(tok, tokens=tokens))
    # llama.cpp reads token strings up to their first NUL byte and names empty tokens [EMPTY_i]: two
    # tokens that differ after a NUL, or one that spells another's empty name, are duplicates too
    tokens = list(tok.tokens)
    tokens[600], tokens[601] = "ab\x00c", "ab\x00d"
    random_llama(d / "duplicate_after_nul.gguf", seed=3, tokenizer=dataclasses.replace(tok, tokens=tokens))
    return d


@pytest.fixture(scope="module")
def outcomes(bad_files, tiny_model):
    d = str(bad_files)
    cases = {
        "missing": [d + "/nope.gguf", {}, None],
        "directory": [d + "/subdir.gguf", {}, None],
        "empty": [d + "/empty.gguf", {}, None],
        "not_gguf": [d + "/text.gguf", {}, None],
        "truncated_header": [d + "/truncated_header.gguf", {}, None],
        "truncated_data": [d + "/truncated_data.gguf", {}, None],
        "missing_key": [d + "/missing_key.gguf", {}, None],
        "blocks_0": [d + "/blocks_0.gguf", {}, None],
        "blocks_1000": [d + "/blocks_1000.gguf", {}, None],
        "duplicate_token": [d + "/duplicate_token.gguf", {}, None],
        "duplicate_after_nul": [d + "/duplicate_after_nul.gguf", {}, None],
        "n_ctx_2_31": [tiny_model, {"n_ctx": 2 ** 31}, None],
        "n_batch_2_63": [tiny_model, {"n_batch": 2 ** 63}, None],
        "n_ctx_zero": [tiny_model, {"n_ctx": 0}, None],
        "n_ctx_negative": [tiny_model, {"n_ctx": -5}, None],
        "n_ctx_text": [tiny_model, {"n_ctx": "big"}, None],
        "threads_negative": [tiny_model, {"n_threads": -1}, None],
        "kv_type_bad": [tiny_model, {"kv_type": "f8"}, None],
        "detokenize_oov": [tiny_model, {"n_ctx": 32}, "detokenize_oov"],
        "logits_oov": [tiny_model, {"n_ctx": 32}, "logits_oov"],
        "decode_past_ctx": [tiny_model, {"n_ctx": 32}, "decode_past_ctx"],
        "decode_gap": [tiny_model, {"n_ctx": 32}, "decode_gap"],
        "logits_too_long": [tiny_model, {"n_ctx": 32}, "logits_too_long"],
    }
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"the child process died (rc={r.returncode}): {r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case, exc, words", [
    ("missing", "FileNotFoundError", ["not found", "nope.gguf"]),
    ("directory", "ValueError", ["is a directory"]),
    ("empty", "ValueError", ["is empty"]),
    ("not_gguf", "ValueError", ["not a GGUF file"]),
    ("truncated_header", "ValueError", ["truncated"]),
    ("truncated_data", "ValueError", ["truncated", "ends past the end of the file"]),
    ("missing_key", "ValueError", ["missing the required GGUF key", "llama.feed_forward_length"]),
    ("blocks_0", "ValueError", ["llama.block_count = 0", "1..512"]),
    ("blocks_1000", "ValueError", ["llama.block_count = 1000", "1..512"]),
    ("duplicate_token", "ValueError", ["tokenizer.ggml.tokens", "tokens 500 and 600 are both"]),
    ("duplicate_after_nul", "ValueError", ["tokenizer.ggml.tokens", "tokens 600 and 601 are both 'ab'"]),
    ("n_ctx_2_31", "ValueError", ["n_ctx must be an integer >= 1 and below 2^31, got 2147483648"]),
    ("n_batch_2_63", "ValueError", ["n_batch must be an integer >= 1 and below 2^31"]),
    ("n_ctx_zero", "ValueError", ["n_ctx must be an integer >= 1"]),
    ("n_ctx_negative", "ValueError", ["n_ctx must be an integer >= 1", "-5"]),
    ("n_ctx_text", "TypeError", ["n_ctx must be an integer"]),
    ("threads_negative", "ValueError", ["n_threads"]),
    ("kv_type_bad", "ValueError", ["kv_type", "f8"]),
    ("detokenize_oov", "ValueError", ["outside the vocabulary", "1029"]),
    ("logits_oov", "ValueError", ["token -3 is outside the vocabulary"]),
    ("decode_past_ctx", "ValueError", ["position 32", "holds 32 tokens"]),
    ("decode_gap", "ValueError", ["position 5", "sequence 0 holds 0 tokens"]),
    ("logits_too_long", "ValueError", ["33 tokens do not fit the context of 32"]),
])
def test_bad_input_is_a_clear_exception(outcomes, case, exc, words):
    got_type, message = outcomes[case]
    assert got_type == exc, f"{case}: {got_type}: {message}"
    for w in words:
        assert w in message, f"{case}: {message!r} does not mention {w!r}"



# ---- chat templates are input too ------------------------------------------------------------------
TEMPLATE_CHILD = textwrap.dedent(r'''
    import json, sys, time
    import blendin_cpp as bc
    base, guides = sys.argv[1], json.loads(sys.argv[2])
    out = {}
    for name, path in guides.items():
        b = bc.Blender(bc.Model(base, n_ctx=128, n_threads=1), bc.Model(path, n_ctx=128, n_threads=1))
        t0 = time.perf_counter()
        try:
            b.complete("Hello", max_tokens=2)
            out[name] = ["no error", ""]
        except Exception as e:
            out[name] = [type(e).__name__, str(e)]
        print(name, f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    print(json.dumps(out))
''')

HOSTILE_TEMPLATES = {
    # two nested loops of the sandbox's longest range: 10^10 steps
    "loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}",
    # the same over a list made once: no call inside the loops
    "loop_no_calls": "{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "huge_string": "{{ 'x' * 10**9 }}",
    "huge_power": "{{ 10 ** (10 ** 9) }}",
    "long_output": "{% for i in range(100000) %}{{ 'y' * 10000 }}{% endfor %}",
}


def test_hostile_chat_templates_are_a_clear_error(model_dir, shared_tokenizer, tiny_model):
    """A guide's chat template is part of its file, so it is input: one that loops for ever or
    builds a huge string is stopped (in CPU time and output size) with a ValueError that names the
    model whose template it is; the child process must finish well inside its timeout."""
    from blendin_cpp.testing import CHAT_TEMPLATE, random_llama
    guides = {name: str(random_llama(model_dir / f"template_{name}.gguf", n_embd=32, n_layer=1, n_head=2, seed=3,
                                     tokenizer=shared_tokenizer, chat_template=t))
              for name, t in {**HOSTILE_TEMPLATES, "plain": CHAT_TEMPLATE}.items()}
    r = subprocess.run([sys.executable, "-c", TEMPLATE_CHILD, tiny_model, json.dumps(guides)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"the child process died (rc={r.returncode}): {r.stderr[-2000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.pop("plain") == ["no error", ""]
    for name, (kind, message) in out.items():
        assert kind == "ValueError", f"{name}: {kind}: {message}"
        assert f"the chat template of {guides[name]}" in message, message
        assert ("s of CPU time" in message) if name.startswith("loop") else ("characters" in message), message


LEAK_CHILD = textwrap.dedent(r'''
    import json, sys
    import blendin_cpp as bc
    path, bad_adapter, no_context = sys.argv[1:4]
    out = []
    for kwargs in ({"adapters": [("/nonexistent/adapter.gguf", 1.0)]}, {"adapters": [(bad_adapter, 1.0)]}):
        try:
            bc.Model(path, n_ctx=32, **kwargs)
            out.append("loaded")
        except Exception as e:
            out.append(type(e).__name__)
    try:
        bc.Model(no_context)
        out.append("loaded")
    except Exception as e:
        out.append(type(e).__name__)
    maps = open("/proc/self/maps").read()
    print(json.dumps({"errors": out, "mapped": [p for p in (path, no_context) if p in maps]}))
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_failed_load_frees_the_model(tiny_model, tmp_path):
    """Whatever fails after llama.cpp loaded the weights (an adapter, the context) frees the context
    and the model on the one cleanup path: the file is no longer mapped."""
    import gguf
    from blendin_cpp.testing import random_llama
    original = gguf.GGUFWriter.add_context_length
    gguf.GGUFWriter.add_context_length = lambda self, n: original(self, 0)  # n_ctx 0: no context
    try:
        no_context = str(random_llama(tmp_path / "context_0.gguf", seed=3))
    finally:
        gguf.GGUFWriter.add_context_length = original
    r = subprocess.run([sys.executable, "-c", LEAK_CHILD, tiny_model, tiny_model, no_context], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["errors"] == ["FileNotFoundError", "ValueError", "ValueError"] and out["mapped"] == [], out
