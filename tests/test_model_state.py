"""One owner of model state: the Model records what each sequence of its KV cache holds, and every
user (Blenders sharing a Model, best-of-N, scoring) derives its prefix reuse from that record.
Threads that use one Model or one Blender at the same time get a clear error."""
import threading
from pathlib import Path

import pytest

import blendin_cpp as bc
from blendin_cpp import best_of_n as bon
from blendin_cpp import demo

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
