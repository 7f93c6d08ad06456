"""The blending engine against an independent path: a numpy implementation of docs/design.md section 3,
written here from logits that llama-cpp-python computes for the same GGUF files."""
import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import blendin_cpp as bc
from blendin_cpp import llama_cpp_peer
from blendin_cpp.testing import make_tokenizer, random_llama

llama_cpp = pytest.importorskip("llama_cpp")

PROMPT = "The capital of France is"
N_CTX = 256
GAMMA = 0.4


@pytest.fixture(scope="module")
def paths(model_trio):
    return model_trio("e", 11)


@pytest.fixture(scope="module")
def models(paths):
    return {k: bc.Model(p, n_ctx=N_CTX, kv_type="f32", n_threads=1) for k, p in paths.items()}


@pytest.fixture(scope="module")
def blender(models):
    return bc.Blender(models["base"], models["guide"], anti=models["anti"])


# ---- the numpy reference ------------------------------------------------------------------------
class RefModel:
    """One model evaluated token by token by llama-cpp-python."""

    def __init__(self, path, prompt):
        self.ll = llama_cpp_peer.load(path, n_ctx=N_CTX, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=1,
                                  flash_attn=True)
        self.ll.eval(prompt)

    def logits(self):
        return np.array(self.ll.scores[self.ll.n_tokens - 1], dtype=np.float64)

    def push(self, token):
        self.ll.eval([token])


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_policy(method, lb, pg, la=None, *, lg=None, gamma=GAMMA, alpha="auto", beta=1.0, lam=0.5,
                     consult=True):
    """docs/design.md section 3 at one position, outside a nudged word: the final distribution and
    its source, from the base's logits `lb` (None for the guide alone), the guide's distribution
    `pg` (its logits `lg` where proxy and DeRa need them) and the anti's logits `la` (proxy).
    `consult=False`: the gate may not ask the guide here (the intervention cap; a cross-vocabulary
    guide while the text ends inside a character)."""
    if method == "guide":
        return pg, "guide"
    pb = softmax(lb)
    gate = pb.max() < gamma and consult
    if method in ("nudging", "nudging_word") and gate:
        return pg, "guide"
    if method == "blendin" and gate:
        a = alpha
        if a == "auto":
            a = float(np.clip(pg.max() / (pb.max() + pg.max()) + 0.1 * pb[np.argmax(pg)], 0, 1))
        return (1 - a) * pb + a * pg, "blend"
    if method == "ensemble":
        return (pb + pg) / 2, "blend"
    if method == "proxy":
        return softmax(lb + beta * (lg - la)), "blend"
    if method == "dera":
        return softmax((1 - lam) * lb + lam * lg), "blend"
    return pb, "base"


