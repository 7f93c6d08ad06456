"""`Blender.score`: the policy's log-likelihood of a continuation (teacher forcing) against a numpy
reference built from the logits llama-cpp-python computes, for every method, on the demo pair
(shared vocabulary) and on the demo guide with its own tokenizer (the vocabulary bridge)."""
import json

import numpy as np
import pytest

import blendin_cpp as bc
from blendin_cpp import demo, llama_cpp_peer
from test_engine import reference_policy, softmax

llama_cpp = pytest.importorskip("llama_cpp")

N_CTX = 512
GAMMA = 0.4
QUESTIONS = [json.loads(line) for line in open(demo.demo_dir() / "dev.jsonl", encoding="utf-8")][:3]


@pytest.fixture(scope="module")
def models():
    kw = dict(n_ctx=N_CTX, kv_type="f32", n_threads=1)
    return {role: bc.Model(demo.demo_path(role), **kw) for role in ("base", "guide", "anti", "guide-xvocab")}


@pytest.fixture(scope="module")
def blender(models):
    return bc.Blender(models["base"], models["guide"], anti=models["anti"])


@pytest.fixture(scope="module")
def bridged(models):
    b = bc.Blender(models["base"], models["guide-xvocab"])
    assert b._engine.bridged
    return b


# ---- the reference ---------------------------------------------------------------------------------
class Peer:
    """One demo model in llama-cpp-python (f32 KV cache, as ours)."""

    def __init__(self, role):
        self.ll = llama_cpp_peer.load(demo.demo_path(role), n_ctx=N_CTX, logits_all=True, verbose=False, type_k=0,
                                      type_v=0, n_threads=1, flash_attn=True)

    def rows(self, prompt, cont):
        """The logits after prompt + cont[:i] for every i, read in one pass."""
        self.ll.reset()
        self.ll.eval(list(prompt) + list(cont[:-1]))
        return np.array(self.ll.scores[len(prompt) - 1: len(prompt) - 1 + len(cont)], dtype=np.float64)

    def last(self, tokens):
        self.ll.reset()
        self.ll.eval(list(tokens))
        return np.array(self.ll.scores[len(tokens) - 1], dtype=np.float64)


@pytest.fixture(scope="module")
def peers():
    return {role: Peer(role) for role in ("base", "guide", "anti", "guide-xvocab")}


def starts_word(ll, token):
    piece = ll.detokenize([token], special=False)
    return len(piece) == 0 or piece[:1].isspace()


def ends_mid_char(b: bytes) -> bool:
    for back in range(1, min(4, len(b)) + 1):
        c = b[-back]
        if c & 0xC0 == 0x80:
            continue
        need = 2 if c >> 5 == 6 else 3 if c >> 4 == 14 else 4 if c >> 3 == 30 else 1
        return back < need
    return False


def reference(peers, method, base_prompt, guide_prompt, cont, *, guide="guide", bridge_map=None, cap=1.0, **kw):
    """Per token: log p(token) and the source, replaying the decoder's rules on the given tokens:
    inside a nudged word the guide goes on while the token does not start a new word; the cap
    allows an intervention while interventions + 1 <= cap * (tokens + 1). A cross-vocabulary guide
    (`bridge_map`: guide token -> base token) re-reads the text so far through its own tokenizer
    and is not asked while the text ends inside a UTF-8 character."""
    base_ll = peers["base"].ll
    lb_rows = peers["base"].rows(base_prompt, cont) if method != "guide" else [None] * len(cont)
    la_rows = peers["anti"].rows(guide_prompt, cont) if method == "proxy" else [None] * len(cont)
    lg_rows = peers[guide].rows(guide_prompt, cont) if bridge_map is None and method != "base" else None
    text, in_word, interventions = b"", False, 0
    out, sources = [], []
    for i, y in enumerate(cont):
        blocked = bridge_map is not None and ends_mid_char(text)
        if method == "base":
            pg = lg = None
        elif bridge_map is None:
            lg = lg_rows[i]
            pg = softmax(lg)
        elif blocked:
            pg = lg = None
        else:
            g = peers[guide].ll
            own = softmax(peers[guide].last(list(guide_prompt) + g.tokenize(text, add_bos=False, special=False)))
            pg = np.zeros(base_ll.n_vocab())
            np.add.at(pg, bridge_map[bridge_map >= 0], own[bridge_map >= 0])
            pg /= pg.sum()
            lg = None
        within_cap = interventions + 1 <= cap * (i + 1)
        if in_word and not blocked and within_cap and not starts_word(base_ll, y):
            p, source = pg, "guide"
        else:
            p, source = reference_policy(method, lb_rows[i], pg, la_rows[i], lg=lg,
                                         consult=within_cap and not blocked, **kw)
        in_word = method == "nudging_word" and source == "guide"
        interventions += source != "base" and method != "guide"
        out.append(float(np.log(p[y])))
        sources.append(source)
        text += base_ll.detokenize([y], special=False)
    return np.array(out), sources


