"""`transformer-course grade` end to end, on a batch of scenario submissions, each student
named for the case it represents (as in nbgrader's own test suite)."""

import csv
import json
import os
import subprocess
import sys
import time

import nbformat
import pytest

from transformer_course.cli import main
from transformer_course.grading.course import assignments, filled_release, reference_answers

from .conftest import ROOT

ASSIGNMENT = "01_self_attention"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"

SCORES = "q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5"  # a line of the reference answer
NAN_ON_FULLY_MASKED_ROWS = """def scaled_dot_product_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights"""


def _answers(assignment=ASSIGNMENT):
    return reference_answers(ROOT, assignment)


def _grade_id(cell):
    return cell.metadata.get("nbgrader", {}).get("grade_id", "")


def _submission(answers, edit=None, assignment=ASSIGNMENT):
    """The release with these answers typed in; edit(nb) may then do what a learner did."""
    nb = filled_release(ROOT, assignment, answers)
    if edit is not None:
        edit(nb)
    return nbformat.writes(nb)


def _through_colab(nb):
    """What Colab's "Save a copy in Drive" and a download add to a notebook."""
    nb.metadata.update(colab={"provenance": [], "name": f"Copy of {NOTEBOOK}"},
                       accelerator="GPU")  # fmt: skip
    for i, cell in enumerate(nb.cells):
        cell.metadata["id"] = f"c{i:04x}"  # Colab's own cell ids
        if cell.cell_type == "code":
            cell.metadata["colab"] = {"base_uri": "https://localhost:8080/"}


def _strip_nbgrader(nb):
    _through_colab(nb)
    for cell in nb.cells:
        cell.metadata.pop("nbgrader", None)


def _tests_deleted(nb):
    nb.cells = [c for c in nb.cells if not _grade_id(c).startswith("test_")]


def _tests_replaced_by_pass(nb):
    for cell in nb.cells:
        if _grade_id(cell).startswith("test_"):
            cell.source = "pass"


def _tests_duplicated(nb):
    """Each test cell twice, as Jupyter's Duplicate makes it: same content, a new cell id."""
    cells = []
    for cell in nb.cells:
        cells.append(cell)
        if _grade_id(cell).startswith("test_"):
            cells.append(nbformat.from_dict({**cell, "id": cell.id + "-copy"}))
    nb.cells = cells


def _metadata_forged(nb):
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader")
        if meta and meta.get("grade"):
            meta["points"] = 100
        if meta and _grade_id(cell) == "test_self_attention":
            meta.update(grade=False, solution=True)  # make the test cell an answer cell


def _helper_cell_added(nb):
    helper = nbformat.v4.new_code_cell(f"def attention_scores(q, k):\n    return {SCORES}")
    nb.cells.insert(2, helper)  # below the imports, where the notebook says to add your own


# Forbidden shortcuts: answers that get the numbers right by running someone else's code.
WITH_LIBRARY = """def scaled_dot_product_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num()
    return {call}(q, k, v, attn_mask=mask).nan_to_num(), weights"""
LIBRARY_DIRECTLY = "import torch.nn.functional as F\n\n" + WITH_LIBRARY.format(
    call="F.scaled_dot_product_attention"
)
LIBRARY_BY_NAME = "import importlib\n\n" + WITH_LIBRARY.format(
    call='getattr(importlib.import_module("torch.nn.functional"), "scaled_dot_" + "product_'
    'attention")'
)
LIBRARY_THROUGH_TORCH_OPS = WITH_LIBRARY.format(call="torch.ops.aten.scaled_dot_product_attention")
COURSE_REFERENCE = """from transformer_course import model as course

attend = course.scaled_dot_product_attention


def scaled_dot_product_attention(q, k, v, mask=None):
    return attend(q, k, v, mask)"""


