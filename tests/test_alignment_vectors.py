"""Alignment Vectors on generated f32 models: merges against weights written independently from
numpy, LoRA AVs against the merge, run-time scales, and bad input.

Tolerances (logits spread ~3 here). The merge is checked against numpy doing the same f32
arithmetic, written by another writer: the weights agree bit for bit and so must the logits
(EXACT_ATOL). Files whose weights differ by one f32 ulp (scale 1 against the aligned file itself,
or a float64 merge) give logits within ~2e-6 at most positions, but the random model amplifies
that to ~2.5e-3 at a few (measured): ULP_ATOL. A LoRA adapter adds B (A x) beside W x instead of
(W + B A) x, a different summation order: LORA_ATOL.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import blendin_cpp as bc
from blendin_cpp import alignment_vectors as av
from blendin_cpp.cli import main
from blendin_cpp.gguf_export import write_llama
from blendin_cpp.testing import perturbed_llama, random_llama, read_llama

EXACT_ATOL = 1e-5   # the same weights, bit for bit
ULP_ATOL = 5e-3     # weights that differ by one f32 ulp
LORA_ATOL = 5e-3    # adapter path vs merged weights
TEXT = "The capital of the country is a city by the sea. 12 + 30 = 42"


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_tokenizer):
    d = tmp_path_factory.mktemp("av")
    base = random_llama(d / "base.gguf", n_embd=64, n_layer=2, n_head=4, seed=11, tokenizer=shared_tokenizer)
    f = {"dir": d, "base": base,
         # a fine-tune stand-in that leaves the norms alone (LoRA can then represent all of it)
         "aligned": perturbed_llama(d / "aligned.gguf", base, scale=0.2, norms=False, seed=1),
         "aligned2": perturbed_llama(d / "aligned2.gguf", base, scale=0.2, norms=True, seed=2),
         "other_base": random_llama(d / "other.gguf", n_embd=64, n_layer=2, n_head=4, seed=12,
                                    tokenizer=shared_tokenizer)}
    for name, al in (("delta", "aligned"), ("delta2", "aligned2")):
        f[name] = d / f"{name}.gguf"
        av.extract(base, f[al], f[name])
    f["lora_full"] = d / "lora_full.gguf"
    av.extract(base, f["aligned"], f["lora_full"], rank=64)
    return f


def model(path, **kw):
    return bc.Model(path, n_ctx=128, n_threads=1, kv_type="f32", **kw)


def logits(path, **kw):
    m = model(path, **kw)
    return m.logits(m.tokenize(TEXT))


def assert_close(actual, desired, atol):
    diff = np.abs(actual - desired).max()
    assert diff <= atol, f"max |logit difference| {diff:.2e} > {atol}"


def numpy_merge(f, out, scales: dict[str, float]):
    """The independent path: W_base + sum scale * (W_aligned - W_base) in numpy (f32, as a merge
    in the model's own precision is done) from the two models' tensors, written with write_llama."""
    shape, base, tok = read_llama(f["base"])
    theta = dict(base)
    for name, scale in scales.items():
        aligned = read_llama(f[name])[1]
        theta = {k: v + np.float32(scale) * (aligned[k] - base[k]) for k, v in theta.items()}
    return write_llama(out, shape, theta, tok)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, -0.3, 1.5])
def test_merge_equals_numpy_weights(files, scale):
    merged = av.apply(files["base"], [(files["delta"], scale)], files["dir"] / f"merged_{scale}.gguf")
    ref = numpy_merge(files, files["dir"] / f"ref_{scale}.gguf", {"aligned": scale})
    assert_close(logits(merged), logits(ref), EXACT_ATOL)
    if scale == 0.0:
        assert_close(logits(merged), logits(files["base"]), EXACT_ATOL)
    if scale == 1.0:
        assert_close(logits(merged), logits(files["aligned"]), ULP_ATOL)


def test_two_avs_merge_equals_numpy_weights(files):
    merged = av.apply(files["base"], [(files["delta"], 0.5), (files["delta2"], -0.3)], files["dir"] / "m2.gguf")
    ref = numpy_merge(files, files["dir"] / "ref2.gguf", {"aligned": 0.5, "aligned2": -0.3})
    assert_close(logits(merged), logits(ref), EXACT_ATOL)


def test_merged_file_keeps_base_metadata_and_types(files):
    out = av.apply(files["base"], [(files["delta"], 0.5)], files["dir"] / "m_q8.gguf", dtype="q8_0")
    base, merged = av.GGUF(files["base"]), av.GGUF(out)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "general.name",
                "llama.embedding_length", "blendin.seed"):
        assert merged.get(key) == base.get(key), key
    assert merged.get("blendin.av.applied") == "delta.gguf:0.5"
    assert merged.tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert merged.tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    f32 = av.apply(files["base"], [(files["delta"], 0.5)], files["dir"] / "m_f32.gguf")
    # q8_0 rounding, amplified like the ulps above (base and merge differ by ~6 here)
    assert_close(logits(out), logits(f32), 0.5)


def test_full_rank_lora_equals_merge(files):
    merged = av.apply(files["base"], [(files["delta"], 1.0)], files["dir"] / "m1.gguf")
    assert_close(logits(files["base"], adapters=[(files["lora_full"], 1.0)]), logits(merged), LORA_ATOL)
    # apply() multiplies a LoRA AV out: the same merge
    via_lora = av.apply(files["base"], [(files["lora_full"], 1.0)], files["dir"] / "m1_lora.gguf")
    assert_close(logits(via_lora), logits(merged), ULP_ATOL)


@pytest.mark.parametrize("structure", ["full-rank delta", "rank-4 delta"])
def test_lora_rank_error_table(files, structure, capsys):
    """The price of a rank-R AV: tensor and logit error against the exact merge (printed)."""
    d = files["dir"]
    aligned = perturbed_llama(d / f"al_{structure[:4]}.gguf", files["base"], scale=0.2, norms=False, seed=5,
                              rank=None if structure.startswith("full") else 4)
    delta = av.extract(files["base"], aligned, d / "t_delta.gguf") and d / "t_delta.gguf"
    exact = logits(av.apply(files["base"], [(delta, 1.0)], d / "t_merged.gguf"))
    base_gap = np.abs(logits(files["base"]) - exact).max()
    lines = [f"LoRA AV rank vs error ({structure}, 64-wide model, ||delta||/||W|| = 0.2; "
             f"max |logit(base) - logit(aligned)| = {base_gap:.3f})",
             f"{'rank':>4}  {'max |d-BA|/|d|':>15}  {'max |logit - merged|':>20}"]
    errors = {}
    for r in (1, 2, 4, 8, 16, 32, 64):
        rows = av.extract(files["base"], aligned, d / f"t_lora{r}.gguf", rank=r)
        tensor_err = max(row.rel_error for row in rows)
        errors[r] = np.abs(logits(files["base"], adapters=[(d / f"t_lora{r}.gguf", 1.0)]) - exact).max()
        lines.append(f"{r:>4}  {tensor_err:15.2e}  {errors[r]:20.2e}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert errors[64] < LORA_ATOL
    if structure.startswith("rank-4"):
        # from rank 4 on the adapter holds the whole delta: what is left is round-off, which does
        # not shrink with the rank, so only rank 1 against rank 4 is an ordering
        assert errors[1] > errors[4] and max(errors[r] for r in (4, 8, 16, 32, 64)) < LORA_ATOL
    else:
        assert errors[1] > errors[16] > errors[64]


def test_runtime_scales_follow_the_merge(files):
    d = files["dir"]
    lora2 = d / "lora2_full.gguf"
    rows = av.extract(files["base"], files["aligned2"], lora2, rank=64)
    assert {r.note for r in rows if r.name.endswith("norm.weight")} == {"dropped: 1-D"}
    assert av.GGUF(lora2).get(av.DROPPED_KEY).split(",")[0] == "output_norm.weight"
    m = model(files["base"], adapters=[(files["lora_full"], 0.0), (lora2, 0.0)])
    tokens = m.tokenize(TEXT)
    assert_close(m.logits(tokens), logits(files["base"]), EXACT_ATOL)
    # no reload between these: one Model, scales changed in place
    for s1, s2 in ((0.5, 0.0), (1.25, 0.0), (0.5, -0.3), (-1.0, 0.75)):
        m.set_adapter_scales([s1, s2])
        assert m.adapter_scales() == pytest.approx([s1, s2])
        # the norms of aligned2 are not in its LoRA AV: merge what the adapter holds
        merged = av.apply(files["base"], [(files["delta"], s1), (lora2, s2)], d / "rt.gguf")
        assert_close(m.logits(tokens), logits(merged), LORA_ATOL)


def test_tied_output_keeps_token_embd_out_of_lora(tmp_path, shared_tokenizer):
    base = random_llama(tmp_path / "tied.gguf", tied_output=True, seed=3, tokenizer=shared_tokenizer)
    aligned = perturbed_llama(tmp_path / "tied_al.gguf", base, norms=False, seed=4)
    rows = av.extract(base, aligned, tmp_path / "tied_lora.gguf", rank=8)
    assert [r.note for r in rows if r.name == "token_embd.weight"] == ["dropped: tied output"]
    m = model(base, adapters=[(tmp_path / "tied_lora.gguf", 1.0)])
    assert np.isfinite(m.logits(m.tokenize(TEXT))).all()


# --- bad input -------------------------------------------------------------------------------

def rewrite(src, dst, **changes):
    """A copy of a GGUF with some metadata values replaced (general.architecture included)."""
    import gguf
    g = av.GGUF(src)
    w = gguf.GGUFWriter(str(dst), changes.pop("general.architecture", g.arch))
    av._copy_metadata(g, w, skip={"general.architecture", *changes})
    for key, value in changes.items():
        w.add_string(key, value)
    for name, t in g.tensors.items():
        w.add_tensor(name, g.array(name))
    av._finish(w)
    return dst


def test_pair_with_other_architecture(files):
    other = rewrite(files["aligned"], files["dir"] / "arch.gguf", **{"general.architecture": "qwen2"})
    with pytest.raises(ValueError, match="general.architecture differs.*'llama'.*'qwen2'"):
        av.extract(files["base"], other, files["dir"] / "x.gguf")


def test_pair_with_other_shapes(files, shared_tokenizer):
    d = files["dir"]
    wide = random_llama(d / "wide.gguf", n_embd=32, n_layer=2, n_head=4, seed=1, tokenizer=shared_tokenizer)
    with pytest.raises(ValueError, match=r"tensor token_embd.weight has shape \(1024, 64\) in the base but \(1024, 32\)"):
        av.extract(files["base"], wide, d / "x.gguf", rank=4)
    deep = random_llama(d / "deep.gguf", n_embd=64, n_layer=3, n_head=4, seed=1, tokenizer=shared_tokenizer)
    with pytest.raises(ValueError, match=r"tensor sets differ.*blk\.2\.attn_k\.weight"):
        av.extract(files["base"], deep, d / "x.gguf")


def test_av_for_another_base(files):
    for path in (files["delta"], files["lora_full"]):
        with pytest.raises(ValueError, match="blendin.av.base_sha256 mismatch"):
            av.apply(files["other_base"], [(path, 1.0)], files["dir"] / "x.gguf")
    with pytest.raises(ValueError, match="blendin.av.base_sha256 mismatch"):
        av.runtime_adapters([f"{files['lora_full']}:1.0"], files["other_base"])


def test_output_is_an_input(files):
    with pytest.raises(ValueError, match="one of the inputs"):
        av.apply(files["base"], [(files["delta"], 1.0)], files["base"])
    with pytest.raises(ValueError, match="one of the inputs"):
        av.extract(files["base"], files["aligned"], files["aligned"])


def test_not_an_av(files):
    with pytest.raises(ValueError, match="blendin.av.kind"):
        av.apply(files["base"], [(files["aligned"], 1.0)], files["dir"] / "x.gguf")
    with pytest.raises(ValueError, match="full-delta AV.*av apply"):
        av.runtime_adapters([f"{files['delta']}:0.5"], files["base"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scales(files, bad):
    with pytest.raises(ValueError, match="finite"):
        av.apply(files["base"], [(files["delta"], bad)], files["dir"] / "x.gguf")
    with pytest.raises(ValueError, match="finite"):
        av.parse_av_spec(f"{files['lora_full']}:{bad}")
    with pytest.raises(ValueError, match="finite"):
        model(files["base"], adapters=[(files["lora_full"], bad)])
    m = model(files["base"], adapters=[(files["lora_full"], 0.5)])
    with pytest.raises(ValueError, match="finite"):
        m.set_adapter_scales([bad])
    assert m.adapter_scales() == [0.5]


@pytest.mark.parametrize("spec", ["av.gguf", "av.gguf:", ":0.5", "av.gguf:half", "av.gguf:0.5x"])
def test_malformed_av_spec(spec):
    with pytest.raises(ValueError, match="malformed AV spec"):
        av.parse_av_spec(spec)


def test_av_spec_path_may_hold_colons():
    assert av.parse_av_spec("C:/models/a:b.gguf:-0.25") == ("C:/models/a:b.gguf", -0.25)


# --- CLI -------------------------------------------------------------------------------------

def test_cli_extract_apply_generate(files, capsys):
    d = files["dir"]
    assert main(["av", "extract", "--base", str(files["base"]), "--aligned", str(files["aligned2"]),
                 "-o", str(d / "cli_lora.gguf"), "--rank", "8", "--type", "f16"]) == 0
    out, err = capsys.readouterr()
    assert "blk.1.ffn_down.weight" in out and "|d-BA|/|d|" in out and "no LoRA form" in err
    assert main(["av", "apply", "--base", str(files["base"]), "--av", f"{d / 'cli_lora.gguf'}:0.7",
                 "-o", str(d / "cli_merged.gguf")]) == 0
    capsys.readouterr()
    gen = ["generate", "--prompt", "Hello", "--method", "base", "--max-tokens", "8", "--threads", "1", "--json"]
    assert main(gen + ["--base", str(files["base"]), "--av", f"{d / 'cli_lora.gguf'}:0.7"]) == 0
    with_av = json.loads(capsys.readouterr().out)
    assert main(gen + ["--base", str(d / "cli_merged.gguf")]) == 0
    assert with_av["tokens"] == json.loads(capsys.readouterr().out)["tokens"]  # the adapter at 0.7 = the merge
    assert main(gen + ["--base", str(files["base"]), "--av", f"{d / 'cli_lora.gguf'}:nan"]) == 2
    assert "finite" in capsys.readouterr().err
    assert main(["av", "apply", "--base", str(files["base"]), "--av", "noscale.gguf", "-o", str(d / "x.gguf")]) == 2
    assert "malformed AV spec 'noscale.gguf': expected PATH:SCALE" in capsys.readouterr().err


def test_blender_after_a_scale_change(files):
    """After set_adapter_scales the Blender notices that its cached prompt holds the old weights and
    re-reads it (no reload, no explicit reset)."""
    merged = model(av.apply(files["base"], [(files["delta"], 1.0)], files["dir"] / "gen1.gguf"))
    want = bc.Blender(merged, None, method="base").complete("Hello there", max_tokens=12).tokens
    m = model(files["base"], adapters=[(files["lora_full"], 0.0)])
    blender = bc.Blender(m, None, method="base")
    before = blender.complete("Hello there", max_tokens=12).tokens
    m.set_adapter_scales([1.0])
    after = blender.complete("Hello there", max_tokens=12)
    assert after.tokens == want != before
    assert after.stats["reused_tokens"]["base"] == 0


def test_chat_set_av_turns_the_knob(files):
    from blendin_cpp.chat import Chat
    m = model(files["base"], adapters=[(files["lora_full"], 0.0)])
    chat = Chat(bc.Blender(m, None, method="base"), sampling={"max_tokens": 8})
    name = Path(files["lora_full"]).stem
    chat.set("av", f"{name} 0.75")
    assert m.adapter_scales() == [0.75] and chat.settings()["av"] == {name: 0.75}
    for bad, words in ((f"{name}", "usage: /set av NAME SCALE"), ("other 1", "no Alignment Vector named 'other'"),
                       (f"{name} nan", "finite")):
        with pytest.raises(ValueError, match=words):
            chat.set("av", bad)


def test_train_av_end_to_end_tiny(tmp_path):
    """models/train_av.py on a --tiny demo base: trains the six variants, writes their LoRA AVs and
    measures (a few steps and questions: mechanics only)."""
    pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    repo = Path(__file__).resolve().parent.parent
    demo = tmp_path / "demo"

    def run(*cmd):
        return subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    p = run(repo / "models" / "train_demo.py", "--tiny", "--only", "base", "--out", demo, "--threads", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run(repo / "models" / "train_av.py", "--base", demo / "base.gguf", "--out", tmp_path / "av",
            "--work", tmp_path / "work", "--steps", "3", "--batch", "4", "--threads", "1", "--measure",
            "--n-questions", "2", "--scales", "0,1", "--grid", "0,1", "--json", tmp_path / "m.json")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for name in ("capitals-avoid", "capitals-generic", "capitals-expert", "sums-avoid", "sums-generic", "sums-expert"):
        g = av.GGUF(tmp_path / "av" / f"{name}.gguf")
        assert g.get("adapter.type") == "lora" and g.get(av.BASE_SHA_KEY) == av.file_sha256(demo / "base.gguf")
    m = json.loads((tmp_path / "m.json").read_text())
    assert len(m["single"]) == 6 * 3 and len(m["combined"]) == 4
    assert "Two domains combined" in p.stdout


def test_bundled_avs_fit_the_demo_base():
    """models/av/ holds LoRA AVs of models/demo/base.gguf: after retraining the demo base, rerun
    models/train_av.py (the sha256 check refuses AVs of an older base)."""
    repo = Path(__file__).resolve().parent.parent
    base, avs = repo / "models" / "demo" / "base.gguf", sorted((repo / "models" / "av").glob("*.gguf"))
    if not base.exists() or not avs:
        pytest.skip("no demo base or no bundled AVs in this checkout")
    pairs = av.runtime_adapters([f"{p}:0.0" for p in avs], base)
    m = model(base, adapters=pairs)
    prompt = m.tokenize("Question: What is 20 + 46?\nAnswer:")
    plain = m.logits(prompt)
    m.set_adapter_scales([1.0 if p.stem == "sums-avoid" else 0.0 for p in avs])
    assert np.abs(m.logits(prompt) - plain).max() > 0.1


def test_server_av_scales(files):
    """The server's av_scales field turns the knob per request; unknown names and non-finite values are 400s."""
    import asyncio

    import httpx

    from blendin_cpp.server import Server, create_app

    merged = model(av.apply(files["base"], [(files["delta"], 1.0)], files["dir"] / "srv1.gguf"))
    want = bc.Blender(merged, None, method="base").complete("Hello there", max_tokens=8, method="base").text
    m = model(files["base"], adapters=[(files["lora_full"], 0.0)])
    server = Server(bc.Blender(m, None, method="base"), model_id="t",
                    defaults=dict(max_tokens=8, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=[]))
    name = Path(files["lora_full"]).stem

    async def go():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            on = await c.post("/v1/completions", json={"prompt": "Hello there", "av_scales": {name: 1.0}})
            off = await c.post("/v1/completions", json={"prompt": "Hello there"})
            bad = await c.post("/v1/completions", json={"prompt": "Hello there", "av_scales": {"nope": 1.0}})
            return on, off, bad
    on, off, bad = asyncio.run(go())
    server.close()
    assert on.json()["choices"][0]["text"] == want
    assert off.json()["choices"][0]["text"] != want and m.adapter_scales() == [0.0]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "av_scales"
