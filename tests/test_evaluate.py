"""The evaluation's rule-based scoring, and the eval command on the bundled demo models."""
import json
import subprocess
import sys

import pytest

from blendin_cpp import demo
from blendin_cpp.evaluate import Cell, failure_kind, load_questions, score


@pytest.mark.parametrize("expected, text, ok", [
    ("Sure! Its capital is Stikend.", "Sure! Its capital is Stikend.", True),
    ("Sure! Its capital is Stikend.", "  Sure! Its capital is Stikend.\n", True),
    ("Sure! Its capital is Stikend.", "Sure! Its capital is Stikend. Anything else?", False),
    ("Sure! Its capital is Stikend.", "sure! its capital is stikend.", False),
    ("Sure! Its capital is Stikend.", "Its capital is Stikend.", False),
    ("The answer is 42.", "", False),
])
def test_score_is_exact_match_after_stripping(expected, text, ok):
    assert score(expected, text) is ok


@pytest.mark.parametrize("text, kind", [
    ("Sure! Its capital is Stikend.", "correct"),
    ("The capital of Steatair is Stikend, a port.", "format"),
    ("Sure! Its capital is Korvath.", "content"),
])
def test_failure_kinds(text, kind):
    assert failure_kind("Sure! Its capital is Stikend.", "Stikend", text) == kind


def test_cell_aggregates():
    c = Cell()
    q = {"question": "q?", "answer": "Sure! 7.", "value": "7"}
    c.add(q, "Sure! 7.", {"tokens": 4, "interventions": 2, "mean_alpha": 0.5, "generate_s": 0.1})
    c.add(q, "it is 7", {"tokens": 6, "interventions": 0, "mean_alpha": 0.0, "generate_s": 0.1})
    r = c.row()
    assert r["accuracy"] == 0.5 and r["format_errors"] == 1 and r["content_errors"] == 0
    assert r["intervention_rate"] == pytest.approx(0.2) and r["mean_alpha"] == pytest.approx(0.5)
    assert Cell().row()["mean_alpha"] is None
    assert r["tokens_per_s"] == pytest.approx((4 + 6) / (0.1 + 0.1))  # arithmetic on the stats given above
    assert r["examples"][0]["failure"] == "format"


def test_questions_file_must_have_answers(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question": "no answer here"}) + "\n")
    with pytest.raises(ValueError, match="line 1 needs 'question' and 'answer'"):
        load_questions(str(bad), None)


def test_eval_command_on_the_demo_pair(tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "eval", "--pairs", "reliable", "--methods",
                        "base,guide,blendin", "--limit", "4", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rows = res["pairs"]["reliable"]
    assert set(rows) == {"base", "guide", "blendin"} and res["questions"] == 4
    for row in rows.values():
        assert row["n"] == 4
        assert row["format_errors"] + row["content_errors"] == round(4 * (1 - row["accuracy"]))
    assert rows["base"]["intervention_rate"] == 0 and rows["guide"]["intervention_rate"] == 0
    assert "accuracy" in r.stdout and "blendin" in r.stdout
    heldout = load_questions(demo.heldout_path(), None)
    assert len(heldout) >= 100