# student (= scenario) -> (path under SUBMISSIONS, notebook text, score, status starts with)
def _scenarios():
    answers = _answers()
    half = {"scaled_dot_product_attention": answers["scaled_dot_product_attention"]}
    sdpa = answers["scaled_dot_product_attention"]
    assert SCORES in sdpa
    with_helper = {
        **answers,
        "scaled_dot_product_attention": sdpa.replace(SCORES, "attention_scores(q, k)"),
    }

    def shortcut(sdpa_answer):
        return {**answers, "scaled_dot_product_attention": sdpa_answer}

    v3 = json.dumps({"nbformat": 3, "nbformat_minor": 0, "metadata": {}, "worksheets": []})
    return {
        "complete-correct": (f"{ASSIGNMENT}/{NOTEBOOK}", _submission(answers), 10, "graded"),
        "untouched-release": (f"{ASSIGNMENT}/{NOTEBOOK}", _submission({}), 0, "graded"),
        "half-done": (f"{ASSIGNMENT}/{NOTEBOOK}", _submission(half), 6, "graded"),
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
        "empty-file": (f"{ASSIGNMENT}/{NOTEBOOK}", "", 0, "invalid notebook: the file is empty"),
        "colab-save-a-copy": (f"Copy of {NOTEBOOK}", _submission(answers, _through_colab), 10,
                              "graded"),
        "repeated-download": (f"{ASSIGNMENT} (3).ipynb", _submission(answers), 10, "graded"),
        "nbgrader-metadata-stripped": (NOTEBOOK, _submission(answers, _strip_nbgrader), 10,
                                       "graded"),
        "test-cells-deleted": (NOTEBOOK, _submission(answers, _tests_deleted), 10, "graded"),
        "test-cells-replaced-by-pass": (NOTEBOOK, _submission({}, _tests_replaced_by_pass), 0,
                                        "graded"),
        "test-cells-duplicated": (NOTEBOOK, _submission(answers, _tests_duplicated), 10,
                                  "graded"),
        "points-and-flags-forged": (NOTEBOOK, _submission(half, _metadata_forged), 6, "graded"),
        "library-called-directly": (NOTEBOOK, _submission(shortcut(LIBRARY_DIRECTLY)), 4,
                                    "graded"),
        "library-called-by-name": (NOTEBOOK, _submission(shortcut(LIBRARY_BY_NAME)), 4, "graded"),
        "library-through-torch-ops": (NOTEBOOK, _submission(shortcut(LIBRARY_THROUGH_TORCH_OPS)),
                                      4, "graded"),
        "course-reference-aliased": (NOTEBOOK, _submission(shortcut(COURSE_REFERENCE)), 4,
                                     "graded"),
        "helper-cell-added": (NOTEBOOK, _submission(with_helper, _helper_cell_added), 10,
                              "graded"),
    }  # fmt: skip


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
def test_feedback_says_why_a_shortcut_earned_nothing(graded):
    _, out = graded
    for student, why in [("library-called-directly", "scaled_dot_product_attention"),
                         ("library-called-by-name", "scaled_dot_product_attention"),
                         ("course-reference-aliased", "uses_reference")]:  # fmt: skip
        page = (out / "feedback" / student / f"{ASSIGNMENT}.html").read_text()
        assert "calls_library" in page or why in page, student
        assert "4 / 10" in page, student


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


@pytest.mark.slow
def test_a_batch_killed_midway_is_finished_by_a_rerun_and_reruns_agree(tmp_path):
    """Kill the grader after its first autograded notebook, run it again, then once more."""
    answers = _answers()
    half = {"scaled_dot_product_attention": answers["scaled_dot_product_attention"]}
    expected = {"complete-correct": 10.0, "half-done": 6.0, "untouched-release": 0.0}
    texts = {"complete-correct": answers, "half-done": half, "untouched-release": {}}
    folder, out = tmp_path / "submissions", tmp_path / "out"
    for student, student_answers in texts.items():
        path = folder / student / ASSIGNMENT / NOTEBOOK
        path.parent.mkdir(parents=True)
        path.write_text(_submission(student_answers))
    command = [sys.executable, "-m", "transformer_course", "--course", str(ROOT), "grade",
               str(folder), "--out", str(out)]  # fmt: skip
    grader = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    autograded = out / "nbgrader" / "autograded"
    deadline = time.monotonic() + 120
    while not any(autograded.rglob("*.ipynb")) and grader.poll() is None:
        assert time.monotonic() < deadline, "the grader never autograded a notebook"
        time.sleep(0.2)
    grader.kill()
    grader.wait()
    assert not (out / "grades.csv").exists(), "the batch finished before it could be killed"

    assert main(["--course", str(ROOT), "grade", str(folder), "--out", str(out)]) == 0
    first = (out / "grades.csv").read_text()
    rows = _rows(out / "grades.csv")
    assert {r["student"]: float(r["score"]) for r in rows} == expected
    assert main(["--course", str(ROOT), "grade", str(folder), "--out", str(out)]) == 0
    assert (out / "grades.csv").read_text() == first

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{out / 'gradebook.db'}") as gb:
        assert sorted(s.student.id for s in gb.assignment_submissions(ASSIGNMENT)) == sorted(
            expected
        )


LOOPS_FOREVER = """class SelfAttention(nn.Module):
    def __init__(self, embed_dim, bias=True):
        super().__init__()
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x, mask=None):
        while True:  # never returns
            pass"""