def prompts_and_continuations(blender):
    """Each question with the expected answer and the base's own answer (with its end token)."""
    cases = []
    for q in QUESTIONS:
        right = blender.base.tokenize(" " + q["answer"], add_special=False) + [blender.base.special_tokens["eos"]]
        own = blender.complete(q["question"], max_tokens=24, method="base")
        cases.append((q["question"], right))
        cases.append((q["question"], [s.token for s in own.steps]))
    return cases


def assert_matches(ours, want, want_sources, *, tol):
    assert len(ours.logprobs) == len(want)
    np.testing.assert_allclose(ours.logprobs, want, atol=tol, rtol=0)
    for s, src in zip(ours.steps, want_sources):
        if s.source != src:  # only where the base's top probability sits on gamma
            assert s.pb_max is not None and abs(s.pb_max - GAMMA) < 1e-4, (ours.sources, want_sources)


SHARED = [("base", {}), ("guide", {}), ("nudging", {}), ("nudging_word", {}), ("blendin", {"alpha": "auto"}),
          ("blendin", {"alpha": 0.3}), ("ensemble", {}), ("proxy", {"beta": 0.8}), ("dera", {"lam": 0.5}),
          ("dera", {"lam": 1.5})]


@pytest.mark.parametrize("method, kw", SHARED, ids=[f"{m}-{'-'.join(map(str, k.values())) or 'default'}"
                                                    for m, k in SHARED])
def test_shared_vocabulary_equals_numpy_reference(blender, peers, method, kw):
    settings = {("lambda_" if k == "lam" else k): v for k, v in kw.items()}
    seen = set()
    for question, cont in prompts_and_continuations(blender):
        base_prompt, guide_prompt = blender.prompts(question)
        ours = blender.score(question, cont, method=method, gamma=GAMMA, **settings)
        want, sources = reference(peers, method, base_prompt, guide_prompt, cont, gamma=GAMMA, **kw)
        assert ours.tokens == cont
        assert_matches(ours, want, sources, tol=2e-3)
        seen |= set(ours.sources)
    expected = {"base": {"base"}, "guide": {"guide"}, "ensemble": {"blend"}, "proxy": {"blend"}, "dera": {"blend"},
                "nudging": {"base", "guide"}, "nudging_word": {"base", "guide"}, "blendin": {"base", "blend"}}
    assert seen == expected[method]  # the gated methods took both branches: the gate itself is tested


BRIDGED = [("base", {}), ("guide", {}), ("nudging", {}), ("nudging_word", {}), ("blendin", {"alpha": "auto"}),
           ("blendin", {"alpha": 0.3}), ("ensemble", {})]


@pytest.mark.parametrize("method, kw", BRIDGED, ids=[f"{m}-{'-'.join(map(str, k.values())) or 'default'}"
                                                     for m, k in BRIDGED])
def test_bridged_guide_equals_numpy_reference(bridged, peers, method, kw):
    """The guide with its own tokenizer re-reads the text; its probabilities go to the base vocabulary
    by the bridge's map (tested on its own in tests/test_vocab_bridge.py)."""
    bridge_map = np.array(bc._core.VocabBridge(bridged.base._handle, bridged.guide._handle).map())
    seen = set()
    for question, cont in prompts_and_continuations(bridged):
        base_prompt, guide_prompt = bridged.prompts(question)
        ours = bridged.score(question, cont, method=method, gamma=GAMMA, **kw)
        want, sources = reference(peers, method, base_prompt, guide_prompt, cont, guide="guide-xvocab",
                                            bridge_map=bridge_map, gamma=GAMMA, **kw)
        # the reference re-reads the guide's whole sequence at every step, ours extends its cache
        assert_matches(ours, want, sources, tol=3e-3)
        seen |= set(ours.sources)
    if method in ("nudging", "nudging_word", "blendin"):
        assert "base" in seen and seen & {"guide", "blend"}, seen


