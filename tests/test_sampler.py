"""The sampler on its own (cpp/sampler.*): the temperature transform, and the draw from the leftover
distribution that speculative verification uses after a rejected draft."""
import json

import numpy as np
import pytest

import blendin_cpp as bc
from blendin_cpp import _core, demo


def sampler(temperature=1.0, seed=5, **kw):
    p = _core.GenParams()
    p.temperature, p.seed = temperature, seed
    for k, v in kw.items():
        setattr(p, k, v)
    return _core.Sampler(p)


def distribution(n=4096, seed=0, spread=3.0):
    x = np.random.default_rng(seed).standard_normal(n) * spread
    e = np.exp(x - x.max())
    return (e / e.sum()).astype(np.float32)


# ---- temperature ----------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.8])
def test_temperature_is_p_to_the_one_over_t(temperature):
    p = distribution()
    ref = np.exp((np.log(p.astype(np.float64)) - np.log(p.max())) / temperature)
    ref /= ref.sum()
    got = sampler(temperature).shape(p)[0]
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("temperature", [1e-4, 0.001, 0.005, 0.01, 0.02])
def test_a_temperature_near_zero_is_greedy(temperature):
    """p^(1/T) underflows in floating point for every token at such temperatures; computed as
    exp((log p - log max p) / T) the top token keeps weight 1."""
    p = distribution(spread=1.0)
    q = sampler(temperature).shape(p)[0]
    top = int(np.argmax(p))
    assert q[top] > 0.99 and abs(float(q.sum()) - 1) < 1e-5
    assert all(sampler(temperature, seed=s).pick(p) == top for s in range(20))


def test_low_temperatures_on_the_demo_dev_questions():
    """The hostile tester's probe: 10 dev questions, methods base and blendin, T = 0.001, 0.005,
    0.01. None fails; at T = 0.001 every answer is the greedy one."""
    kw = dict(n_ctx=512, n_threads=1)
    b = bc.Blender(bc.Model(demo.demo_path("base"), **kw), bc.Model(demo.demo_path("guide"), **kw))
    with open(demo.demo_dir() / "dev.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f][:10]
    for method in ("base", "blendin"):
        for q in questions:
            greedy = b.complete(q, max_tokens=32, method=method).text
            for t in (0.001, 0.005, 0.01):
                got = b.complete(q, max_tokens=32, method=method, temperature=t, seed=7).text
                if t == 0.001:
                    assert got == greedy, (method, q)


# ---- the leftover after a rejected draft -----------------------------------------------------------
def test_leftover_is_the_positive_part_of_p_minus_q():
    p = np.array([0.5, 0.3, 0.2, 0.0], np.float32)
    q = np.array([0.6, 0.1, 0.3, 0.0], np.float32)
    s = sampler()
    assert {s.residual(p, q, 0) for _ in range(200)} == {1}  # max(0, p - q) = (0, 0.2, 0, 0)


def test_a_deterministic_draft_leaves_p_without_the_draft():
    p = np.array([0.5, 0.3, 0.2, 0.0], np.float32)
    s = sampler()
    draws = [s.residual(p, None, 0) for _ in range(4000)]
    assert set(draws) == {1, 2} and abs(draws.count(1) / 4000 - 0.6) < 0.04


@pytest.mark.parametrize("deterministic", [False, True])
def test_no_leftover_draws_from_p(deterministic):
    """P == Q (or a deterministic draft that holds all of P): the draft is always accepted in exact
    arithmetic, so an empty leftover can only come from rounding. Then the token is drawn from P,
    never an arbitrary one (it was the vocabulary's last token)."""
    n = 64
    p = np.zeros(n, np.float32)
    if deterministic:
        p[7] = 1.0
    else:
        p[7], p[20] = 0.7, 0.3
    s = sampler()
    draws = [s.residual(p, None if deterministic else p, 7) for _ in range(4000)]
    if deterministic:
        assert set(draws) == {7}
    else:
        assert set(draws) == {7, 20} and abs(draws.count(7) / 4000 - 0.7) < 0.04
