"""exercises/ is exactly what nbgrader generates from solutions/."""

import pytest

from transformer_course.grading.release import release

from .conftest import ROOT


@pytest.mark.slow
def test_committed_exercises_match_a_fresh_release(tmp_path):
    written = release(ROOT, tmp_path)
    assert written
    for path in written:
        committed = ROOT / "exercises" / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run `make exercises`"
        assert committed.read_text() == path.read_text(), (
            f"{committed} drifted: run `make exercises`"
        )
    released = sorted(p.relative_to(tmp_path) for p in written)
    committed = sorted(
        p.relative_to(ROOT / "exercises") for p in (ROOT / "exercises").rglob("*.ipynb")
    )
    assert committed == released


@pytest.mark.slow
def test_release_hides_solutions_and_hidden_tests(tmp_path):
    for path in release(ROOT, tmp_path):
        text = path.read_text()
        for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", 'suite="hidden"'):
            assert marker not in text, f"{path.name} contains {marker}"
