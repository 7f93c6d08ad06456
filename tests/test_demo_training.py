"""models/train_demo.py runs end to end (--tiny) and writes loadable, consistent demo models."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blendin_cpp import llama_cpp_peer

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "models" / "train_demo.py"
SAME_VOCAB = ["base", "guide", "guide-unreliable", "anti"]
ROLES = SAME_VOCAB + ["guide-xvocab"]
SEED = 7

pytest.importorskip("torch")
pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")


def _fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(str(path))
    return {name: f.contents() for name, f in reader.fields.items()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--seed", str(SEED), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_outputs_exist(demo_dir):
    for role in ROLES:
        assert (demo_dir / f"{role}.gguf").stat().st_size > 0
    assert (demo_dir / "heldout.jsonl").exists()


def test_metadata(demo_dir):
    for role in ROLES:
        f = _fields(demo_dir / f"{role}.gguf")
        assert f["blendin.script"] == "models/train_demo.py"
        assert f["blendin.script_version"]
        assert f["blendin.seed"] == SEED
        assert f["blendin.role"] == role
        assert "final_loss=" in f["blendin.training"]
        assert f["general.architecture"] == "llama"
        if role.startswith("guide"):
            jinja2 = pytest.importorskip("jinja2")
            rendered = jinja2.Template(f["tokenizer.chat_template"]).render(
                messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True, bos_token="<s>")
            assert rendered == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"
        else:
            assert "tokenizer.chat_template" not in f


def test_shared_tokenizer(demo_dir):
    keys = ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.pre", "tokenizer.ggml.model"]
    ref = _fields(demo_dir / "base.gguf")
    for role in SAME_VOCAB[1:]:
        f = _fields(demo_dir / f"{role}.gguf")
        for k in keys:
            assert f[k] == ref[k], (role, k)
    x = _fields(demo_dir / "guide-xvocab.gguf")
    assert len(x["tokenizer.ggml.tokens"]) != len(ref["tokenizer.ggml.tokens"])
    for f in (ref, x):
        toks = f["tokenizer.ggml.tokens"]
        assert toks[f["tokenizer.ggml.bos_token_id"]] == "<s>"
        assert toks[f["tokenizer.ggml.eos_token_id"]] == "</s>"
        assert toks[f["tokenizer.ggml.eot_token_id"]] == "<|end|>"


def test_heldout(demo_dir):
    rows = [json.loads(line) for line in (demo_dir / "heldout.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (demo_dir / "dev.jsonl").read_text().splitlines()]
    assert rows and dev
    assert {r["kind"] for r in rows} == {"capital", "colour", "sum"}
    for r in rows:
        assert r["question"] and r["answer"] and r["value"] in r["answer"]
    assert not {r["question"] for r in rows} & {r["question"] for r in dev}


def test_loads_in_llama_cpp(demo_dir):
    llama_cpp = pytest.importorskip("llama_cpp")
    for role in ROLES:
        llm = llama_cpp_peer.load(str(demo_dir / f"{role}.gguf"), n_ctx=128, verbose=False)
        ids = llm.tokenize(b"<s><|user|>\nWhat is 12 + 34?<|end|>\n<|assistant|>\n", add_bos=False, special=True)
        assert ids[0] == llm.token_bos()
        llm.eval(ids)
        assert llm.n_tokens == len(ids)
        del llm
