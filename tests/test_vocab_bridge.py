"""Blending a base and a guide with different tokenizers (cpp/vocab_bridge.*)."""
import numpy as np
import pytest

import blendin_cpp as bc
from blendin_cpp import llama_cpp_peer
from blendin_cpp.gguf_export import TOKEN_CONTROL
from blendin_cpp.testing import bytes_to_unicode, make_tokenizer, random_llama

llama_cpp = pytest.importorskip("llama_cpp")
PROMPT = "The capital of France is"
GAMMA = 0.5


@pytest.fixture(scope="module")
def toks():
    # two real byte-level BPE vocabularies of different sizes and merges
    return make_tokenizer(1024, seed=7), make_tokenizer(800, seed=42)


@pytest.fixture(scope="module")
def paths(model_dir, toks):
    base_tok, guide_tok = toks
    return {
        "base": str(random_llama(model_dir / "x_base.gguf", n_embd=64, n_layer=2, seed=51, logit_std=5, tokenizer=base_tok)),
        "guide": str(random_llama(model_dir / "x_guide.gguf", n_vocab=800, n_embd=32, n_layer=1, n_head=2, seed=52,
                                  logit_std=4, tokenizer=guide_tok)),
    }


@pytest.fixture(scope="module")
def blender(paths):
    kw = dict(n_ctx=256, kv_type="f32", n_threads=1)
    return bc.Blender(bc.Model(paths["base"], **kw), bc.Model(paths["guide"], **kw))


def expected_map(base_tok, guide_tok):
    """The documented rule, built from the tokenizers' own token lists (not through llama.cpp)."""
    u2b = {c: b for b, c in bytes_to_unicode().items()}
    as_bytes = lambda t: bytes(u2b[c] for c in t)  # noqa: E731
    by_bytes = {}
    for i, (t, ty) in enumerate(zip(base_tok.tokens, base_tok.types)):
        if ty != TOKEN_CONTROL:
            by_bytes.setdefault(as_bytes(t), i)
    out, exact = [], []
    for t, ty in zip(guide_tok.tokens, guide_tok.types):
        if ty == TOKEN_CONTROL:
            out.append(base_tok.eos if t in ("</s>", "<|end|>") else base_tok.special[t])
            exact.append(True)
            continue
        b = as_bytes(t)
        if b in by_bytes:
            out.append(by_bytes[b])
            exact.append(True)
            continue
        prefixes = [by_bytes[b[:n]] for n in range(len(b), 0, -1) if b[:n] in by_bytes]
        out.append(prefixes[0] if prefixes else -1)
        exact.append(False)
    return out, exact


def test_mapping_matches_an_independent_construction(blender, toks):
    bridge = bc._core.VocabBridge(blender.base._handle, blender.guide._handle)
    assert not bridge.identity and "token" in bridge.first_difference
    want, exact = expected_map(*toks)
    assert bridge.map() == want
    assert bridge.exact() == exact
    assert 0 < sum(exact) < len(exact)  # both kinds occur


def test_same_vocabulary_takes_the_identity_path(model_dir, toks):
    a = bc.Model(random_llama(model_dir / "same_a.gguf", seed=1, tokenizer=toks[0]), n_ctx=64)
    b = bc.Model(random_llama(model_dir / "same_b.gguf", n_embd=32, n_head=2, seed=2, tokenizer=toks[0]), n_ctx=64)
    assert bc._core.VocabBridge(a._handle, b._handle).identity
    assert not bc.Blender(a, b)._engine.bridged


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ends_mid_char(b: bytes) -> bool:
    """The text ends inside a UTF-8 character (a lead byte still waiting for its continuation)."""
    for back in range(1, min(4, len(b)) + 1):
        c = b[-back]
        if c & 0xC0 == 0x80:
            continue
        need = 2 if c >> 5 == 6 else 3 if c >> 4 == 14 else 4 if c >> 3 == 30 else 1
        return back < need
    return False


