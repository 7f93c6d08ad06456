"""One owner of model state: the Model records what each sequence of its KV cache holds, and every
user (Blenders sharing a Model, best-of-N, scoring) derives its prefix reuse from that record.
Threads that use one Model or one Blender at the same time get a clear error."""
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import blendin_cpp as bc
from blendin_cpp import best_of_n as bon
from blendin_cpp import demo
from blendin_cpp.blender import PromptTokens

QUESTION = [{"role": "user", "content": "What is the capital of Korvath?"}]
SUM = [{"role": "user", "content": "What is 20 + 46?"}]


@pytest.fixture(scope="module")
def demo_models():
    kw = dict(n_ctx=512, n_threads=1)
    return {role: bc.Model(demo.demo_path(role), **kw) for role in ("base", "guide", "guide-unreliable")}


def fresh(role_guide, messages, **kw):
    """The answer from models that never read anything else."""
    m = dict(n_ctx=512, n_threads=1)
    return bc.Blender(bc.Model(demo.demo_path("base"), **m), bc.Model(demo.demo_path(role_guide), **m)).complete(
        messages, max_tokens=24, **kw)


def test_two_blenders_sharing_a_base_do_not_reuse_each_others_cache(demo_models):
    a = bc.Blender(demo_models["base"], demo_models["guide"])
    b = bc.Blender(demo_models["base"], demo_models["guide-unreliable"])
    first = a.complete(QUESTION, max_tokens=24)
    b.complete(SUM, max_tokens=24)  # the shared base now holds another prompt
    again = a.complete(QUESTION, max_tokens=24)
    assert again.text == first.text == fresh("guide", QUESTION).text
    # what the base reused is what it really held: the common prefix with the sum question
    held = demo_models["base"].tokens(0)
    assert again.stats["reused_tokens"]["base"] < len(a.prompts(QUESTION).base)
    assert held[: len(a.prompts(QUESTION).base)] == a.prompts(QUESTION).base


def test_interleaved_generations_on_a_shared_model_each_stay_correct(demo_models):
    a = bc.Blender(demo_models["base"], demo_models["guide"])
    b = bc.Blender(demo_models["base"], demo_models["guide-unreliable"])
    ga, gb = a.generate(QUESTION, max_tokens=24), b.generate(SUM, max_tokens=24)
    ta, tb, done = [], [], set()
    while len(done) < 2:  # one token of each in turn: each step re-reads what the other replaced
        for name, gen, out in (("a", ga, ta), ("b", gb, tb)):
            if name not in done:
                step = next(gen, None)
                if step is None:
                    done.add(name)
                else:
                    out.append(step.text)
    assert "".join(ta) == fresh("guide", QUESTION).text
    assert "".join(tb) == fresh("guide-unreliable", SUM).text


def test_best_of_n_then_a_single_generation_on_the_same_models(demo_models):
    m = dict(n_ctx=1024, n_threads=1, n_seq_max=4)
    blender = bc.Blender(bc.Model(demo.demo_path("base"), **m), bc.Model(demo.demo_path("guide"), **m))
    before = blender.complete(QUESTION, max_tokens=24).text
    bon.generate_candidates(blender, SUM, 4, seed=3, max_tokens=24, temperature=1.0)
    assert blender.complete(QUESTION, max_tokens=24).text == before
    # the candidates' sequences were given back: only sequence 0 holds tokens
    assert all(not blender.base.tokens(s) for s in range(1, 4))


def test_a_change_of_adapter_scales_empties_the_cache():
    from blendin_cpp.alignment_vectors import runtime_adapters
    repo = Path(__file__).resolve().parent.parent
    base_path, av = repo / "models" / "demo" / "base.gguf", repo / "models" / "av" / "capitals-expert.gguf"
    base = bc.Model(base_path, n_ctx=512, n_threads=1, adapters=runtime_adapters([f"{av}:0.0"], base_path))
    b = bc.Blender(base, None, method="base")
    q = [{"role": "user", "content": "What is the capital of Korvath?"}]
    plain = b.complete(q, max_tokens=24).text
    assert base.tokens(0)
    base.set_adapter_scales([1.0])
    assert base.tokens(0) == []  # the keys and values were computed with the old weights
    turned = b.complete(q, max_tokens=24)
    assert turned.stats["reused_tokens"]["base"] == 0 and turned.text != plain
    base.set_adapter_scales([0.0])
    assert b.complete(q, max_tokens=24).text == plain


