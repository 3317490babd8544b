"""Where the course lives: its root, its nbgrader configuration and its assignments."""

from __future__ import annotations

from pathlib import Path

import nbformat
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

CONFIG_FILE = "nbgrader_config.py"


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` holding nbgrader_config.py and solutions/."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / CONFIG_FILE).is_file() and (folder / "solutions").is_dir():
            return folder
    raise FileNotFoundError(
        f"No course found at or above {start}: expected {CONFIG_FILE} beside a solutions/ "
        "folder. Run from inside the course repository or pass --course."
    )


def load_config(root: Path) -> Config:
    config = PyFileConfigLoader(CONFIG_FILE, path=str(root)).load_config()
    config.CourseDirectory.root = str(root)
    return config


def assignments(root: Path) -> dict[str, list[str]]:
    """Assignment name -> names of its notebooks, as laid out in solutions/."""
    return {
        folder.name: sorted(nb.name for nb in folder.glob("*.ipynb"))
        for folder in sorted((root / "solutions").iterdir())
        if folder.is_dir() and any(folder.glob("*.ipynb"))
    }


def reference_answers(root: Path, assignment: str) -> dict[str, str]:
    """grade_id -> the code of each solution cell as a learner would type it (no markers)."""
    source = nbformat.read(root / "solutions" / assignment / f"{assignment}.ipynb", as_version=4)
    return {
        cell.metadata["nbgrader"]["grade_id"]: "\n".join(
            line for line in cell.source.splitlines() if "### " not in line
        )
        for cell in source.cells
        if cell.metadata.get("nbgrader", {}).get("solution")
    }


def filled_release(root: Path, assignment: str, answers: dict[str, str]):
    """The released notebook with `answers` (grade_id -> code) typed into its solution cells:
    a submission, for the grader's tests and benchmarks."""
    nb = nbformat.read(root / "exercises" / assignment / f"{assignment}.ipynb", as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    return nb
