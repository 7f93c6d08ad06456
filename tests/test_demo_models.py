"""The bundled demo models: they load through blendin_cpp, say how they were made, and pair up."""
import json

import pytest

import blendin_cpp as bc
from blendin_cpp import demo


@pytest.mark.parametrize("role", demo.ROLES)
def test_bundled_model_loads_and_records_its_making(role):
    m = bc.Model(demo.demo_path(role), n_ctx=256, n_threads=1)
    meta = m.metadata
    assert meta["blendin.script"] == "models/train_demo.py"
    assert meta["blendin.script_version"] == "1"
    assert meta["blendin.role"] == role
    assert int(meta["blendin.seed"]) == 1234
    assert "steps" in meta["blendin.training"]
    if role.startswith("guide"):  # the base and the anti are plain pretrained models
        assert m.chat_template and "<|assistant|>" in m.chat_template
    assert m.file_size < 10 * 2 ** 20


def test_bundle_is_small():
    total = sum(p.stat().st_size for p in demo.demo_dir().glob("*.gguf"))
    assert total < 25 * 2 ** 20


def test_same_vocabulary_pairs_and_the_cross_vocabulary_guide():
    base = bc.Model(demo.demo_path("base"), n_ctx=256, n_threads=1)
    for role in ("guide", "guide-unreliable", "anti"):
        assert not bc.Blender(base, bc.Model(demo.demo_path(role), n_ctx=256, n_threads=1))._engine.bridged
    assert bc.Blender(base, bc.Model(demo.demo_path("guide-xvocab"), n_ctx=256, n_threads=1))._engine.bridged


def test_the_demo_pair_shows_the_papers_phenomenon_on_one_question():
    """Base alone: right value, wrong form; the guide consulted where the base is unsure."""
    q = json.loads(open(demo.heldout_path(), encoding="utf-8").readline())
    base = bc.Model(demo.demo_path("base"), n_ctx=512, n_threads=1)
    guide = bc.Model(demo.demo_path("guide"), n_ctx=512, n_threads=1)
    b = bc.Blender(base, guide)
    msg = [{"role": "user", "content": q["question"]}]
    alone = b.complete(msg, method="base", max_tokens=40).text
    assert alone.strip() != q["answer"]
    blended = b.complete(msg, method="blendin", max_tokens=40)
    assert blended.stats["interventions"] > 0


def test_ignore_eos_runs_to_max_tokens():
    b = bc.Blender(bc.Model(demo.demo_path("base"), n_ctx=512, n_threads=1),
                   bc.Model(demo.demo_path("guide"), n_ctx=512, n_threads=1))
    msg = [{"role": "user", "content": "What is the capital of Gafashe?"}]
    ends = b.complete(msg, max_tokens=40)
    assert ends.finish_reason == "stop" and b.base.is_eog(ends.tokens[-1]) and len(ends.tokens) < 40
    r = b.complete(msg, max_tokens=40, ignore_eos=True)
    assert r.finish_reason == "length" and len(r.tokens) == 40
    assert not any(b.base.is_eog(t) for t in r.tokens)
    assert r.tokens[: len(ends.tokens) - 1] == ends.tokens[:-1]  # the same until the end token was due