def test_intervention_cap_counts_the_scored_tokens(blender, peers):
    question, cont = prompts_and_continuations(blender)[0]
    base_prompt, guide_prompt = blender.prompts(question)
    free = blender.score(question, cont, method="blendin", gamma=0.9)
    capped = blender.score(question, cont, method="blendin", gamma=0.9, max_intervention_rate=0.25)
    assert capped.stats["capped"] > 0 and capped.sources != free.sources
    want, sources = reference(peers, "blendin", base_prompt, guide_prompt, cont, gamma=0.9, cap=0.25)
    np.testing.assert_allclose(capped.logprobs, want, atol=2e-3, rtol=0)
    assert capped.sources == sources


# ---- one policy: scoring what was generated gives what the decoding reported ------------------------------
@pytest.mark.parametrize("method", bc.METHODS)
def test_scoring_a_generation_gives_its_logprobs(blender, method):
    for q in QUESTIONS:
        r = blender.complete(q["question"], max_tokens=24, method=method, top_logprobs=3)
        s = blender.score(q["question"], r.tokens + [st.token for st in r.steps[len(r.tokens):]], method=method,
                          top_logprobs=3)
        assert s.tokens == [st.token for st in r.steps]
        assert s.sources == [st.source for st in r.steps]
        np.testing.assert_allclose(s.logprobs, [st.logprob for st in r.steps], atol=2e-3, rtol=0)
        assert [[t for t, _ in st.top_logprobs] for st in s.steps][:-1] == \
               [[t for t, _ in st.top_logprobs] for st in r.steps][:-1]
        assert s.stats["decode_calls"]["base"] <= 1 and s.stats["tokens"] == len(s.tokens)


def test_bridged_scoring_of_a_generation(bridged):
    for method in ("nudging", "nudging_word", "blendin", "ensemble"):
        r = bridged.complete(QUESTIONS[2]["question"], max_tokens=24, method=method, gamma=0.6)
        s = bridged.score(QUESTIONS[2]["question"], [st.token for st in r.steps], method=method, gamma=0.6)
        assert s.sources == [st.source for st in r.steps]
        np.testing.assert_allclose(s.logprobs, [st.logprob for st in r.steps], atol=2e-3, rtol=0)


# ---- the plain-text view (the server's echo) ------------------------------------------------------
def test_plain_text_view_reads_the_same_tokens(blender, bridged, peers):
    text = "Question: What is the capital of Gafashe?\nAnswer: Sure! Its capital is Mudozi."
    ids = blender.base.tokenize(text)
    plain = blender.prompts(ids[:1], template=False)
    assert plain == (ids[:1], ids[:1])
    s = blender.score(ids[:1], ids[1:], template=False, method="ensemble")
    want, _ = reference(peers, "ensemble", ids[:1], ids[:1], ids[1:])
    np.testing.assert_allclose(s.logprobs, want, atol=2e-3, rtol=0)
    # a guide with its own tokenizer reads the text through it, after its start token
    x = bridged.prompts(ids[:1], template=False)
    assert x.base == ids[:1] and x.guide == [bridged.guide.special_tokens["bos"]]
    assert bridged.prompts(text, template=False).guide == bridged.guide.tokenize(text)
    # a token-id prompt is read as given by the base, and as its text by the guide's chat template
    assert blender.prompts(ids).base == ids
    assert blender.prompts(ids).guide == blender.prompts(blender.base.detokenize(ids)).guide


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cont, exc, words", [
    ("", ValueError, "continuation is empty"),
    ([], TypeError, "continuation must be"),
    ([1, 99999], ValueError, "outside the base's vocabulary"),
    ([1, True], TypeError, "continuation must be"),
    (3, TypeError, "continuation must be"),
    ([5] * N_CTX, ValueError, "do not fit its context"),
])
def test_bad_continuations(blender, cont, exc, words):
    with pytest.raises(exc, match=words):
        blender.score("What is 38 + 41?", cont)


def test_bad_settings_and_methods(blender, bridged):
    with pytest.raises(ValueError, match="gamma"):
        blender.score("What is 38 + 41?", " 79", gamma=-1)
    with pytest.raises(ValueError, match="shares the base's vocabulary"):
        bridged.score("What is 38 + 41?", " 79", method="dera")
    with pytest.raises(ValueError, match="outside the base's vocabulary"):
        blender.score([10 ** 6], " 79")
    with pytest.raises(ValueError, match="prompt is empty"):
        blender.score("  ", " 79")


def test_scoring_ends_a_generation_in_progress(blender):
    steps = blender.generate("What is 38 + 41?", max_tokens=8)
    next(steps)
    blender.score("What is 38 + 41?", " 79")
    with pytest.raises(RuntimeError, match="superseded"):
        next(steps)
    assert blender.complete("What is 38 + 41?", max_tokens=8).text  # the next generation starts cleanly