def check_against_reference(paths, base_prompt, guide_prompt, method, steps, *, gamma=GAMMA, alpha="auto",
                            beta=1.0, lam=0.5):
    """Replay our greedy run through the formulas of docs/design.md section 3, step by step on our own
    prefix. Each token must be the reference's argmax, except where the reference's top two
    candidates are within 1e-4 (batched and one-at-a-time decodes differ in the last bits);
    each source must match, except where the base's top probability is within 1e-4 of gamma.
    Returns the number of steps where the choice was exactly the reference's."""
    base = RefModel(paths["base"], base_prompt)
    guide = RefModel(paths["guide"], guide_prompt)
    anti = RefModel(paths["anti"], guide_prompt) if method == "proxy" else None
    eog = {int(base.ll.metadata[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")}
    pieces = [base.ll.detokenize([t], special=False) for t in range(base.ll.n_vocab())]
    starts_word = [len(p) == 0 or p[:1].isspace() for p in pieces]
    exact = 0
    in_word = False
    for i, step in enumerate(steps):
        lb, lg = base.logits(), guide.logits()
        pb, pg = softmax(lb), softmax(lg)
        if in_word and not starts_word[int(np.argmax(pg))]:
            p, source = pg, "guide"
        else:
            p, source = reference_policy(method, lb, pg, anti.logits() if anti else None, lg=lg, gamma=gamma,
                                         alpha=alpha, beta=beta, lam=lam)
        in_word = method == "nudging_word" and source == "guide"
        if step.source != source:
            assert abs(pb.max() - gamma) < 1e-4, f"{method} step {i}: source {step.source}, reference {source}"
        else:
            best = int(np.argmax(p))
            assert p[best] - p[step.token] < 1e-4, \
                f"{method} step {i}: token {step.token} (p={p[step.token]:.6f}), reference {best} (p={p[best]:.6f})"
            exact += best == step.token
        if step.token in eog:
            break
        for m in (base, guide, anti):
            if m is not None:
                m.push(step.token)
    return exact


# ---- every method against the reference -----------------------------------------------------------
MODES = {"naive": dict(lazy=False), "lazy": dict(lazy=True), "speculative": dict(lazy=True, speculative="on"),
         "ngram": dict(speculative="on", drafter="ngram"), "auto": dict(speculative="auto")}


@pytest.mark.parametrize("method", bc.METHODS)
@pytest.mark.parametrize("mode", MODES)
def test_greedy_equals_numpy_reference(method, mode, blender, paths):
    base_prompt, guide_prompt = blender.prompts(PROMPT)
    # proxy at beta 1 ends early on this random pair (the guide - anti difference picks the end
    # token after 38 steps); beta 0.8 keeps it going for the 64 tokens the check needs
    extra = {"beta": 0.8} if method == "proxy" else {}
    ours = blender.complete(PROMPT, max_tokens=64, method=method, gamma=GAMMA, **MODES[mode], **extra)
    assert len(ours.steps) == 64
    exact = check_against_reference(paths, base_prompt, guide_prompt, method, ours.steps, **extra)
    assert exact >= 62, f"{method}: only {exact} of 64 choices were the reference's exact argmax"
    sources = {s.source for s in ours.steps}
    if method in ("nudging", "nudging_word", "blendin"):
        # both kinds of step occur, so the gate itself is tested
        assert "base" in sources and sources & {"guide", "blend"}, sources
        assert 0 < ours.stats["intervention_rate"] < 1
    expected = {"base": {"base"}, "guide": {"guide"}, "ensemble": {"blend"}, "proxy": {"blend"}, "dera": {"blend"}}
    if method in expected:
        assert sources == expected[method]


def test_prompts_are_tokenized_like_llama_cpp(blender, paths):
    base_prompt, guide_prompt = blender.prompts(PROMPT)
    ll = llama_cpp_peer.load(paths["guide"], n_ctx=64, verbose=False)
    assert base_prompt == ll.tokenize(PROMPT.encode(), add_bos=True)
    rendered = "<s><|user|>\n" + PROMPT + "<|end|>\n<|assistant|>\n"
    assert guide_prompt == ll.tokenize(rendered.encode(), add_bos=False, special=True)


def test_diagnostics_follow_their_definitions(blender, paths):
    r = blender.complete(PROMPT, max_tokens=30, method="blendin", gamma=0.6, top_logprobs=3, diagnostics=True)
    base_prompt, guide_prompt = blender.prompts(PROMPT)
    base, guide = RefModel(paths["base"], base_prompt), RefModel(paths["guide"], guide_prompt)
    alphas = []
    for s in r.steps:
        pb, pg = softmax(base.logits()), softmax(guide.logits())
        assert s.pb_max == pytest.approx(pb.max(), abs=1e-4)
        if s.source == "blend":
            agree = pb[np.argmax(pg)]
            assert s.pg_max == pytest.approx(pg.max(), abs=1e-4)
            assert s.agree == pytest.approx(agree, abs=1e-4)
            assert s.alpha == pytest.approx(np.clip(pg.max() / (pb.max() + pg.max()) + 0.1 * agree, 0, 1), abs=1e-4)
            overlap = len(set(np.argsort(-pb)[:10]) & set(np.argsort(-pg)[:10])) / 10
            assert s.overlap == pytest.approx(overlap, abs=0.11)
            alphas.append(s.alpha)
            p = (1 - s.alpha) * pb + s.alpha * pg
        else:
            assert s.pg_max is None and s.alpha == 0.0  # the base alone: no guide weight
            p = pb
        # logprobs of the final distribution: the chosen token and the three likeliest
        assert s.logprob == pytest.approx(np.log(p[s.token]), abs=1e-3)
        assert [t for t, _ in s.top_logprobs] == list(np.argsort(-p)[:3])
        assert [lp for _, lp in s.top_logprobs] == pytest.approx(np.log(np.sort(p)[::-1][:3]), abs=1e-3)
        base.push(s.token)
        guide.push(s.token)
    st = r.stats
    assert st["tokens"] == 30 and st["interventions"] == len(alphas) > 0
    assert st["intervention_rate"] == pytest.approx(len(alphas) / 30)
    assert st["mean_alpha"] == pytest.approx(np.mean(alphas), abs=1e-5)


def test_vocabulary_sized_diagnostics_only_when_asked(blender):
    plain = blender.complete(PROMPT, max_tokens=30, method="blendin", gamma=0.6)
    asked = blender.complete(PROMPT, max_tokens=30, method="blendin", gamma=0.6, diagnostics=True)
    assert plain.tokens == asked.tokens
    blended = [(a, b) for a, b in zip(plain.steps, asked.steps) if a.source == "blend"]
    assert blended
    for a, b in blended:
        assert a.overlap is None and a.guide_rank is None and a.mass_above is None
        assert b.overlap is not None and b.guide_rank >= 1 and 0 <= b.mass_above <= 1
        assert a.alpha == pytest.approx(b.alpha, abs=1e-5) and a.pg_max == pytest.approx(b.pg_max, abs=1e-5)


# ---- degenerate cases -----------------------------------------------------------------------------
def test_alpha_zero_is_base_alone(blender):
    base = blender.complete(PROMPT, max_tokens=48, method="base")
    mixed = blender.complete(PROMPT, max_tokens=48, method="blendin", alpha=0.0, gamma=0.9)
    assert mixed.stats["interventions"] > 0
    assert mixed.tokens == base.tokens


def test_gamma_zero_never_intervenes(blender):
    base = blender.complete(PROMPT, max_tokens=48, method="base")
    for method in ("nudging", "nudging_word", "blendin"):
        r = blender.complete(PROMPT, max_tokens=48, method=method, gamma=0.0)
        assert r.stats["interventions"] == 0 and r.tokens == base.tokens
        assert r.stats["decode_calls"]["guide"] == 0  # the lazy guide was never even asked


def test_gamma_above_one_always_intervenes(blender):
    for method in ("nudging", "blendin"):
        r = blender.complete(PROMPT, max_tokens=48, method=method, gamma=1.01)
        assert r.stats["intervention_rate"] == 1.0
    guide = blender.complete(PROMPT, max_tokens=48, method="guide")
    assert blender.complete(PROMPT, max_tokens=48, method="nudging", gamma=1.01).tokens == guide.tokens


def test_nudging_and_blendin_alpha_one_agree(blender):
    n = blender.complete(PROMPT, max_tokens=64, method="nudging", gamma=GAMMA)
    b = blender.complete(PROMPT, max_tokens=64, method="blendin", gamma=GAMMA, alpha=1.0)
    assert 0 < n.stats["interventions"] < 64
    assert n.tokens == b.tokens
    assert [s.intervened for s in n.steps] == [s.intervened for s in b.steps]


def test_intervention_cap_and_warning(blender):
    free = blender.complete(PROMPT, max_tokens=64, method="blendin", gamma=0.9)
    assert free.stats["intervention_rate"] > 0.5 and "excessive-intervention" in free.stats["warning"]
    capped = blender.complete(PROMPT, max_tokens=64, method="blendin", gamma=0.9, max_intervention_rate=0.25)
    assert capped.stats["intervention_rate"] <= 0.25 + 1e-9
    assert capped.stats["capped"] > 0 and capped.stats["warning"] == ""


@pytest.mark.parametrize("method", ["ensemble", "proxy", "dera"])
def test_no_excessive_intervention_warning_where_every_token_consults_the_guide(blender, method):
    """Ensemble, proxy and DeRa use the guide at every token by design: an intervention rate of 1
    is their definition, not BlendIn's signal of an unreliable guide."""
    r = blender.complete(PROMPT, max_tokens=32, method=method, beta=0.8)
    assert r.stats["intervention_rate"] == 1.0 and r.stats["warning"] == ""


@pytest.mark.parametrize("cap", [0.1, 0.25])
def test_word_nudging_respects_the_intervention_cap(blender, cap):
    """Inside a nudged word the guide keeps writing; the cap still counts every token it writes."""
    free = blender.complete(PROMPT, max_tokens=64, method="nudging_word", gamma=0.9)
    assert free.stats["intervention_rate"] > cap
    r = blender.complete(PROMPT, max_tokens=64, method="nudging_word", gamma=0.9, max_intervention_rate=cap)
    steps = r.steps
    for i in range(len(steps)):  # at every point of the generation, not only at the end
        assert sum(s.intervened for s in steps[: i + 1]) <= cap * (i + 1) + 1e-9
    assert r.stats["capped"] > 0


# ---- sampling -----------------------------------------------------------------------------------
def test_sampling_is_reproducible(blender):
    kw = dict(max_tokens=40, temperature=0.9, top_p=0.95, method="blendin")
    a = blender.complete(PROMPT, seed=5, **kw)
    b = blender.complete(PROMPT, seed=5, **kw)
    c = blender.complete(PROMPT, seed=6, **kw)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


@pytest.mark.parametrize("temperature, top_k, speculative", [(1.0, 0, "off"), (0.7, 12, "off"), (1.0, 0, "on"),
                                                              (0.7, 12, "on")])
def test_sampled_frequencies_match_the_policy(blender, paths, temperature, top_k, speculative):
    """Frequencies of the first token over many seeds against the blended distribution at that
    step, computed in numpy: a chi-square statistic within 5 standard deviations of its mean."""
    base_prompt, guide_prompt = blender.prompts(PROMPT)
    pb = softmax(RefModel(paths["base"], base_prompt).logits())
    pg = softmax(RefModel(paths["guide"], guide_prompt).logits())
    a = np.clip(pg.max() / (pb.max() + pg.max()) + 0.1 * pb[np.argmax(pg)], 0, 1)
    p = ((1 - a) * pb + a * pg) ** (1 / temperature)
    if top_k:
        p[np.argsort(-p)[top_k:]] = 0
    p /= p.sum()
    n = 3000
    counts = np.zeros_like(p)
    for seed in range(n):
        # with speculative="on" the first token is the guide's draft, kept or resampled by the
        # acceptance rule: its frequencies must still be the policy's
        step = next(iter(blender.generate(PROMPT, max_tokens=2, method="blendin", gamma=1.01,
                                          temperature=temperature, top_k=top_k, seed=seed, speculative=speculative)))
        counts[step.token] += 1
    if top_k:
        assert np.count_nonzero(counts) <= top_k
    expected = n * p
    big = expected >= 5  # pool the rare tokens into one bin
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    chi2 = ((obs - exp) ** 2 / np.maximum(exp, 1e-9)).sum()
    df = len(obs) - 1
    assert chi2 < df + 5 * np.sqrt(2 * df), f"chi2 {chi2:.1f} with {df} degrees of freedom"


# ---- streaming ----------------------------------------------------------------------------------
def _valid_char_spans(b: bytes):
    """(start, end) of every well-formed multi-byte UTF-8 character in b."""
    spans, i = [], 0
    while i < len(b):
        c = b[i]
        n = 2 if c >> 5 == 6 else 3 if c >> 4 == 14 else 4 if c >> 3 == 30 else 1
        if n > 1:
            try:
                b[i:i + n].decode("utf-8")
                spans.append((i, i + n))
                i += n
                continue
            except UnicodeDecodeError:
                pass
        i += 1
    return spans


def test_stream_never_splits_a_utf8_character(blender, models):
    engine = blender._engine
    n_chars = 0
    for seed in range(40):
        base_prompt, guide_prompt = blender.prompts("日本語と émoji 🎉 " + PROMPT)
        params = blender.gen_params(settings=dict(method="blendin", gamma=0.5), temperature=1.0, seed=seed,
                                    max_tokens=100)
        engine.start(base_prompt, guide_prompt, params)
        chunks, tokens = [], []
        while (t := engine.step()) is not None:
            tokens.append(t.token)
            chunks.append(t.text_bytes)
        body = [t for t in tokens if not models["base"].is_eog(t)]
        assert b"".join(chunks) == models["base"].detokenize_bytes(body)
        # no boundary between two steps' texts falls inside a well-formed character
        cuts = np.cumsum([len(c) for c in chunks])[:-1]
        spans = _valid_char_spans(b"".join(chunks))
        assert not [c for c in cuts for s, e in spans if s < c < e]
        token_cuts = np.cumsum([len(models["base"].piece(t)) for t in tokens])
        n_chars += sum(1 for s, e in spans if any(s < c < e for c in token_cuts))
    # characters whose bytes came from two or more tokens, so that the stream had to hold them back
    assert n_chars >= 3, n_chars


def test_stop_strings_cut_the_text(blender):
    full = blender.complete(PROMPT, max_tokens=64, method="blendin")
    stop = full.text[20:23]
    cut = full.text.index(stop)
    r = blender.complete(PROMPT, max_tokens=64, method="blendin", stop=["never-appears", stop])
    assert r.text == full.text[:cut]
    assert r.finish_reason == "stop"
    streamed = "".join(s.text for s in r.steps)
    assert stop not in streamed and streamed == r.text


REPEATED = "The capital of France is Paris. The capital of France is"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_frequencies_with_context_drafts(blender, paths, temperature):
    """The n-gram drafter proposes what followed the prompt's last words where they occurred before
    (" Paris" after "The capital of France is"). The draft is deterministic (Q = 1 on it): accepted
    with probability P(d), otherwise replaced by a draw from P without d. The first token's
    frequencies must be the policy's."""
    base_prompt, guide_prompt = blender.prompts(REPEATED)
    pb = softmax(RefModel(paths["base"], base_prompt).logits())
    pg = softmax(RefModel(paths["guide"], guide_prompt).logits())
    a = np.clip(pg.max() / (pb.max() + pg.max()) + 0.1 * pb[np.argmax(pg)], 0, 1)
    p = ((1 - a) * pb + a * pg) if pb.max() < GAMMA else pb
    p = p ** (1 / temperature)
    p /= p.sum()
    n, counts, drafted = 3000, np.zeros_like(p), 0
    for seed in range(n):
        r = blender.complete(REPEATED, max_tokens=2, temperature=temperature, seed=seed, speculative="on",
                             drafter="ngram")
        counts[r.tokens[0]] += 1
        drafted += r.stats["drafted"] > 0
    assert drafted == n  # every run began with a drafted round
    keep = p * n >= 5
    expected = np.append(p[keep] * n, p[~keep].sum() * n)
    observed = np.append(counts[keep], counts[~keep].sum())
    chi2, dof = ((observed - expected) ** 2 / expected).sum(), len(expected) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)


def test_context_drafts_are_verified_exactly(blender):
    """Greedy: every n-gram drafted token the policy would not pick is rejected."""
    plain = blender.complete(REPEATED, max_tokens=48, method="blendin")
    spec = blender.complete(REPEATED, max_tokens=48, method="blendin", speculative="on", drafter="ngram")
    assert spec.tokens == plain.tokens
    assert spec.stats["drafted"] > 0


def test_automatic_speculation_follows_the_measured_costs(blender):
    """speculative="auto" drafts only where a batch of k + 1 rows, as measured on this device, costs
    enough less than k + 1 single decodes: when no draft length could pay even at 95% acceptance,
    it never drafts."""
    r = blender.complete(PROMPT, max_tokens=48, method="ensemble", speculative="auto")
    models = [blender.base, blender.guide]
    seconds = {k: [m._handle.decode_seconds(k) for m in models] for k in range(1, 10)}
    plain = seconds[1][0] + seconds[8][1] / 8
    could_pay = any((seconds[k + 1][0] + k * seconds[1][1]) / ((1 - 0.95 ** (k + 1)) / 0.05) / plain < 0.95
                    for k in range(1, 9))
    assert r.tokens == blender.complete(PROMPT, max_tokens=48, method="ensemble").tokens
    if not could_pay:
        assert r.stats["drafted"] == 0


def test_speculative_decodes_fewer_base_batches(blender):
    lazy = blender.complete(PROMPT, max_tokens=64, method="ensemble")
    spec = blender.complete(PROMPT, max_tokens=64, method="ensemble", speculative="on")
    assert spec.tokens == lazy.tokens
    st = spec.stats
    assert st["drafted"] > 0 and 0 < st["accepted"] <= st["drafted"]
    assert st["acceptance_rate"] == pytest.approx(st["accepted"] / st["drafted"])
    # every accepted draft saves the base one decode call
    assert st["decode_calls"]["base"] < lazy.stats["decode_calls"]["base"]


def test_prefix_reuse_between_generations(blender):
    blender.complete(PROMPT, max_tokens=4, method="blendin", gamma=1.01)
    r = blender.complete(PROMPT + " Paris", max_tokens=4, method="blendin", gamma=1.01)
    st = r.stats
    base_prompt, _ = blender.prompts(PROMPT)
    assert st["reused_tokens"]["base"] >= len(base_prompt) - 1
    assert st["decoded_tokens"]["base"] <= st["prompt_tokens"]["base"] - st["reused_tokens"]["base"] + 4


# ---- the GIL --------------------------------------------------------------------------------------
def test_gil_is_released_while_decoding(model_dir, shared_tokenizer):
    """The whole prefill is one C++ call made from a worker thread; meanwhile the main thread counts.
    A thread that held the GIL through a C call would let no other Python thread run at all, so
    the count would stay near zero; with the GIL released it runs freely."""
    path = random_llama(model_dir / "gil.gguf", n_embd=256, n_layer=4, seed=21, tokenizer=shared_tokenizer)
    m = bc.Model(path, n_ctx=2048, n_batch=2048)
    b = bc.Blender(m, None, method="base")
    base_tokens, _ = b.prompts("word " * 350)  # about 1400 tokens
    params = b.gen_params(max_tokens=1)
    inside, done = threading.Event(), threading.Event()

    def prefill():
        inside.set()
        try:
            b._engine.start(base_tokens, [], params)
        finally:
            done.set()

    # a tiny switch interval: with the GIL held, the main thread could only run in the instants
    # after the call returned (measured: at most ~2,000 iterations around a GIL-holding call)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        worker = threading.Thread(target=prefill, daemon=True)
        worker.start()
        inside.wait()
        count = 0
        while not done.is_set():
            count += 1
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert b._engine.stats().prompt_tokens["base"] == len(base_tokens)  # the call did the work
    assert count > 50_000, f"the main thread ran only {count} loop iterations during the prefill"



def test_gil_is_released_while_tokenizing(tiny_model):
    """Tokenizing reads only the vocabulary and can take long (llama.cpp's special-token parsing
    is quadratic in the markers it finds): the call releases the GIL, so other threads (a
    server's event loop) run meanwhile. Counted as in the decoding test above (measured: about
    20,000-40,000 iterations with the GIL held, millions without)."""
    m = bc.Model(tiny_model, n_ctx=64, n_threads=1)
    text = "<|end|>" * 30000
    many = [m.special_tokens["eot"]] * 300_000
    inside, done = threading.Event(), threading.Event()
    out = []

    def tokenize():  # the two calls straight into the core: no Python work between them
        inside.set()
        try:
            out.append(m._handle.tokenize(text, False, True))
            out.append(m._handle.detokenize(many, False, True))
        finally:
            done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        worker = threading.Thread(target=tokenize, daemon=True)
        worker.start()
        inside.wait()
        count = 0
        while not done.is_set():
            count += 1
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert out[0] == many[:30000] and out[1] == text.encode() * 10  # the calls did the work
    assert count > 500_000, f"the main thread ran only {count} loop iterations during the tokenization"

# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(method="telepathy"), ValueError, "unknown method 'telepathy'"),
    (dict(gamma=-0.1), ValueError, "gamma"),
    (dict(gamma="high"), TypeError, "gamma must be a number"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(stop=[""]), ValueError, "stop"),
    (dict(lambda_=float("inf")), ValueError, r"lambda must be a number in \[-100, 100\], got inf"),
    (dict(seed=-1), ValueError, "seed must be an integer >= 0 and below 2"),
    (dict(min_p=1.0), ValueError, r"min_p must be a number in \[0, 1\), got 1"),
    (dict(top_logprobs=101), ValueError, r"top_logprobs must be an integer in \[0, 100\]"),
    (dict(draft_max=0), ValueError, "draft_max"),
    (dict(speculative="sometimes"), ValueError, "speculative must be 'off', 'on' or 'auto', not 'sometimes'"),
    (dict(speculative=True), ValueError, "speculative must be 'off', 'on' or 'auto', not True"),
    (dict(drafter="oracle"), ValueError, "drafter must be 'guide' or 'ngram'"),
    (dict(top_k=2.5), TypeError, "top_k must be an integer"),
    # beyond the core's 32-bit integers: a ValueError naming the parameter and its range
    (dict(top_k=2 ** 31), ValueError, r"top_k must be an integer >= 0 and below 2\^31, got 2147483648"),
    (dict(max_tokens=2 ** 31), ValueError, r"max_tokens must be an integer >= 1 and below 2\^31"),
    (dict(max_tokens=-2 ** 40), ValueError, r"max_tokens must be an integer >= 1 and below 2\^31"),
    (dict(top_logprobs=2 ** 63), ValueError, r"top_logprobs must be an integer in \[0, 100\], got 9223372036854775808"),
    (dict(draft_max=2 ** 31), ValueError, r"draft_max must be an integer in \[1, 64\]"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_parameters(blender, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        blender.complete(PROMPT, **kwargs)


def test_empty_and_oversize_prompts(blender):
    with pytest.raises(ValueError, match="prompt is empty"):
        blender.complete("   ")
    with pytest.raises(ValueError, match="leaves no room in its context of 256 tokens"):
        blender.complete("word " * 400)
    # the blender still works afterwards
    assert blender.complete(PROMPT, max_tokens=3).stats["tokens"] == 3


def test_prompts_that_cannot_fit_are_refused_before_tokenizing(blender, monkeypatch):
    """A prompt with more bytes than the context's tokens could hold (n_ctx times the longest
    piece of the vocabulary) is refused before it is tokenized or rendered: tokenizing a long
    text costs time (quadratic in the markers it holds), and it could never fit."""
    longest = max(len(blender.base.piece(t, special=True)) for t in range(blender.base.n_vocab))
    calls = []
    for name in ("tokenize", "render_chat"):
        real = getattr(bc.Model, name)
        monkeypatch.setattr(bc.Model, name, lambda self, *a, _real=real, _name=name, **k: (
            calls.append(_name), _real(self, *a, **k))[1])
    text = "<|end|>" * (256 * longest // 7 + 1)
    with pytest.raises(bc.ContextLengthError, match=rf"the base's prompt has {len(text)} bytes, so at least "
                                                    rf"\d+ tokens .* more than its context of 256 tokens"):
        blender.prompts(text)
    with pytest.raises(bc.ContextLengthError, match="the base's prompt has"):
        blender.prompts([{"role": "user", "content": "What is 2 + 2?"}] * 1000)
    assert calls == []
    with pytest.raises(bc.ContextLengthError, match="guide_prompt has"):
        blender.prompts("Hi", guide_prompt="<|end|>" * 1000)
    assert calls == ["tokenize"]  # the base's prompt, only
    blender.base.check_fits("x" * (256 * longest), "text")  # the bound refuses only what cannot fit


def test_lone_surrogates_are_a_clear_error(blender):
    """Python strings can hold lone surrogates (from JSON's "\\ud800", say), which have no UTF-8
    form: a ValueError names the argument, not a bare TypeError from the bindings."""
    bad = "Hi \ud800 there"
    for call, name in ((lambda: blender.complete(bad, max_tokens=2), "the prompt"),
                       (lambda: blender.complete([{"role": "user", "content": bad}], max_tokens=2), "message 0 content"),
                       (lambda: blender.complete(PROMPT, guide_prompt=bad, max_tokens=2), "guide_prompt"),
                       (lambda: blender.complete(PROMPT, stop=[bad], max_tokens=2), "stop"),
                       (lambda: blender.base.tokenize(bad), "text")):
        with pytest.raises(ValueError, match=f"^{name} is not valid text: it holds a lone surrogate \\(U\\+D800\\) "
                                             "at index 3$"):
            call()

def test_context_full_ends_the_generation(blender):
    words = 1
    while len(blender.base.tokenize("word " * words)) < 240:
        words += 1
    r = blender.complete("word " * words, max_tokens=100, method="base")
    assert r.finish_reason == "context" and r.stats["tokens"] < 100


def test_mismatched_vocabularies(model_dir, models):
    """A guide with another tokenizer goes through the vocabulary bridge (tests/test_vocab_bridge.py);
    what needs token-by-token logit arithmetic refuses it, naming the first difference."""
    other = bc.Model(random_llama(model_dir / "other_vocab.gguf", n_embd=32, n_layer=1, n_head=2, seed=5,
                                  tokenizer=make_tokenizer(1024, seed=99)), n_ctx=64)
    b = bc.Blender(models["base"], other)
    assert b._engine.bridged
    for method in ("proxy", "dera"):
        with pytest.raises(ValueError, match=r"needs a guide that shares the base's vocabulary: token \d+ is"):
            b.complete(PROMPT, method=method, max_tokens=2) if method == "dera" else \
                bc.Blender(models["base"], other, anti=models["anti"]).complete(PROMPT, method=method, max_tokens=2)
    smaller = bc.Model(random_llama(model_dir / "small_vocab.gguf", n_embd=32, n_layer=1, n_head=2, seed=5,
                                    n_vocab=600), n_ctx=64)
    with pytest.raises(ValueError, match="the base and the anti do not share a vocabulary: token \\d+ is .* in the anti"):
        bc.Blender(models["base"], models["guide"], anti=smaller)


def test_another_vocabulary_is_refused_where_it_cannot_work(model_dir, models):
    """One rule, in the core, at construction and at every start: a guide with another vocabulary
    cannot be mixed in logit space (dera, proxy) nor draft or be verified token by token
    (speculative on or auto). The base alone with n-gram drafts needs no guide and still drafts."""
    other = bc.Model(random_llama(model_dir / "other_vocab.gguf", n_embd=32, n_layer=1, n_head=2, seed=5,
                                  tokenizer=make_tokenizer(1024, seed=99)), n_ctx=64)
    shares = r"needs a guide that shares the base's vocabulary: token \d+ is"
    with pytest.raises(ValueError, match="method 'dera' combines logits token by token and " + shares):
        bc.Blender(models["base"], other, method="dera")
    for spec in ("on", "auto"):
        with pytest.raises(ValueError, match="speculative verification .* " + shares):
            bc.Blender(models["base"], other, speculative=spec)
    b = bc.Blender(models["base"], other)
    for settings in (dict(method="dera"), dict(speculative="on"), dict(speculative="auto")):
        with pytest.raises(ValueError, match=shares):
            b.configure(**settings)
        with pytest.raises(ValueError, match=shares):
            b.complete(PROMPT, max_tokens=2, **settings)
    assert b.defaults["method"] == "blendin" and b.defaults["speculative"] == "off"  # nothing was kept
    alone = bc.Blender(models["base"], other, method="base", speculative="on", drafter="ngram")
    r = alone.complete("one two three one two three one two three one two", max_tokens=16)
    assert r.stats["drafted"] > 0
    assert r.tokens == bc.Blender(models["base"], None, method="base").complete(
        "one two three one two three one two three one two", max_tokens=16).tokens


def test_end_tokens_have_one_definition(model_dir, shared_tokenizer, models):
    """A generation ends at the base's end tokens and at a same-vocabulary guide's (the final
    distribution lives on the base vocabulary); Blender.is_end answers with the core's set."""
    import dataclasses
    user = shared_tokenizer.special["<|user|>"]
    own_end = bc.Model(random_llama(model_dir / "own_end.gguf", n_embd=32, n_layer=1, n_head=2, seed=6,
                                    tokenizer=dataclasses.replace(shared_tokenizer, eot=user)), n_ctx=64)
    base = models["base"]
    assert own_end.is_eog(user) and not base.is_eog(user)
    pair = bc.Blender(base, own_end)
    assert not pair._engine.bridged and pair.is_end(user)
    assert all(pair.is_end(t) == (base.is_eog(t) or own_end.is_eog(t)) for t in range(base.n_vocab))
    assert not bc.Blender(base, None, method="base").is_end(user)
    other = bc.Model(random_llama(model_dir / "other_vocab.gguf", n_embd=32, n_layer=1, n_head=2, seed=5,
                                  tokenizer=make_tokenizer(1024, seed=99)), n_ctx=64)
    assert all(bc.Blender(base, other).is_end(t) == base.is_eog(t) for t in range(base.n_vocab))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pair.is_end(base.n_vocab)


def test_proxy_needs_the_third_model(models):
    with pytest.raises(ValueError, match="needs anti="):
        bc.Blender(models["base"], models["guide"], method="proxy")
    b = bc.Blender(models["base"], models["guide"])
    with pytest.raises(ValueError, match="needs anti="):
        b.complete(PROMPT, method="proxy")


# ---- the command line -----------------------------------------------------------------------------
def test_generate_json_cli(paths):
    cmd = [sys.executable, "-m", "blendin_cpp", "generate", "--base", paths["base"], "--guide", paths["guide"],
           "--prompt", PROMPT, "--method", "blendin", "--max-tokens", "20", "--ctx", "256", "--json", "--trace"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "tokens", "stats", "steps"}
    assert len(out["tokens"]) == out["stats"]["tokens"] == len(out["steps"]) == 20
    assert {s["source"] for s in out["steps"]} <= {"base", "blend", "guide"}
    b = bc.Blender(bc.Model(paths["base"], n_ctx=256), bc.Model(paths["guide"], n_ctx=256))
    assert out["tokens"] == b.complete([{"role": "user", "content": PROMPT}], max_tokens=20).tokens
    raw = subprocess.run(cmd + ["--raw"], capture_output=True, text=True, timeout=120)
    assert json.loads(raw.stdout)["tokens"] == b.complete(PROMPT, max_tokens=20).tokens


def test_cli_bad_input_is_one_clear_line(paths):
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "generate", "--base", "missing.gguf", "--guide",
                        paths["guide"], "--prompt", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "model file not found: 'missing.gguf'" in r.stderr and "Traceback" not in r.stderr


def test_cli_core_errors_are_one_clear_line(paths):
    """A BlendError from the core (a full KV cache, a model busy in another thread, ...) is a
    clear line and exit status 2 on the command line, as every other error, not a traceback. The
    error is raised where the core would raise it: from the generation the command pulls."""
    child = textwrap.dedent(r'''
        import sys
        import blendin_cpp as bc
        from blendin_cpp.cli import main

        def failing(self, *args, **kwargs):
            raise bc.BlendError("the KV cache of 'x.gguf' is full: its 256 cells are shared by all sequences")
            yield
        bc.Blender._steps = failing
        sys.exit(main(sys.argv[1:]))
    ''')
    r = subprocess.run([sys.executable, "-c", child, "generate", "--base", paths["base"], "--guide", paths["guide"],
                        "--prompt", PROMPT, "--max-tokens", "4", "--ctx", "256", "--threads", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: the KV cache of 'x.gguf' is full: its 256 cells are "
                                                 "shared by all sequences")
    assert "Traceback" not in r.stderr
