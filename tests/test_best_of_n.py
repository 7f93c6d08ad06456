"""Best-of-N (InfAlign's inference side): batched candidates, batched scoring, calibration."""
import json
import subprocess
import sys

import numpy as np
import pytest

import blendin_cpp as bc
from blendin_cpp import best_of_n as bon
from blendin_cpp import llama_cpp_peer
from blendin_cpp.testing import random_llama

llama_cpp = pytest.importorskip("llama_cpp")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def paths(model_dir, shared_tokenizer):
    """A base, guide and anti whose widths are not multiples of 8. Measured with this llama.cpp
    on x86-64: for such matrices a batch of several rows goes through the same dot products as a
    single row, so parallel candidates see exactly the logits single generations see (with widths
    64 and 32 a 6-row batch differed from single rows by up to 4e-3, which moves sampled tokens
    that sit near the edge of their draw)."""
    def make(name, seed, **shape):
        return str(random_llama(model_dir / f"bon_{name}.gguf", seed=seed, tokenizer=shared_tokenizer, **shape))
    return {"base": make("base", 31, n_embd=60, n_head=2, n_ff=60, logit_std=5),
            "guide": make("guide", 32, n_embd=36, n_head=2, n_ff=44, n_layer=1, logit_std=4),
            "anti": make("anti", 33, n_embd=36, n_head=2, n_ff=44, n_layer=1, logit_std=4)}


@pytest.fixture(scope="module")
def blender(paths):
    m = {k: bc.Model(p, n_ctx=2048, kv_type="f32", n_threads=1, n_seq_max=8) for k, p in paths.items()}
    return bc.Blender(m["base"], m["guide"], anti=m["anti"])


@pytest.mark.parametrize("method", ["blendin", "nudging_word", "proxy", "base", "guide"])
def test_batched_candidates_equal_separate_generations(blender, method):
    """N parallel sequences give the candidates N separate generations give with the same seeds:
    the batch scheduler and the single-sequence engine drive the same Decoder."""
    cands = bon.generate_candidates(blender, PROMPT, 6, seed=40, max_tokens=32, temperature=0.8, method=method)
    for i, c in enumerate(cands):
        assert_same(c, blender.complete(PROMPT, max_tokens=32, temperature=0.8, seed=40 + i, method=method), blender)
    assert len({tuple(c.tokens) for c in cands}) > 1  # the seeds differ


def assert_same(cand, single, blender):
    body = [t for t in single.tokens if not blender.base.is_eog(t)]
    assert cand.tokens == body and cand.text == single.text
    assert cand.interventions == single.stats["interventions"]
    assert cand.finish_reason == single.finish_reason


def test_more_candidates_than_sequences_run_in_groups(paths):
    """Each sequence has its own cells (n_ctx // n_seq_max = 128): 6 candidates of 100 tokens on
    2 sequences run in groups of two, each still its seed's generation."""
    m = {k: bc.Model(p, n_ctx=256, kv_type="f32", n_threads=1, n_seq_max=2) for k, p in paths.items()}
    b = bc.Blender(m["base"], m["guide"])
    kw = dict(max_tokens=100, temperature=0.8, method="blendin", ignore_eos=True)
    cands = bon.generate_candidates(b, PROMPT, 6, seed=7, **kw)
    assert {len(c.tokens) for c in cands} == {100} and {c.finish_reason for c in cands} == {"length"}
    for i, c in enumerate(cands):
        assert_same(c, b.complete(PROMPT, seed=7 + i, **kw), b)


def test_batched_scoring_equals_llama_cpp(blender, paths):
    cands = bon.generate_candidates(blender, PROMPT, 4, seed=1, max_tokens=12, temperature=1.0, method="base")
    base_prompt, _ = blender.prompts(PROMPT)
    got = bc._core.score_continuations(blender.base._handle, base_prompt, [c.tokens for c in cands], False)
    ll = llama_cpp_peer.load(paths["base"], n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0,
                         flash_attn=True, n_threads=1)
    for c, g in zip(cands, got):
        ll.reset()
        ll.eval(base_prompt + c.tokens)
        logits = np.array(ll.scores[: len(base_prompt) + len(c.tokens)], dtype=np.float64)
        rows = logits[len(base_prompt) - 1: -1]
        lse = rows.max(1) + np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1))
        expected = float((rows[np.arange(len(c.tokens)), c.tokens] - lse).sum())
        assert g == pytest.approx(expected, abs=1e-3)