def test_a_second_thread_on_a_busy_model_gets_a_clear_error(model_dir, shared_tokenizer):
    from blendin_cpp.testing import random_llama
    path = random_llama(model_dir / "busy.gguf", n_embd=256, n_layer=4, seed=21, tokenizer=shared_tokenizer)
    m = bc.Model(path, n_ctx=2048, n_batch=2048)
    a, b = bc.Blender(m, None, method="base"), bc.Blender(m, None, method="base")
    long_prompt = a.prompts("word " * 350)
    started, errors = threading.Event(), []

    def prefill():
        started.set()
        while True:  # the main thread may hold the model for a moment: then try again
            try:
                return a._engine.start(long_prompt.base, [], a.gen_params(max_tokens=1))
            except bc.BlendError:
                pass

    worker = threading.Thread(target=prefill)
    worker.start()
    started.wait()
    # while the prefill runs, the same Model (through another Blender) and the same Blender
    # refuse to start: nothing interleaves with the decode
    tried = 0
    while worker.is_alive():
        for blender in (b, a):
            try:
                blender.complete("hello", max_tokens=2)
            except bc.BlendError as e:
                errors.append(str(e))
            tried += 1
    worker.join()
    assert errors, f"no call overlapped the prefill ({tried} tries)"
    assert all("in use by another thread" in e for e in errors)
    # afterwards the model works as usual
    assert b.complete("hello", max_tokens=2).stats["tokens"] == 2


class HookedEngine:
    """A Blender's engine with `hook()` run right after each start returns (or instead of
    returning, when the hook raises): the moment another thread's paused generator could step."""

    def __init__(self, engine, hook):
        self._engine, self._hook = engine, hook

    def start(self, *args):
        self._engine.start(*args)
        self._hook()

    def __getattr__(self, name):
        return getattr(self._engine, name)


def pull(gen):
    """next(gen), or what stopped it."""
    try:
        return next(gen)
    except bc.BlendError as e:
        return f"BlendError: {e}"
    except RuntimeError as e:
        return f"RuntimeError: {e}"
    except StopIteration:
        return "StopIteration"


def test_a_paused_generator_never_takes_a_newer_generations_tokens(demo_models):
    """Thread A pauses a generation; the main thread starts another on the same Blender. A's next
    step, taken from its own thread the moment the new start returns, must not take the new
    generation's first token: A's generation is over (superseded, or refused while the Blender
    is busy), and the new one is whole."""
    b = bc.Blender(demo_models["base"], demo_models["guide"])
    ga = b.generate(QUESTION, max_tokens=24)
    assert not isinstance(pull(ga), str)
    seen = []

    def from_another_thread():
        t = threading.Thread(target=lambda: seen.append(pull(ga)))
        t.start()
        t.join(timeout=120)

    b._engine = HookedEngine(b._engine, from_another_thread)
    text = "".join(s.text for s in b.generate(SUM, max_tokens=24))
    assert len(seen) == 1 and isinstance(seen[0], str), f"the paused generator stepped: {seen[0]!r}"
    assert "in use by another thread" in seen[0] or "superseded" in seen[0]
    assert text == fresh("guide", SUM).text
    assert pull(ga) in ("StopIteration", "RuntimeError: this generation was superseded by a newer one on the "
                                          "same Blender")


def test_a_start_that_fails_stops_the_older_generator(demo_models):
    """A start that fails after the engine replaced its state (here: right after it) leaves no
    older generator running on the new state."""
    b = bc.Blender(demo_models["base"], demo_models["guide"])
    ga = b.generate(QUESTION, max_tokens=24)
    assert not isinstance(pull(ga), str)

    def fail():
        raise bc.BlendError("the start failed after replacing the state")
    engine = b._engine
    b._engine = HookedEngine(engine, fail)
    with pytest.raises(bc.BlendError, match="the start failed"):
        b.generate(SUM, max_tokens=24)
    assert pull(ga) == "RuntimeError: this generation was superseded by a newer one on the same Blender"
    b._engine = engine
    assert b.complete(SUM, max_tokens=24).text == fresh("guide", SUM).text


