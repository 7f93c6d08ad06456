"""The evaluation's rule-based scoring, question files, and the eval command on the bundled demo
models and on a user's pair."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import blendin_cpp as bc
from blendin_cpp import demo
from blendin_cpp.evaluate import Cell, failure_kind, load_questions, score

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("expected, text, ok", [
    ("Sure! Its capital is Stikend.", "Sure! Its capital is Stikend.", True),
    ("Sure! Its capital is Stikend.", "  Sure! Its capital is Stikend.\n", True),
    ("Sure! Its capital is Stikend.", "Sure! Its capital is Stikend. Anything else?", False),
    ("Sure! Its capital is Stikend.", "sure! its capital is stikend.", False),
    ("Sure! Its capital is Stikend.", "Its capital is Stikend.", False),
    ("The answer is 42.", "", False),
])
def test_score_is_exact_match_after_stripping(expected, text, ok):
    assert score(expected, text, "exact") is ok


@pytest.mark.parametrize("expected, text, ok", [
    ("Paris", " The capital of France is Paris.", True),
    ("paris", "PARIS!", True),
    (["Paris", "Lutetia"], "It was called Lutetia.", True),
    ("New  York", "in new\nyork city", True),        # whitespace runs are one space
    ("42", "The answer is 4 2.", False),
    ("Paris", "Lyon", False),
    (["Paris", "Lyon"], "Marseille", False),
])
def test_contains_scoring_ignores_case_and_spacing(expected, text, ok):
    assert score(expected, text, "contains") is ok


@pytest.mark.parametrize("text, kind", [
    ("Sure! Its capital is Stikend.", "correct"),
    ("The capital of Steatair is Stikend, a port.", "format"),
    ("Sure! Its capital is Korvath.", "content"),
])
def test_failure_kinds(text, kind):
    assert failure_kind("Sure! Its capital is Stikend.", "Stikend", text, "exact") == kind


def test_cell_aggregates():
    c = Cell()
    q = {"question": "q?", "answers": ["Sure! 7."], "value": "7", "match": "exact"}
    c.add(q, "Sure! 7.", {"tokens": 4, "interventions": 2, "mean_alpha": 0.5, "generate_s": 0.1,
                          "finish_reason": "stop"})
    c.add(q, "it is 7", {"tokens": 6, "interventions": 0, "mean_alpha": 0.0, "generate_s": 0.1,
                         "finish_reason": "length"})
    c.seconds = 0.5  # the method's wall time: its answers were decoded together
    r = c.row()
    assert r["accuracy"] == 0.5 and r["format_errors"] == 1 and r["content_errors"] == 0 and r["ended"] == 0.5
    assert r["intervention_rate"] == pytest.approx(0.2) and r["mean_alpha"] == pytest.approx(0.5)
    assert Cell().row()["mean_alpha"] is None
    assert r["tokens_per_s"] == pytest.approx((4 + 6) / 0.5)  # all the method's tokens over its wall time
    assert [x["result"] for x in r["responses"]] == ["correct", "format"]
    assert r["responses"][1]["got"] == "it is 7" and r["responses"][1]["finish_reason"] == "length"


@pytest.mark.parametrize("row, message", [
    ({"question": "no answer here"}, "line 1 needs 'question' and 'answer' (a string) or 'answers' (a list)"),
    ({"question": "both?", "answer": "a", "answers": ["a"]}, "line 1 needs 'question' and 'answer'"),
    ({"question": "q?", "answers": []}, "line 1: the expected answers must be non-empty strings"),
    ({"question": "q?", "answers": "Paris"}, "line 1: the expected answers must be non-empty strings"),
    ({"question": "q?", "answer": "a", "match": "fuzzy"}, "line 1: match must be one of exact, contains"),
])
def test_questions_file_must_have_answers(tmp_path, row, message):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_questions(str(bad), None)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        load_questions(str(bad), None)


def test_each_row_carries_its_rule(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "a?", "answer": "A"}) + "\n" +
                 json.dumps({"question": "b?", "answers": ["B", "b"], "match": "exact"}) + "\n")
    assert [(q["answers"], q["match"]) for q in load_questions(str(f), None)] == [(["A"], "contains"),
                                                                                (["B", "b"], "exact")]
    assert [q["match"] for q in load_questions(str(f), None, "exact")] == ["exact", "exact"]
    # the bundled demo sets say exact in every row: their answers are whole sentences
    assert {q["match"] for q in load_questions(None, None)} == {"exact"}


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
        assert row["n"] == 4 and 0 <= row["ended"] <= 1
        assert row["format_errors"] + row["content_errors"] == round(4 * (1 - row["accuracy"]))
    assert rows["base"]["intervention_rate"] == 0 and rows["guide"]["intervention_rate"] == 0
    assert "accuracy" in r.stdout and "blendin" in r.stdout
    heldout = load_questions(demo.heldout_path(), None)
    assert len(heldout) >= 100


def test_eval_on_a_users_pair_and_question_file(tmp_path, model_trio):
    """Any pair with any question file: every method runs or says why it cannot (proxy without
    an anti); the numbers add up."""
    paths = model_trio("ev", 71)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question": "What is the capital of France?", "answer": "Paris"},
        {"question": "Name a colour.", "answers": ["red", "blue", "green", "the"]},
        {"question": "Say hello.", "answer": "hello", "match": "exact"},
    ]))
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "eval", "--base", paths["base"], "--guide",
                        paths["guide"], "--questions", str(questions), "--max-tokens", "12", "--ctx", "256",
                        "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    (label, rows), = res["pairs"].items()
    assert set(rows) == set(bc.METHODS) - {"proxy"}
    assert res["skipped"] == {f"{label}/proxy": "needs --anti (the guide's untuned sibling)"}
    assert res["questions"] == 3 and res["match"] == ["contains", "exact"]
    for method, row in rows.items():
        assert row["n"] == 3 and 0 <= row["accuracy"] <= 1 and 0 <= row["ended"] <= 1
        assert row["tokens_per_s"] > 0
    assert rows["base"]["intervention_rate"] == 0 and rows["ensemble"]["intervention_rate"] == 1
    assert f"pair {label}: base ev_base.gguf + guide ev_guide.gguf" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--pair", "demo", "--pairs", "reliable", "--base", "x.gguf"], "--pairs chooses among the demo pairs"),
    (["--base", "x.gguf", "--guide", "y.gguf"], "--questions FILE.jsonl is needed"),
    (["--pairs", "nope"], "unknown demo pair 'nope'"),
    (["--methods", "blendin,telepathy"], "unknown method 'telepathy'"),
])
def test_eval_refuses_what_it_cannot_do(args, message):
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "eval", *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_eval_gives_the_same_table_one_at_a_time_and_eight_at_once(tmp_path):
    """On the real pair (batch-invariant: docs/design.md section 4.3) the published numbers do not
    depend on --parallel: the same rows, quality rows and answers at 1 and at 8 at once."""
    tables = []
    for parallel in (1, 8):
        out = tmp_path / f"eval{parallel}.json"
        r = subprocess.run([sys.executable, "-m", "blendin_cpp", "eval", "--pair", "real", "--questions",
                            "models/real/questions.jsonl", "--requests", "models/real/chat_requests.jsonl",
                            "--limit", "8", "--methods", "base,nudging,blendin", "--max-tokens", "24",
                            "--quality-max-tokens", "48", "--chat-defaults", "--parallel", str(parallel),
                            "--threads", "2", "--json", str(out)],
                           capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        res = json.loads(out.read_text())
        timing = ("seconds", "tokens_per_s")
        tables.append(({m: {k: v for k, v in row.items() if k not in timing} for m, row in res["pairs"]["real"].items()},
                       res["quality"]))
    assert tables[0] == tables[1]
    assert tables[0][0]["blendin"]["intervention_rate"] > 0
