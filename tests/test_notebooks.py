"""Every solutions/ notebook passes all its tests; every released exercise fails exactly its
graded tests, with NotImplementedError; notebooks are committed in the state each use needs."""

import json

import nbformat
import pytest

from transformer_course.checks import EXERCISES
from transformer_course.grading.course import assignments
from transformer_course.grading.notebooks import PASSED, execute, is_test_cell, run

from .conftest import ROOT

ASSIGNMENTS = assignments(ROOT)
NOTEBOOKS = [f"{a}/{nb}" for a, nbs in ASSIGNMENTS.items() for nb in nbs]


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_solution_passes_visible_and_hidden_tests(notebook):
    verdicts = run(ROOT / "solutions" / notebook)
    assert verdicts, "no graded test cells"
    assert [v for v in verdicts if v.status != PASSED] == []


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_released_exercise_fails_exactly_its_tests_with_not_implemented(notebook):
    path = ROOT / "exercises" / notebook
    nb = execute(nbformat.read(path, as_version=4), path.parent)
    for i, cell in enumerate(nb.cells):
        errors = [o for o in cell.get("outputs", []) if o["output_type"] == "error"]
        if is_test_cell(cell):
            assert [e["ename"] for e in errors] == ["NotImplementedError"], f"test cell {i}"
        else:
            assert errors == [], f"cell {i} raised {errors[0]['ename']}: {errors[0]['evalue']}"


def _cells(folder):
    for path in sorted((ROOT / folder).rglob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            yield path, cell


@pytest.mark.parametrize("folder", ["solutions", "exercises"])
def test_committed_without_outputs(folder):
    for path, cell in _cells(folder):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path


def test_book_committed_with_outputs():
    for path in sorted((ROOT / "book").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.execution_count for c in code), f"{path} is not fully executed"
        # Saved widget state makes the site load the widget manager from a CDN; without it a
        # progress bar shows as its text, offline.
        assert "widgets" not in nb.metadata, f"{path}: strip metadata.widgets after executing"


@pytest.mark.parametrize("folder", ["book", "solutions", "exercises"])
def test_no_install_or_download_cells(folder):
    for path, cell in _cells(folder):
        lines = cell.source.splitlines() if cell.cell_type == "code" else []
        assert not any(line.lstrip().startswith(("!pip", "!wget", "%pip")) for line in lines), path


@pytest.mark.parametrize("folder", ["book", "solutions", "exercises"])
def test_kernel_is_python3(folder):
    for path in sorted((ROOT / folder).rglob("*.ipynb")):
        spec = json.loads(path.read_text())["metadata"]["kernelspec"]
        assert spec["name"] == "python3", path


def test_one_id_per_exercise_in_grade_ids_stubs_and_checks():
    """The solution cell's grade_id is the check's id; its test cell is test_<id> and calls it;
    the released stub names it."""
    for notebook in NOTEBOOKS:
        solution = nbformat.read(ROOT / "solutions" / notebook, as_version=4)
        release = nbformat.read(ROOT / "exercises" / notebook, as_version=4)
        ids = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in release.cells}
        for cell in solution.cells:
            meta = cell.metadata.get("nbgrader", {})
            if not meta.get("solution"):
                continue
            exercise = meta["grade_id"]
            assert exercise in EXERCISES, f"{notebook}: no check has the id {exercise}"
            assert f'NotImplementedError("{exercise}:' in ids[exercise].source
            test = ids[f"test_{exercise}"]
            assert test.metadata["nbgrader"]["grade"] and test.metadata["nbgrader"]["points"] > 0
            assert f"check_{exercise}(" in test.source
