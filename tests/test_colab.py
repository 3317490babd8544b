"""Every notebook opens in Colab the same way: a badge that opens the learner's copy and a
setup cell that, in Colab only, installs the course package of its release. Colab itself is
simulated (these machines are offline): a fresh environment with only what Colab ships, the
setup cell pointed at a wheel built here, and a solution notebook run end to end."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from transformer_course.colab import BADGE, SETUP, cells, notebooks, with_colab_cells
from transformer_course.grading.notebooks import PASSED, execute, results

from .conftest import ROOT

RELEASED = sorted((ROOT / "exercises").rglob("*.ipynb"))
# What Colab has installed before any notebook runs, at the versions this course is tested with.
COLAB_PREINSTALLED = ["torch", "numpy", "matplotlib", "scikit-learn", "tqdm", "ipykernel"]


@pytest.mark.parametrize("notebook", notebooks(ROOT), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_notebook_starts_with_its_colab_cells(notebook):
    """What `make colab` would write is what is committed, so running it changes nothing."""
    assert with_colab_cells(ROOT, notebook) == nbformat.read(notebook, as_version=4), (
        f"{notebook}: run `make colab`, then `make exercises`"
    )


@pytest.mark.parametrize("notebook", RELEASED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_released_badge_opens_the_released_copy(notebook):
    badge = nbformat.read(notebook, as_version=4).cells[0]
    assert badge.id == BADGE and notebook.relative_to(ROOT).as_posix() in badge.source


def test_the_setup_cell_installs_nothing_outside_colab(tmp_path):
    """Outside Colab the cell must not run pip: pointed at a wheel that does not exist, it
    would fail if it did."""
    setup = next(c for c in cells(ROOT, RELEASED[0]) if c.id == SETUP).source
    env = {k: v for k, v in os.environ.items() if k != "COLAB_RELEASE_TAG"}
    env["TRANSFORMER_COURSE_WHEEL"] = str(tmp_path / "missing.whl")
    done = subprocess.run([sys.executable, "-c", setup + "\nprint(DEVICE)"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("cpu", "cuda")


def _run(*command, **kwargs):
    return subprocess.run([str(c) for c in command], check=True, capture_output=True,
                          text=True, **kwargs)  # fmt: skip


def _pins() -> list[str]:
    """The lock file's versions of what Colab preinstalls."""
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return [line for line in lines if line.split("==")[0] in COLAB_PREINSTALLED]


@pytest.mark.colab
def test_a_solution_runs_end_to_end_in_a_simulated_colab(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools leaves a build/ folder beside its input
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source)
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", wheels, source)  # fmt: skip
    (wheel,) = wheels.glob("transformer_course-*.whl")
    colab = tmp_path / "colab"
    _run(sys.executable, "-m", "venv", colab)
    python = colab / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", *_pins())
    missing = subprocess.run([python, "-c", "import transformer_course"], capture_output=True)
    assert missing.returncode != 0, "the simulated Colab already has the course package"
    _run(python, "-m", "ipykernel", "install", "--prefix", colab, "--name", "python3")

    notebook = ROOT / "solutions" / "01_self_attention" / "01_self_attention.ipynb"
    env = {"COLAB_RELEASE_TAG": "simulated", "TRANSFORMER_COURSE_WHEEL": str(wheel),
           "JUPYTER_PATH": str(colab / "share" / "jupyter"), "PATH": f"{colab}/bin:/usr/bin:/bin",
           "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel nbclient starts inherits this environment
    try:
        nb = execute(nbformat.read(notebook, as_version=4), tmp_path, timeout=600)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    verdicts = results(nb)
    assert verdicts and all(v.status == PASSED for v in verdicts), verdicts
    where = _run(python, "-c", "import transformer_course; print(transformer_course.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(colab), where.stdout
