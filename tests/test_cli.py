"""The learner's command: `transformer-course check NOTEBOOK`."""

import subprocess
import sys

import pytest

from transformer_course.cli import main

from .conftest import ROOT

NOTEBOOK = "01_self_attention/01_self_attention.ipynb"


@pytest.mark.slow
def test_check_untouched_exercise_says_not_attempted_and_fails(capsys):
    assert main(["check", str(ROOT / "exercises" / NOTEBOOK)]) == 1
    out = capsys.readouterr().out
    assert "not attempted  test_scaled_dot_product_attention" in out
    assert "0 of 2 tests passed" in out


@pytest.mark.slow
def test_check_solution_passes(capsys):
    assert main(["check", str(ROOT / "solutions" / NOTEBOOK)]) == 0
    assert "2 of 2 tests passed" in capsys.readouterr().out


def test_check_missing_notebook_is_a_usage_error(tmp_path):
    assert main(["check", str(tmp_path / "nope.ipynb")]) == 2


def test_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "transformer_course", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "release" in done.stdout and "grade" in done.stdout
