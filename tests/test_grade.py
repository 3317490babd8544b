"""`transformer-course grade` end to end, on a batch of scenario submissions, each student
named for the case it represents (as in nbgrader's own test suite)."""

import csv
import json

import nbformat
import pytest

from transformer_course.cli import main

from .conftest import ROOT

ASSIGNMENT = "01_self_attention"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"

NAN_ON_FULLY_MASKED_ROWS = """def scaled_dot_product_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights"""


def _answers():
    """The reference answers as a learner would type them: solution cells without markers."""
    source = nbformat.read(ROOT / "solutions" / ASSIGNMENT / NOTEBOOK, as_version=4)
    return {
        c.metadata["nbgrader"]["grade_id"]: "\n".join(
            line for line in c.source.splitlines() if "### " not in line
        )
        for c in source.cells
        if c.metadata.get("nbgrader", {}).get("solution")
    }


def _submission(answers):
    nb = nbformat.read(ROOT / "exercises" / ASSIGNMENT / NOTEBOOK, as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    return nbformat.writes(nb)


# student (= scenario) -> (path under SUBMISSIONS, notebook text, score, status starts with)
def _scenarios():
    answers = _answers()
    v3 = json.dumps({"nbformat": 3, "nbformat_minor": 0, "metadata": {}, "worksheets": []})
    return {
        "complete-correct": (f"{ASSIGNMENT}/{NOTEBOOK}", _submission(answers), 10, "graded"),
        "untouched-release": (f"{ASSIGNMENT}/{NOTEBOOK}", _submission({}), 0, "graded"),
        "half-done": (
            f"{ASSIGNMENT}/{NOTEBOOK}",
            _submission({"scaled_dot_product_attention": answers["scaled_dot_product_attention"]}),
            6,
            "graded",
        ),
        "passes-visible-fails-hidden": (
            f"{ASSIGNMENT}/{NOTEBOOK}",
            _submission(
                {
                    "scaled_dot_product_attention": NAN_ON_FULLY_MASKED_ROWS,
                    "self_attention": answers["self_attention"],
                }
            ),
            4,
            "graded",
        ),
        "flat-layout": (NOTEBOOK, _submission(answers), 10, "graded"),
        "corrupt-json": (f"{ASSIGNMENT}/{NOTEBOOK}", '{"cells": [', 0, "invalid notebook"),
        "nbformat-3": (f"{ASSIGNMENT}/{NOTEBOOK}", v3, 0, "invalid notebook"),
        "unknown-notebook": ("homework.ipynb", _submission(answers), 0, "unknown assignment"),
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submissions")
    scenarios = _scenarios()
    for student, (where, text, _, _) in scenarios.items():
        path = folder / student / where
        path.parent.mkdir(parents=True)
        path.write_text(text)
    out = tmp_path_factory.mktemp("out")
    assert main(["--course", str(ROOT), "grade", str(folder), "--out", str(out)]) == 0
    return scenarios, out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_submission_has_its_expected_score_and_status(graded):
    scenarios, out = graded
    rows = {r["student"]: r for r in _rows(out / "grades.csv")}
    assert sorted(rows) == sorted(scenarios)
    for student, (_, _, score, status) in scenarios.items():
        row = rows[student]
        assert float(row["score"]) == score, (student, row)
        assert row["status"].startswith(status), (student, row)
        if status == "graded":
            assert (row["assignment"], float(row["max_score"])) == (ASSIGNMENT, 10)


@pytest.mark.slow
def test_per_test_rows_say_passed_failed_or_not_attempted(graded):
    _, out = graded
    rows = {(r["student"], r["test_id"]): r for r in _rows(out / "grades_by_test.csv")}
    sdpa, module = "test_scaled_dot_product_attention", "test_self_attention"
    assert rows["untouched-release", sdpa]["status"] == "not attempted"
    assert rows["half-done", sdpa]["status"] == "passed"
    assert rows["half-done", module]["status"] == "not attempted"
    assert rows["passes-visible-fails-hidden", sdpa]["status"] == "failed"
    assert float(rows["passes-visible-fails-hidden", module]["score"]) == 4
    assert ("corrupt-json", sdpa) not in rows


@pytest.mark.slow
def test_feedback_explains_failures_without_hidden_test_source(graded):
    _, out = graded
    page = (out / "feedback" / "passes-visible-fails-hidden" / f"{ASSIGNMENT}.html").read_text()
    assert "nan_on_fully_masked_rows" in page and "4 / 10" in page
    for student in ("passes-visible-fails-hidden", "complete-correct", "untouched-release"):
        page = (out / "feedback" / student / f"{ASSIGNMENT}.html").read_text()
        assert "HIDDEN TESTS" not in page and 'suite="hidden"' not in page
        assert "suite=&quot;hidden&quot;" not in page


@pytest.mark.slow
def test_gradebook_is_nbgraders_sqlite_under_out(graded):
    from nbgrader.api import Gradebook

    _, out = graded
    with Gradebook(f"sqlite:///{out / 'gradebook.db'}") as gb:
        assert gb.find_submission(ASSIGNMENT, "complete-correct").score == 10


def test_usage_errors_exit_non_zero(tmp_path, capsys):
    assert main(["--course", str(ROOT), "grade", str(tmp_path / "missing"), "--out", "x"]) == 2
    assert main(["--course", str(ROOT), "grade", str(tmp_path), "--out", "x"]) == 2
    assert "no .ipynb files" in capsys.readouterr().err