@pytest.mark.slow
def test_an_answer_that_never_returns_loses_only_its_own_points(tmp_path):
    answers = _answers()
    path = tmp_path / "submissions" / "infinite-loop" / ASSIGNMENT / NOTEBOOK
    path.parent.mkdir(parents=True)
    path.write_text(_submission({**answers, "self_attention": LOOPS_FOREVER}))
    out = tmp_path / "out"
    grade = ["grade", str(path.parents[2]), "--out", str(out), "--timeout", "20"]
    assert main(["--course", str(ROOT), *grade]) == 0
    rows = {r["test_id"]: r for r in _rows(out / "grades_by_test.csv")}
    assert float(rows["test_scaled_dot_product_attention"]["score"]) == 6
    assert rows["test_self_attention"]["status"] == "failed"
    assert float(_rows(out / "grades.csv")[0]["score"]) == 6
    page = (out / "feedback" / "infinite-loop" / f"{ASSIGNMENT}.html").read_text()
    assert "longer than the time limit" in page


# A LayerNorm whose forward never returns, takes its process down or floods it. Chapter 5's
# RMSNorm does not use it, so its 2 points must survive; Residual does, and loses its 4 too.
NORMS = "05_norms_and_residuals"
BREAKS_THE_SANDBOX = {
    "ignores-interrupts": "signal.signal(signal.SIGINT, signal.SIG_IGN)\n        while True:\n"
    "            pass",
    "exits-its-process": "os._exit(0)",
    "kills-itself": "os.kill(os.getpid(), signal.SIGKILL)",
    "memory-bomb": "hoard = bytearray(64 * 2**30)",
    "output-flood": "while True:\n            print('x' * 1_000_000)",
    "kills-its-parent": "os.kill(os.getppid(), signal.SIGKILL)",
}


@pytest.mark.slow
def test_a_hung_or_dead_sandbox_costs_only_the_exercises_that_ran_the_code(tmp_path, capsys):
    answers = _answers(NORMS)
    folder = tmp_path / "submissions"
    for student, body in BREAKS_THE_SANDBOX.items():
        forward = "    def forward(self, x):\n"
        broken = answers["layer_norm"].replace(forward, f"{forward}        {body}\n", 1)
        path = folder / student / NORMS / f"{NORMS}.ipynb"
        path.parent.mkdir(parents=True)
        text = _submission({**answers, "layer_norm": "import os\nimport signal\n\n" + broken},
                           assignment=NORMS)  # fmt: skip
        path.write_text(text)
    out = tmp_path / "out"
    assert main(["--course", str(ROOT), "grade", str(folder), "--out", str(out), "--timeout",
                 "15"]) == 0  # fmt: skip
    summary = capsys.readouterr().out
    assert summary.count("learners' code ran in a sandbox with:") == 1, summary
    if os.geteuid() == 0:  # CI: every part of the isolation holds, and the summary says so
        assert "no network, private folders hidden, unprivileged user" in summary, summary
    for row in _rows(out / "grades.csv"):
        assert (row["status"], float(row["score"])) == ("graded", 2), row
    for row in _rows(out / "grades_by_test.csv"):
        assert row["status"] == ("passed" if row["test_id"] == "test_rms_norm" else "failed"), row
    page = (out / "feedback" / "exits-its-process" / f"{NORMS}.html").read_text()
    assert "died" in page
    page = (out / "feedback" / "memory-bomb" / f"{NORMS}.html").read_text()
    assert "MemoryError" in page
    flooded = out / "nbgrader" / "autograded" / "output-flood" / NORMS / f"{NORMS}.ipynb"
    assert flooded.stat().st_size < 5_000_000  # what the checks' calls print is not kept


@pytest.mark.slow
def test_every_chapters_reference_scores_full_marks_and_its_release_zero(tmp_path):
    """Both ways round, for every chapter, through the sandbox: the reference answers typed
    into the release earn every point, and the untouched release earns none."""
    folder = tmp_path / "submissions"
    for assignment in assignments(ROOT):
        for student, answers in (("reference", _answers(assignment)), ("untouched", {})):
            path = folder / f"{student}-{assignment[:2]}" / assignment / f"{assignment}.ipynb"
            path.parent.mkdir(parents=True)
            path.write_text(_submission(answers, assignment=assignment))
    out = tmp_path / "out"
    assert main(["--course", str(ROOT), "grade", str(folder), "--out", str(out)]) == 0
    rows = _rows(out / "grades.csv")
    assert len(rows) == 2 * len(assignments(ROOT))
    for row in rows:
        full = row["student"].startswith("reference")
        expected = float(row["max_score"]) if full else 0.0
        assert (row["status"], float(row["score"])) == ("graded", expected), row
        assert float(row["max_score"]) > 0, row