def test_implicit_reward_is_guide_minus_base(blender):
    cands = bon.generate_candidates(blender, PROMPT, 3, seed=2, max_tokens=10, method="blendin")
    base_prompt, guide_prompt = blender.prompts(PROMPT)
    ys = [c.tokens for c in cands]
    g = bc._core.score_continuations(blender.guide._handle, guide_prompt, ys, True)
    b = bc._core.score_continuations(blender.base._handle, base_prompt, ys, True)
    got = bon.implicit_reward(blender, normalize=True)(PROMPT, cands)
    assert got == pytest.approx([x - y for x, y in zip(g, b)])


def test_calibration_is_uniform_on_reference_samples(blender):
    reward = bon.implicit_reward(blender)
    ref = bon.generate_candidates(blender, PROMPT, 64, seed=1000, max_tokens=16, temperature=1.0, method="base")
    ref_r = reward(PROMPT, ref)
    # the reference samples against themselves: exactly the mid-rank grid (k + 0.5) / K
    c_self = np.sort(bon.calibrate(ref_r, ref_r))
    assert c_self == pytest.approx((np.arange(64) + 0.5) / 64)
    # fresh samples of the same policy: uniform on [0, 1] (Kolmogorov-Smirnov, 1% level)
    fresh = bon.generate_candidates(blender, PROMPT, 64, seed=5000, max_tokens=16, temperature=1.0, method="base")
    c = np.sort(bon.calibrate(reward(PROMPT, fresh), ref_r))
    n = len(c)
    d = max(np.max(np.arange(1, n + 1) / n - c), np.max(c - np.arange(n) / n))
    assert d < 1.63 / np.sqrt(n) + 1 / 64, f"KS distance {d:.3f}"


def test_calibration_ignores_increasing_transforms():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=50).round(1)  # ties included
    raw = rng.normal(size=20).round(1)
    c = bon.calibrate(raw, ref)
    for f in (lambda r: 3 * r + 1, np.exp):
        assert bon.calibrate(f(raw), f(ref)) == pytest.approx(c)
    assert bon.calibrate([ref.max() + 1], ref)[0] == 1.0 and bon.calibrate([ref.min() - 1], ref)[0] == 0.0


def test_transforms_and_selection():
    c = np.array([0.1, 0.9, 0.5])
    assert bon.transform(c, "exp", 4) == pytest.approx(np.exp(4 * c))
    assert bon.transform(c, "neg_exp", 4) == pytest.approx(-np.exp(-4 * c))
    assert bon.select(c, "best") == 1 and bon.select(c, "worst") == 0
    picks = np.bincount([bon.select(c, "sample", select_beta=0.5, seed=s) for s in range(4000)], minlength=3) / 4000
    w = np.exp(c / 0.5)
    assert picks == pytest.approx(w / w.sum(), abs=0.03)


def test_best_of_n_picks_the_highest_reward(blender):
    r = bon.best_of_n(blender, PROMPT, n=6, reward=bon.callable_reward(lambda p, text: len(text)), calibrate_k=8,
                      max_tokens=12, seed=3)
    lens = [len(c.text) for c in r.candidates]
    assert r.candidates[r.chosen].raw == max(lens)
    assert all(0 <= c.calibrated <= 1 for c in r.candidates) and len(r.reference_rewards) == 8
    worst = bon.best_of_n(blender, PROMPT, n=6, reward=bon.callable_reward(lambda p, text: len(text)),
                          transform_kind="neg_exp", selection="worst", max_tokens=12, seed=3)
    assert worst.candidates[worst.chosen].raw == min(lens)


@pytest.mark.parametrize("kwargs, words", [
    (dict(n=0), "n must be a positive integer"),
    (dict(transform_kind="square"), "unknown transform"),
    (dict(selection="median"), "unknown selection"),
])
def test_bad_input(blender, kwargs, words):
    args = dict(n=2, reward=bon.callable_reward(lambda p, t: 0.0), max_tokens=8) | kwargs
    with pytest.raises(ValueError, match=words):
        bon.best_of_n(blender, PROMPT, **args)


def test_reward_callable_must_return_numbers(blender):
    with pytest.raises(ValueError, match="finite"):
        bon.best_of_n(blender, PROMPT, n=2, reward=bon.callable_reward(lambda p, t: float("nan")), max_tokens=4)