# ---- logits rows are llama's own outputs, whatever happens to other sequences ----------------------
def test_logits_rows_survive_truncating_another_sequence():
    """Row i is the i-th row of the last decode, read by its own position in that batch: dropping
    another sequence's tokens (truncate, copy_seq) leaves it as it was."""
    m = bc.Model(demo.demo_path("base"), n_ctx=256, n_seq_max=3, n_threads=1)
    a, b = m.tokenize("What is the capital of Gafashe?"), m.tokenize("Hello there, how are you today?")
    m.decode(a + b, list(range(len(a))) + list(range(len(b))), seq=[0] * len(a) + [1] * len(b), logits=True)
    rows = [m.logits_row(i).copy() for i in range(len(a) + len(b))]
    m.truncate(0, seq=1)
    for i in range(len(a) + len(b)):
        assert np.array_equal(m.logits_row(i), rows[i]), f"row {i} changed after truncating sequence 1"
    m._handle.copy_seq(0, 2, 3)
    assert all(np.array_equal(m.logits_row(i), rows[i]) for i in range(len(a)))


def test_a_generation_after_best_of_n_reuses_the_right_row():
    """Best-of-N's last batch has a row per candidate; freeing candidate 1's sequence must not make
    sequence 0's row read candidate 1's logits when the next generation reuses it."""
    m = dict(n_ctx=512, n_threads=1, n_seq_max=2)
    blender = bc.Blender(bc.Model(demo.demo_path("base"), **m), None, method="base")
    cands = bon.generate_candidates(blender, "The weather today is", 2, seed=3, max_tokens=12, temperature=1.5,
                                    ignore_eos=True, method="base")
    assert cands[0].tokens[-1] != cands[1].tokens[-1]  # the last batch's two rows differ
    held = blender.base.tokens(0)
    prompt = PromptTokens(held, [])
    fresh_blender = bc.Blender(bc.Model(demo.demo_path("base"), n_ctx=512, n_threads=1), None, method="base")
    expected = fresh_blender.complete(prompt, max_tokens=12)
    got = blender.complete(prompt, max_tokens=12)
    assert got.stats["reused_tokens"]["base"] == len(held)  # the row after the last token was reused
    assert got.tokens == expected.tokens
    assert got.steps[0].logprob == pytest.approx(expected.steps[0].logprob, abs=1e-4)