def test_blended_output_equals_numpy_reference(blender, paths, toks):
    """The documented rule: the gate on the base; where it intervenes (and the text does not end
    inside a character, which the guide's tokenizer cannot read), the guide's distribution over
    its own vocabulary, mapped onto the base's by the bridge, mixed with BlendIn's auto alpha."""
    r = blender.complete(PROMPT, max_tokens=40, method="blendin", gamma=GAMMA)
    sources = [s.source for s in r.steps]
    assert "base" in sources and "blend" in sources, sources
    mapping, exact = expected_map(*toks)
    mapping, exact = np.array(mapping), np.array(exact)
    base_prompt, guide_prompt = blender.prompts(PROMPT)
    kw = dict(n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0, flash_attn=True, n_threads=1)
    base, guide = llama_cpp_peer.load(paths["base"], **kw), llama_cpp_peer.load(paths["guide"], **kw)
    base.eval(base_prompt)
    text = b""
    for i, step in enumerate(r.steps):
        pb = softmax(np.array(base.scores[base.n_tokens - 1], dtype=np.float64))
        if step.source == "blend":
            # the guide reads the text so far through its own tokenizer
            guide.reset()
            guide.eval(guide_prompt + guide.tokenize(text, add_bos=False, special=False))
            pg_own = softmax(np.array(guide.scores[guide.n_tokens - 1], dtype=np.float64))
            pg = np.zeros_like(pb)
            np.add.at(pg, mapping[mapping >= 0], pg_own[mapping >= 0])
            pg /= pg.sum()
            # the reference re-reads the guide's whole sequence at every step, the engine extends
            # its cache: the guide's numbers agree to ~1e-3, not to the last bit
            assert step.unmatched == pytest.approx(pg_own[~exact].sum(), abs=2e-3)
            a = np.clip(pg.max() / (pb.max() + pg.max()) + 0.1 * pb[np.argmax(pg)], 0, 1)
            assert step.alpha == pytest.approx(a, abs=2e-3)
            p = (1 - a) * pb + a * pg
        else:
            p = pb
        gate = pb.max() < GAMMA and not ends_mid_char(text)
        assert gate == (step.source == "blend") or abs(pb.max() - GAMMA) < 1e-4
        assert p.max() - p[step.token] < 1e-3, f"step {i}: {step.token} vs {int(np.argmax(p))}"
        base.eval([step.token])
        text += blender.base.piece(step.token)


def test_the_guide_reads_exactly_the_text_the_base_wrote(blender):
    r = blender.complete(PROMPT, max_tokens=40, method="blendin", gamma=0.9)
    assert r.stats["interventions"] > 0
    guide_view = blender._engine.tokens(1)
    _, guide_prompt = blender.prompts(PROMPT)
    assert guide_view[: len(guide_prompt)] == guide_prompt
    generated = blender.base.detokenize_bytes(r.tokens)
    seen = blender.guide.detokenize_bytes(guide_view[len(guide_prompt):])
    # the guide last caught up at its last consultation: what it read is a prefix of the text.
    # (llama.cpp's tokenizer reads invalid UTF-8 -- random models write some -- as U+FFFD.)
    assert generated.decode("utf-8", errors="replace").encode().startswith(seen) and len(seen) > 0


def test_word_level_nudging_across_vocabularies(blender):
    r = blender.complete(PROMPT, max_tokens=40, method="nudging_word", gamma=GAMMA)
    runs = "".join("g" if s.source == "guide" else "b" for s in r.steps)
    assert "gg" in runs and "b" in runs  # the guide writes several tokens in a row (a word)
    # a nudged word ends where the guide's next token would start a new one
    for s, nxt in zip(r.steps, r.steps[1:]):
        if s.source == "guide" and nxt.source == "guide" and nxt.pb_max is None:
            assert not blender.base.piece(nxt.token)[:1].isspace()


def test_overlap_diagnostics_are_reported(blender):
    r = blender.complete(PROMPT, max_tokens=40, method="blendin", gamma=0.9, diagnostics=True)
    blended = [s for s in r.steps if s.source == "blend"]
    assert blended and all(s.guide_rank >= 1 and 0 <= s.mass_above <= 1 and 0 <= s.unmatched <= 1 for s in blended)
    assert all(s.guide_rank is None for s in r.steps if s.source == "base")


def test_overlap_command(paths, tmp_path):
    import json
    import subprocess
    import sys
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "overlap", "--base", paths["base"], "--guide",
                        paths["guide"], "--prompts", str(prompts), "--max-tokens", "12", "--ctx", "256",
                        "--threads", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    # gamma 1.01 consults the guide at every step but those where the text ends inside a character
    assert res["bridged"] and res["prompts"] == 2 and 18 <= res["consulted_steps"] <= 24
    assert 0 <= res["in_base_top10"] <= res["in_base_top50"] <= res["in_base_top100"] <= 1
    assert 0 < res["unmatched_guide_mass"] < 1


def test_a_guide_with_a_smaller_context_ends_the_generation_cleanly(paths):
    """The guide re-reads the text through its own tokenizer; when that reading would not fit its
    context, the generation ends with finish_reason "context" (the base still had room)."""
    base = bc.Model(paths["base"], n_ctx=256, kv_type="f32", n_threads=1)
    probe = bc.Blender(base, bc.Model(paths["guide"], n_ctx=256, kv_type="f32", n_threads=1))
    room = 14
    guide = bc.Model(paths["guide"], n_ctx=len(probe.prompts(PROMPT).guide) + room, kv_type="f32", n_threads=1)
    b = bc.Blender(base, guide)
    r = b.complete(PROMPT, max_tokens=100, method="blendin", gamma=1.01, ignore_eos=True)
    assert r.finish_reason == "context" and 0 < len(r.tokens) < 100
    # it went as far as the guide could read: one more token would not have fitted
    assert len(b._engine.tokens(1)) <= guide.n_ctx
    longer = guide.tokenize(b.base.detokenize(r.tokens), add_special=False)
    assert len(b.prompts(PROMPT).guide) + len(longer) > guide.n_ctx - 2
