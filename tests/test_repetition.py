"""The repetition controls (presence/frequency penalties, repeat_penalty, DRY) and the loop-aware
gate against an independent numpy reference built from llama-cpp-python's logits for the same GGUF
files; their plumbing through the CLI, the chat, the server and eval."""
from collections import Counter

import numpy as np
import pytest

import blendin_cpp as bc
from blendin_cpp.blender import REPETITION
from blendin_cpp.evaluate import looped

from test_engine import GAMMA, N_CTX, PROMPT, RefModel, reference_policy, softmax

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def paths(model_trio):
    return model_trio("rep", 21)


@pytest.fixture(scope="module")
def blender(paths):
    models = {k: bc.Model(p, n_ctx=N_CTX, kv_type="f32", n_threads=1) for k, p in paths.items()}
    return bc.Blender(models["base"], models["guide"], anti=models["anti"])


# ---- the numpy reference ------------------------------------------------------------------------
def dry_lengths(answer, breaker):
    """{token: the longest repeated sequence it would extend}, by brute force: for every earlier
    position i, the longest k with answer[i-k+1 : i+1] == answer[-k:] and no breaker among them."""
    n = len(answer)
    out = {}
    if n < 2 or breaker[answer[-1]]:
        return out
    for i in range(n - 1):
        nxt = answer[i + 1]
        if breaker[nxt]:
            continue
        k = 0
        while k <= i and answer[i - k] == answer[n - 1 - k] and not breaker[answer[i - k]]:
            k += 1
        if k:
            out[nxt] = max(out.get(nxt, 0), k)
    return out


def penalize(logits, answer, breaker, presence_penalty=0.0, frequency_penalty=0.0, repeat_penalty=1.0,
             repeat_last_n=64, dry_multiplier=0.0, dry_base=1.75, dry_allowed_length=2, **_):
    """The repetition controls' formulas (penalties.h), written out on a whole logit vector."""
    x = logits.copy()
    window = answer if repeat_last_n < 0 else answer[max(0, len(answer) - repeat_last_n):] if repeat_last_n else []
    for t in set(window):
        x[t] = x[t] / repeat_penalty if x[t] > 0 else x[t] * repeat_penalty
    for t, c in Counter(answer).items():
        x[t] -= frequency_penalty * c + presence_penalty
    if dry_multiplier > 0:
        for t, k in dry_lengths(answer, breaker).items():
            if k >= dry_allowed_length:
                x[t] -= min(1e4, dry_multiplier * dry_base ** (k - dry_allowed_length))
    return x


def would_loop(answer, token, n):
    """`token` completes an n-gram that the answer already holds."""
    if n <= 0 or len(answer) < n:
        return False
    gram = tuple(answer[len(answer) - n + 1:]) + (token,)
    return any(tuple(answer[k:k + n]) == gram for k in range(len(answer) - n + 1))