def test_bon_cli_json_and_export(paths, tmp_path):
    out = tmp_path / "rows.jsonl"
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "bon", "--base", paths["base"], "--guide",
                        paths["guide"], "--prompt", PROMPT, "--n", "4", "--reward", "implicit", "--calibrate", "8",
                        "--transform", "exp", "--t", "4", "--max-tokens", "10", "--ctx", "512", "--threads", "1",
                        "--json", "--export-jsonl", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res["candidates"]) == 4 and sum(c["chosen"] for c in res["candidates"]) == 1
    chosen = res["candidates"][res["chosen"]]
    assert chosen["transformed"] == max(c["transformed"] for c in res["candidates"])
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) >= {"prompt", "response", "raw", "calibrated", "transformed"}
    assert all(c["transformed"] == pytest.approx(np.exp(4 * c["calibrated"])) for c in rows)


def test_reward_model_in_gguf_scores_through_batched_sequences(blender, paths):
    """A reward language model (here a generated fixture): its per-token log-likelihood of each
    response after the prompt, all candidates scored in one batched pass, equals llama-cpp-python's."""
    judge = bc.Model(paths["anti"], n_ctx=512, kv_type="f32", n_threads=1, n_seq_max=4)
    cands = bon.generate_candidates(blender, PROMPT, 3, seed=9, max_tokens=8, temperature=1.0, method="base")
    got = bon.model_reward(judge)(PROMPT, cands)
    ll = llama_cpp_peer.load(paths["anti"], n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0,
                         flash_attn=True, n_threads=1)
    head = judge.tokenize(PROMPT + "\n", add_special=True)
    for c, g in zip(cands, got):
        y = judge.tokenize(c.text, add_special=False)
        ll.reset()
        ll.eval(head + y)
        rows = np.array(ll.scores[len(head) - 1: len(head) + len(y) - 1], dtype=np.float64)
        lse = rows.max(1) + np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1))
        assert g == pytest.approx(float((rows[np.arange(len(y)), y] - lse).mean()), abs=1e-3)


def test_proxy_candidates_get_their_beta(blender):
    """best_of_n's selection temperature is select_beta; beta is proxy-tuning's, as everywhere."""
    kw = dict(n=3, reward=bon.callable_reward(lambda p, t: float(len(t))), max_tokens=16, temperature=0.8,
              method="proxy", seed=5)
    r = bon.best_of_n(blender, PROMPT, beta=0.3, **kw)
    for i, c in enumerate(r.candidates):
        single = blender.complete(PROMPT, max_tokens=16, temperature=0.8, seed=5 + i, method="proxy", beta=0.3)
        assert c.text == single.text
    assert [c.text for c in r.candidates] != [c.text for c in bon.best_of_n(blender, PROMPT, beta=1.0, **kw).candidates]


def test_reference_cache_belongs_to_one_model_and_one_reward(paths, blender):
    other = bc.Blender(bc.Model(paths["guide"], n_ctx=2048, kv_type="f32", n_threads=1, n_seq_max=8),
                       bc.Model(paths["anti"], n_ctx=2048, kv_type="f32", n_threads=1, n_seq_max=8))
    cache, reward = bon.ReferenceCache(), bon.callable_reward(lambda p, t: float(len(t)))
    a = cache.rewards(blender, PROMPT, reward, 8, max_tokens=12, seed=1)
    assert cache.rewards(blender, PROMPT, reward, 8, max_tokens=12, seed=1) is a  # cached
    b = cache.rewards(other, PROMPT, reward, 8, max_tokens=12, seed=1)  # another reference policy
    assert b is not a and b == reward(PROMPT, bon.generate_candidates(other, PROMPT, 8, seed=1, max_tokens=12,
                                                                      temperature=1.0, method="base"))
    assert b != a
    words = bon.callable_reward(lambda p, t: float(len(t.split())))
    assert cache.rewards(blender, PROMPT, words, 8, max_tokens=12, seed=1) is not a  # another reward


def test_scoring_more_than_fits_at_once(paths):
    """More continuations than sequences are scored in groups, each as if alone."""
    m = bc.Model(paths["base"], n_ctx=384, kv_type="f32", n_threads=1, n_seq_max=3)
    prompt = m.tokenize(PROMPT)
    conts = [[(7 * i + j) % 900 + 5 for j in range(60)] for i in range(8)]  # 8 continuations, 3 sequences
    together = bc._core.score_continuations(m._handle, prompt, conts, False)
    alone = [bc._core.score_continuations(m._handle, prompt, [c], False)[0] for c in conts]
    # a continuation scored in another's sequence would be off by hundreds
    assert together == pytest.approx(alone, rel=1e-6)
    with pytest.raises(ValueError, match="continuation 0 has 130 tokens, which do not fit the context of 128"):
        bc._core.score_continuations(m._handle, prompt, [list(range(5, 135))], False)


