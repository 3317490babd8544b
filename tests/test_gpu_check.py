"""`make gpu-check`: its table and exit status, tried on devices every machine has."""

import os
import subprocess
import sys

import torch

from transformer_course import gpu_check
from transformer_course.checks import EXERCISES

# Quick ones, each with cases on both CPU and meta; the training exercises train models.
SOME = ["scaled_dot_product_attention", "split_heads", "layer_norm", "patchify"]
SDPA = EXERCISES["scaled_dot_product_attention"]


def rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}


def test_without_cuda_it_says_so_and_succeeds(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("No CUDA device found: nothing was run on a GPU. (torch ")
    assert len(out.splitlines()) == 1


def test_references_pass_on_meta(capsys):
    assert gpu_check.check_exercises(["meta"], SOME) == 0
    table = rows(capsys.readouterr().out)
    for name in SOME:
        visible, hidden, skipped, _seconds = table[name]
        assert (visible, hidden, skipped) == ("0/0", "1/1", "0")


def test_counts_every_case_of_the_device(capsys):
    assert gpu_check.check_exercises(["cpu"], ["scaled_dot_product_attention"]) == 0
    n_visible = sum(c.suite == "visible" and c.device == "cpu" for c in SDPA.cases)
    n_hidden = sum(c.suite == "hidden" and c.device == "cpu" for c in SDPA.cases)
    visible, hidden, *_ = rows(capsys.readouterr().out)["scaled_dot_product_attention"]
    assert (visible, hidden) == (f"{n_visible}/{n_visible}", f"{n_hidden}/{n_hidden}")


def test_a_wrong_answer_fails_with_its_report(capsys):
    wrong = {SDPA.id: SDPA.mistakes[0].impl}
    assert gpu_check.check_exercises(["cpu"], [SDPA.id], wrong) == 1
    out = capsys.readouterr().out
    assert f"Likely mistake [{SDPA.mistakes[0].id}]" in out


def test_a_tensor_left_on_the_cpu_fails_where_a_gpu_would(capsys):
    (mistake,) = [m for m in SDPA.mistakes if m.id == "cpu_tensor"]
    assert gpu_check.check_exercises(["meta"], [SDPA.id], {SDPA.id: mistake.impl}) == 1
    assert rows(capsys.readouterr().out)[SDPA.id][:2] == ["0/0", "0/1"]


def test_an_absent_device_is_a_failure_not_a_pass(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.check_exercises(["cuda"], SOME) == 1
    out = capsys.readouterr().out
    assert rows(out)["layer_norm"][:3] == ["0/0", "0/0", "1"]
    assert "layer_norm: runs on CUDA (skipped: no cuda here)" in out


def test_runs_as_a_module():
    # No GPU visible, so that on any machine it stops at once rather than running the check.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "transformer_course.gpu_check"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("No CUDA device found"), done.stderr


def test_notebook_rows_and_status(tmp_path, monkeypatch, capsys):
    from transformer_course.grading import notebooks

    for name in ("01_a", "02_b"):
        (tmp_path / "solutions" / name).mkdir(parents=True)
        (tmp_path / "solutions" / name / f"{name}.ipynb").touch()
    verdicts = {
        "01_a": [notebooks.TestResult("test_a", notebooks.PASSED, 1)],
        "02_b": [notebooks.TestResult("test_b", notebooks.FAILED, 1, "AssertionError: b\n  ✗ c")],
    }
    monkeypatch.setattr(notebooks, "run", lambda path, timeout: verdicts[path.stem])
    assert gpu_check.check_notebooks(tmp_path) == 1
    out = capsys.readouterr().out
    assert rows(out)["01_a"][0] == "1/1" and rows(out)["02_b"][0] == "0/1"
    assert "failed: test_b" in out and "      AssertionError: b" in out
    del verdicts["02_b"]
    (tmp_path / "solutions" / "02_b" / "02_b.ipynb").unlink()
    assert gpu_check.check_notebooks(tmp_path) == 0