def replay(paths, blender, method, steps, guide_ends=False, ignore_eos=True, **rep):
    """Our greedy run, step by step on our own prefix, through the reference: penalised base and
    guide logits, then docs/design.md section 3, with the loop gate (a confident base whose top
    token would repeat an n-gram consults the guide, which blendin then trusts, alpha 1) and
    guide_ends (the guide is asked at sentence and line ends too; a consulted guide whose top token is an end
    token ends the answer; otherwise an end check keeps the base's distribution).
    Returns the number of steps whose choice was exactly the reference's argmax."""
    base_prompt, guide_prompt = blender.prompts(PROMPT)
    base, guide = RefModel(paths["base"], base_prompt), RefModel(paths["guide"], guide_prompt)
    n_vocab = base.ll.n_vocab()
    breakers = rep.get("dry_sequence_breakers", REPETITION["dry_sequence_breakers"])
    pieces = [base.ll.detokenize([t], special=False).decode("utf-8", "replace") for t in range(n_vocab)]
    breaker = [any(b in p for b in breakers) for p in pieces]
    eog = [int(base.ll.metadata[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    guide_ends = guide_ends and not ignore_eos  # nothing may end the answer then
    gated = method in ("nudging", "blendin")
    answer, text, exact = [], b"", 0
    for i, step in enumerate(steps):
        lb = penalize(base.logits(), answer, breaker, **rep)
        lg = penalize(guide.logits(), answer, breaker, **rep)
        pb, pg = softmax(lb), softmax(lg)
        sure = pb.max() >= GAMMA
        loop = sure and gated and would_loop(answer, int(np.argmax(pb)), rep.get("loop_gate", 0))
        end_check = sure and not loop and gated and guide_ends and text.rstrip(b" ")[-1:] in (b".", b"!", b"?", b"\n")
        ends = gated and (not sure or loop or end_check) and guide_ends and int(np.argmax(pg)) in eog
        if ends:
            p, source = pg, "guide"
        elif loop:  # the guide writes: nudging's rule, and blendin with alpha 1
            p, source = pg, "guide" if method == "nudging" else "blend"
        else:
            p, source = reference_policy(method, lb, pg, lg=lg)
        if ignore_eos:
            p = p.copy()
            p[eog] = 0
            p /= p.sum()
        assert step.looped == loop, f"step {i}: looped {step.looped}, reference {loop}"
        if step.source != source:
            assert abs(pb.max() - GAMMA) < 1e-4, f"{method} step {i}: source {step.source}, reference {source}"
        else:
            best = int(np.argmax(p))
            assert p[best] - p[step.token] < 1e-4, \
                f"{method} step {i}: token {step.token} (p={p[step.token]:.6f}), reference {best} (p={p[best]:.6f})"
            if source == "base":  # (the small random guide's own logits differ from llama-cpp-python's
                # by up to 0.01 here without any penalty, measured: its steps are checked by their argmax)
                assert step.logprob == pytest.approx(np.log(p[step.token]), abs=2e-3)
            exact += best == step.token
        if step.token in eog:
            break
        answer.append(step.token)
        text += base.ll.detokenize([step.token], special=False)
        base.push(step.token)
        guide.push(step.token)
    return exact


CASES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.7),
    "repeat": dict(repeat_penalty=1.8, repeat_last_n=16),
    "repeat_all": dict(repeat_penalty=0.7, repeat_last_n=-1),
    "dry": dict(dry_multiplier=0.8, dry_allowed_length=1),
    "dry_breakers": dict(dry_multiplier=2.0, dry_base=1.2, dry_allowed_length=1, dry_sequence_breakers=["e", " "]),
    "together": dict(presence_penalty=0.3, frequency_penalty=0.2, repeat_penalty=1.3, dry_multiplier=0.5),
    "loop_gate": dict(loop_gate=2),
    "loop_gate_dry": dict(loop_gate=3, dry_multiplier=0.5, dry_allowed_length=1),
    "guide_ends": dict(guide_ends=True, ignore_eos=False),
    "guide_ends_loop_gate": dict(guide_ends=True, ignore_eos=False, loop_gate=2, dry_multiplier=0.5),
}


@pytest.mark.parametrize("method", ["base", "guide", "nudging", "blendin", "ensemble", "dera"])
@pytest.mark.parametrize("case", CASES)
def test_greedy_with_repetition_controls_equals_numpy_reference(method, case, blender, paths):
    rep = {"ignore_eos": True, **CASES[case]}
    ours = blender.complete(PROMPT, max_tokens=48, method=method, gamma=GAMMA, **rep)
    plain = blender.complete(PROMPT, max_tokens=48, method=method, gamma=GAMMA, ignore_eos=True)
    exact = replay(paths, blender, method, ours.steps, **rep)
    assert exact >= len(ours.steps) - 2, f"{method}/{case}: only {exact} of {len(ours.steps)} choices were exact"
    if method == "base" and not case.startswith(("loop_gate", "guide_ends")):
        # the random base repeats itself a lot: every control changes its greedy text
        assert ours.tokens != plain.tokens, f"{case} changed nothing"


def test_the_loop_gate_consults_the_guide_where_the_base_repeats(blender):
    plain = blender.complete(PROMPT, max_tokens=64, method="blendin", ignore_eos=True)
    gated = blender.complete(PROMPT, max_tokens=64, method="blendin", ignore_eos=True, loop_gate=2)
    bigrams = list(zip(plain.tokens, plain.tokens[1:]))
    assert len(set(bigrams)) < len(bigrams)  # the plain answer repeats itself: the gate has work
    flagged = [s for s in gated.steps if s.looped]
    assert flagged and all(s.intervened and s.alpha == 1.0 for s in flagged)
    assert gated.stats["interventions"] > plain.stats["interventions"]
    assert not any(s.looped for s in plain.steps)
    # off for a method without the gate: the base alone never consults anything
    base = blender.complete(PROMPT, max_tokens=64, method="base", ignore_eos=True, loop_gate=2)
    assert not any(s.looped or s.intervened for s in base.steps)


@pytest.mark.parametrize("mode", [dict(lazy=False), dict(speculative="on"), dict(speculative="on", drafter="ngram")])
def test_every_loop_gives_the_same_tokens_with_penalties(blender, mode):
    rep = dict(frequency_penalty=0.5, dry_multiplier=0.8, loop_gate=3)
    ref = blender.complete(PROMPT, max_tokens=48, method="blendin", ignore_eos=True, **rep)
    other = blender.complete(PROMPT, max_tokens=48, method="blendin", ignore_eos=True, **rep, **mode)
    assert other.tokens == ref.tokens


def test_batched_equals_alone_with_penalties(paths):
    models = [bc.Model(p, n_ctx=4 * N_CTX, n_seq_max=4, kv_type="f32", n_threads=1)
              for p in (paths["base"], paths["guide"])]
    b = bc.Blender(*models)
    rep = dict(presence_penalty=0.4, repeat_penalty=1.2, dry_multiplier=0.8, loop_gate=3)
    prompts = [PROMPT, "Hello there", "A small model", "The weather today"]
    alone = [b.complete(p, max_tokens=32, ignore_eos=True, **rep) for p in prompts]
    together = b.complete_many(prompts, parallel=4, max_tokens=32, ignore_eos=True, **rep)
    for a, t in zip(alone, together):
        assert a.tokens == t.tokens


def test_sampling_with_penalties_is_reproducible(blender):
    kw = dict(max_tokens=32, temperature=0.9, seed=7, dry_multiplier=0.8, presence_penalty=0.5)
    assert blender.complete(PROMPT, **kw).tokens == blender.complete(PROMPT, **kw).tokens


@pytest.mark.parametrize("kwargs, words", [
    (dict(presence_penalty=2.5), "presence_penalty must be a number in [-2, 2]"),
    (dict(frequency_penalty=-3), "frequency_penalty must be a number in [-2, 2]"),
    (dict(repeat_penalty=0), "repeat_penalty must be a number in (0, 10]"),
    (dict(repeat_last_n=-2), "repeat_last_n must be an integer >= -1"),
    (dict(dry_multiplier=float("nan")), "dry_multiplier must be a number in [0, 100]"),
    (dict(dry_base=0.5), "dry_base must be a number in [1, 100]"),
    (dict(dry_allowed_length=-1), "dry_allowed_length must be an integer >= 0"),
    (dict(dry_sequence_breakers=[""]), "dry_sequence_breakers must not hold an empty string"),
    (dict(loop_gate=65), "loop_gate must be an integer in [0, 64]"),
])
def test_bad_repetition_parameters_name_themselves(blender, kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        blender.complete(PROMPT, max_tokens=2, **kwargs)


def test_loop_detector():
    assert looped("a\nb\na\nc\na")
    assert not looped("a\nb\na\nc")
    run = "one two three four five six seven eight "
    assert looped(run * 3)
    assert not looped(run * 2 + "nine ten")
    assert not looped("1. Eat well.\n2. Sleep well.\n3. Move well.")


def test_guide_ends_asks_the_guide_at_sentence_ends():
    """guide_ends by teacher forcing on the demo pair (its guide ends an answer after one
    sentence): where the text ends a sentence or a line and the base is sure, the guide is asked; its end token
    as top choice makes the step the guide's (p_guide), otherwise the base's token stands
    (p_base, no intervention); elsewhere the policy is the plain one."""
    from blendin_cpp import demo
    paths = {r: demo.demo_path(r) for r in ("base", "guide")}
    models = {r: bc.Model(p, n_ctx=N_CTX, kv_type="f32", n_threads=1) for r, p in paths.items()}
    b = bc.Blender(models["base"], models["guide"])
    q = [{"role": "user", "content": "What is the capital of Gafashe?"}]
    cont = models["base"].tokenize(" Sure! Its capital is Mudozi.\nIts flag is red.\nSure", add_special=False)
    ours = b.score(q, cont, method="blendin", guide_ends=True)
    plain = b.score(q, cont, method="blendin")
    base_prompt, guide_prompt = b.prompts(q)
    base, guide = RefModel(paths["base"], base_prompt), RefModel(paths["guide"], guide_prompt)
    eog = {int(base.ll.metadata[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")}
    text, checks, ends = b"", 0, 0
    for t, step, ref in zip(cont, ours.steps, plain.steps):
        pb, pg = softmax(base.logits()), softmax(guide.logits())
        guide_top_ends = int(np.argmax(pg)) in eog
        if pb.max() >= GAMMA and text.rstrip(b" ")[-1:] in (b".", b"!", b"?", b"\n"):
            checks += 1
            ends += guide_top_ends
            source, p = ("guide", pg) if guide_top_ends else ("base", pb)
            assert step.source == source and step.intervened == guide_top_ends
            assert step.logprob == pytest.approx(np.log(p[t]), abs=2e-3)
        elif pb.max() < GAMMA and guide_top_ends:
            assert step.source == "guide" and step.logprob == pytest.approx(np.log(pg[t]), abs=2e-3)
        else:
            assert step.source == ref.source and step.logprob == pytest.approx(ref.logprob, abs=1e-5)
        text += base.ll.detokenize([t], special=False)
        base.push(t)
        guide.push(t)
    assert checks >= 3 and ends >= 1, (checks, ends)


# ---- the server, the CLI, eval ------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The generated pair: random weights repeat themselves, so every control changes the text."""
    import test_server
    yield from test_server.serve(test_server.load_server.generated_model_args(model_dir), tmp_path_factory)


def test_the_openai_client_sends_penalties(server):
    openai = pytest.importorskip("openai")
    import test_server
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=test_server.KEY, max_retries=0, timeout=60)

    def ask(**kw):
        r = client.chat.completions.create(model="x", messages=test_server.CHAT, max_tokens=32, **kw)
        return r.choices[0].message.content
    plain = ask()
    penalised = ask(presence_penalty=0.5, frequency_penalty=0.5)
    assert penalised != plain
    assert ask(presence_penalty=0.5, frequency_penalty=0.5) == penalised  # reproducible
    extra = dict(repeat_penalty=1.3, repeat_last_n=-1, dry_multiplier=0.8, dry_base=1.5, dry_allowed_length=1,
                 dry_sequence_breakers=["\n"], loop_gate=3, guide_ends=True)
    assert ask(extra_body=extra) != plain
    with pytest.raises(openai.BadRequestError) as e:
        ask(presence_penalty=2.5)
    assert e.value.body["param"] == "presence_penalty" and "2" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        ask(extra_body={"dry_sequence_breakers": [""]})
    assert "dry_sequence_breakers" in str(e.value.body)


def test_cli_flags_and_chat_defaults():
    from blendin_cpp.cli import build_parser
    parser = build_parser()
    chat = parser.parse_args(["chat"])
    assert chat.dry_multiplier == 0.8 and chat.loop_gate == 4 and chat.guide_ends is True
    assert chat.frequency_penalty == 0.3
    gen = parser.parse_args(["generate", "--prompt", "x", "--repeat-penalty", "1.1", "--dry-sequence-breaker", "\n",
                             "--dry-sequence-breaker", ":"])
    assert gen.repeat_penalty == 1.1 and gen.dry_sequence_breakers == ["\n", ":"] and gen.guide_ends is False
    assert parser.parse_args(["chat", "--no-guide-ends", "--loop-gate", "0"]).guide_ends is False
    ev = parser.parse_args(["eval", "--frequency-penalty", "0.5"])
    assert ev.frequency_penalty == 0.5 and ev.dry_multiplier is None


def test_eval_quality_table(tmp_path):
    import json
    import subprocess
    import sys
    from blendin_cpp import demo
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"request": r}) + "\n" for r in
                                ["What is the capital of Gafashe?", "What colour is the flag of Mudozi?", "Hi"]))
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "eval", "--base", demo.demo_path("base"), "--guide",
                        demo.demo_path("guide"), "--questions", demo.heldout_path(), "--limit", "3", "--methods",
                        "base,blendin", "--requests", str(requests), "--quality-max-tokens", "24", "--chat-defaults",
                        "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "quality" in r.stdout and "looped" in r.stdout
    res = json.loads(out.read_text())
    assert res["sampling"]["dry_multiplier"] == 0.8 and res["sampling"]["guide_ends"] is True
    (rows,) = res["quality"].values()
    for method in ("base", "blendin"):
        row = rows[method]
        assert row["n"] == 3 and len(row["responses"]) == 3
        assert row["ended"] == sum(x["finish_reason"] == "stop" for x in row["responses"]) / 3
        assert row["looped"] == sum(looped(x["got"]) for x in row["responses"]) / 3
        assert row["mean_tokens"] == sum(x["tokens"] for x in row["responses"]) / 3 <= 24
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "eval", "--base", demo.demo_path("base"), "--guide",
                        demo.demo_path("guide"), "--questions", demo.heldout_path(), "--requests", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "needs 'request'" in r.stderr
