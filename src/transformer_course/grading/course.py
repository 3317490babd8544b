"""Where the course lives: its root, its nbgrader configuration and its assignments."""

from __future__ import annotations

from pathlib import Path

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