# ---- threads: reads take the lease, whole operations hold it ---------------------------------------
THREADS_CHILD = textwrap.dedent(r'''
    import json, sys, threading
    import blendin_cpp as bc
    from blendin_cpp import best_of_n as bon, demo, _core
    scenario = sys.argv[1]
    kw = dict(n_ctx=1024, n_threads=1, n_seq_max=4)
    base, guide = bc.Model(demo.demo_path("base"), **kw), bc.Model(demo.demo_path("guide"), **kw)
    Q, S = "What is the capital of Korvath?", "What is 20 + 46?"
    out = {"busy": 0, "other": [], "bad": [], "reads": 0}

    def busy(e):
        if isinstance(e, bc.BlendError) and "in use by another thread" in str(e):
            out["busy"] += 1
        else:
            out["other"].append(f"{type(e).__name__}: {e}")

    if scenario == "readers":
        # one thread generates; this one reads the state of the Model and of the Blender's engine
        b = bc.Blender(base, guide)
        ref = b.complete(Q, max_tokens=32)
        whole = b.prompts(Q).base + ref.tokens
        texts, done = [], threading.Event()
        def writer():
            try:
                for _ in range(12):
                    texts.append(b.complete(Q, max_tokens=32).text)
            except Exception as e:
                out["other"].append(f"writer: {type(e).__name__}: {e}")
            done.set()
        t = threading.Thread(target=writer)
        t.start()
        reads = [lambda: base.tokens(0), lambda: b._engine.tokens(0), lambda: b._engine.stats().as_dict(),
                 lambda: base.logits_row(0), lambda: base.adapter_scales()]
        while not done.is_set() and out["reads"] < 10 ** 6:
            for i, read in enumerate(reads):
                out["reads"] += 1
                try:
                    v = read()
                except Exception as e:
                    if isinstance(e, ValueError) and "logits row" in str(e):
                        continue
                    busy(e)
                    continue
                if i < 2 and list(v) != whole[: len(v)]:
                    out["bad"].append(["tokens", i, list(v)])
                if i == 2 and not (0 <= v["tokens"] <= 32 and v["finish_reason"] in ("", "length", "stop")):
                    out["bad"].append(["stats", v])
                if i == 3 and not (v.shape == (base.n_vocab,) and bool((v == v).all())):
                    out["bad"].append(["row", v.shape])
        t.join()
        out["writer_ok"] = texts == [ref.text] * 12
    else:
        # One thread runs best-of-N (or scoring) on the models. Once it decodes, this one reads the
        # base's record and now and then starts a generation on the models, until it is done.
        b = bc.Blender(base, guide)
        other = bc.Blender(base, guide)
        s_prompt = other.prompts(S)  # tokenized once: each try is quick
        alone = other.complete(s_prompt, max_tokens=16).text
        if scenario == "candidates":
            job = lambda: [c.tokens for c in bon.generate_candidates(b, Q, 4, seed=3, max_tokens=48, temperature=1.0)]
        else:
            p = b.prompts(Q).base
            conts = [base.tokenize(t, add_special=False)
                     for t in ("Sure! Its capital is Kavous.", "Paris", "I do not know it, sorry.")] * 30
            job = lambda: list(_core.score_continuations(base._handle, p, conts, False))

        def fresh_job():  # from empty caches, so that every run decodes the same batches
            base.truncate(0)
            guide.truncate(0)
            return job()

        calls = base._handle.decode_calls
        ref = fresh_job()
        total = base._handle.decode_calls - calls  # the base decodes of one run
        result, done = [], threading.Event()
        def worker():
            try:
                result.append(fresh_job())
            except Exception as e:
                out["other"].append(f"worker: {type(e).__name__}: {e}")
            done.set()
        calls = base._handle.decode_calls
        t = threading.Thread(target=worker)
        t.start()
        while base._handle.decode_calls == calls and not done.is_set():  # until the worker decodes
            pass
        out["gaps"] = out["tries"] = 0
        while not done.is_set() and out["reads"] < 10 ** 6:
            out["reads"] += 1
            try:
                base.tokens(0)
                # read while the worker had decodes left: the base was free in the middle of its run
                if base._handle.decode_calls < calls + total:
                    out["gaps"] += 1
            except Exception as e:
                busy(e)
            if out["reads"] % 16:
                continue
            out["tries"] += 1
            try:
                got = other.complete(s_prompt, max_tokens=16).text
                if got != alone:
                    out["bad"].append(got)
            except Exception as e:
                busy(e)
        t.join()
        out["worker_ok"] = result == [ref]
    print(json.dumps(out))
''')


def run_threads(scenario):
    r = subprocess.run([sys.executable, "-c", THREADS_CHILD, scenario], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the child process died (rc={r.returncode}): {r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_reads_of_model_and_engine_state_while_another_thread_generates():
    """The rule: a read of a Model's or a Blender's state (tokens, stats, logits rows, adapter
    scales) is a call like any other. While another thread is inside a call on it the read raises
    the clear "in use by another thread" error; otherwise it returns a copy of a consistent state.
    A read never makes the generating thread fail."""
    out = run_threads("readers")
    assert out["writer_ok"] and not out["other"] and not out["bad"], out
    assert out["busy"] > 0, f"no read overlapped a step ({out['reads']} reads)"


@pytest.mark.parametrize("scenario", ["candidates", "scores"])
def test_best_of_n_and_scoring_hold_the_models_for_the_whole_operation(scenario):
    """Another thread's start() on the same models cannot truncate the candidates' (or scored)
    sequences between steps: it gets the busy error, or runs before or after; the results are the
    single-threaded ones. A read of the base never finds it free in the middle of the operation."""
    out = run_threads(scenario)
    assert out["worker_ok"] and not out["other"] and not out["bad"], out
    assert out["busy"] > 0 and out["gaps"] == 0, out