def test_base_candidates_with_a_cross_vocabulary_guide(model_dir, paths):
    """Only methods that read the guide need its vocabulary: the base alone runs with any guide."""
    from blendin_cpp.testing import make_tokenizer
    other = random_llama(model_dir / "bon_xguide.gguf", n_vocab=800, n_embd=36, n_head=2, n_ff=44, n_layer=1,
                         seed=52, tokenizer=make_tokenizer(800, seed=42))
    kw = dict(n_ctx=512, kv_type="f32", n_threads=1, n_seq_max=4)
    b = bc.Blender(bc.Model(paths["base"], **kw), bc.Model(other, **kw))
    cands = bon.generate_candidates(b, PROMPT, 3, seed=1, max_tokens=12, temperature=1.0, method="base")
    for i, c in enumerate(cands):
        assert_same(c, b.complete(PROMPT, max_tokens=12, temperature=1.0, seed=1 + i, method="base"), b)
    with pytest.raises(ValueError, match="needs a guide that shares the base's vocabulary"):
        bon.generate_candidates(b, PROMPT, 2, max_tokens=4, method="blendin")


def test_bon_command_at_its_documented_defaults():
    """`bon --n 4 --calibrate 8` on the demo pair: 12 candidates of up to 256 tokens (the default
    --max-tokens) do not fit the default 2048-token context at once; they run in groups."""
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "bon", "--prompt", "What is the capital of Korvath?",
                        "--n", "4", "--calibrate", "8", "--threads", "1", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res["candidates"]) == 4 and len(res["reference_rewards"]) == 8


def test_implicit_reward_with_a_cross_vocabulary_guide():
    """The demo pair with the guide that has its own tokenizer: the guide reads each candidate's
    text through its own tokenizer (as the engine does), the base scores the candidate's tokens.
    The reference is computed independently with llama-cpp-python: the guide's log-probabilities
    of its own tokenization of the text after its prompt, minus the base's of the candidate."""
    from blendin_cpp import demo
    kw = dict(n_ctx=512, kv_type="f32", n_threads=1, n_seq_max=4)
    paths = {"base": demo.demo_path("base"), "guide": demo.demo_path("guide-xvocab")}
    b = bc.Blender(bc.Model(paths["base"], **kw), bc.Model(paths["guide"], **kw))
    assert b._engine.bridged
    question = "What is the capital of Gafashe?"
    cands = bon.generate_candidates(b, question, 3, seed=5, max_tokens=24, temperature=1.0, method="base")
    base_prompt, guide_prompt = b.prompts(question)

    def logprob(path, prompt, ys):
        ll = llama_cpp_peer.load(path, n_ctx=512, logits_all=True, verbose=False, type_k=0, type_v=0,
                                 flash_attn=True, n_threads=1)
        out = []
        for y in ys:
            ll.reset()
            ll.eval(prompt + y)
            rows = np.array(ll.scores[len(prompt) - 1: len(prompt) + len(y) - 1], dtype=np.float64)
            lse = rows.max(1) + np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1))
            out.append(float((rows[np.arange(len(y)), y] - lse).sum()))
        return out
    guide_ll = llama_cpp_peer.load(paths["guide"], n_ctx=512, vocab_only=True, verbose=False)
    guide_ys = [guide_ll.tokenize(c.text.encode(), add_bos=False, special=False) for c in cands]
    assert any(y != c.tokens for y, c in zip(guide_ys, cands))  # the two vocabularies split the text differently
    expected = [g - x for g, x in zip(logprob(paths["guide"], guide_prompt, guide_ys),
                                      logprob(paths["base"], base_prompt, [c.tokens for c in cands]))]
    assert bon.implicit_reward(b)(question, cands) == pytest.approx(expected, abs=1e-3)
    per_token = bon.implicit_reward(b, normalize=True)(question, cands)
    lengths = [(len(y), len(c.tokens)) for y, c in zip(guide_ys, cands)]
    assert per_token == pytest.approx([g / n - x / m for (n, m), g, x in zip(
        lengths, logprob(paths["guide"], guide_prompt, guide_ys), logprob(paths["base"], base_prompt, [c.tokens for c in cands]))],
        abs=1e-3)
