"""The two cells at the top of every notebook: an "Open in Colab" badge and a setup cell.

Both derive from the repository set once in _config.yml and from the package's version, so a
notebook opened in Colab installs the course package of the release it came from. Run
`python -m transformer_course.colab` (`make colab`) after changing either; a test fails when
a notebook's cells are not what this module would write.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import nbformat
import yaml

BADGE = "colab-badge"  # the cells' ids, by which they are found and replaced
SETUP = "colab-setup"
FOLDERS = ("book", "solutions")  # exercises/ is released from solutions/, cells included

SETUP_CODE = """\
# Colab only: install the course's package at this notebook's release and pick the device.
# Anywhere else (your machine, the website, the grader) this cell installs nothing.
import os
import subprocess
import sys

if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
    # The course's tests point this at a wheel they built, as Colab has no copy of the repo.
    source = os.environ.get("TRANSFORMER_COURSE_WHEEL", "{requirement}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", source], check=True)

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")"""


def repository(root: Path) -> tuple[str, str]:
    """(url, branch) of the course's repository, from _config.yml."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    return config["repository"]["url"].rstrip("/"), config["repository"]["branch"]


def colab_url(root: Path, path: str) -> str:
    """Where Colab opens the repository's notebook at `path` (relative to the root)."""
    url, branch = repository(root)
    return url.replace("https://github.com/", "https://colab.research.google.com/github/", 1) + (
        f"/blob/{branch}/{path}"
    )


def cells(root: Path, notebook: Path) -> list:
    """The badge and setup cells for a notebook of book/ or solutions/ (whose badge opens the
    released copy in exercises/, the one learners use)."""
    path = notebook.relative_to(root).as_posix().replace("solutions/", "exercises/", 1)
    depth = len(Path(path).parts) - 1
    image = "../" * depth + "book/_static/colab-badge.svg"
    badge = nbformat.v4.new_markdown_cell(f"[![Open in Colab]({image})]({colab_url(root, path)})")
    url, _ = repository(root)
    requirement = f"transformer-course @ git+{url}@v{version('transformer-course')}"
    setup = nbformat.v4.new_code_cell(SETUP_CODE.format(requirement=requirement))
    setup.metadata["tags"] = ["remove-cell"]  # shown in Colab and Jupyter, not on the website
    badge.id, setup.id = BADGE, SETUP
    return [badge, setup]


def with_colab_cells(root: Path, notebook: Path):
    """The notebook with its badge and setup cells first, written or replaced; a setup cell
    whose code is unchanged keeps its execution, timings included (book pages are committed
    executed), so that running this again changes nothing."""
    nb = nbformat.read(notebook, as_version=4)
    old = {c.get("id"): c for c in nb.cells}
    new = cells(root, notebook)
    for cell in new:
        previous = old.get(cell.id)
        if cell.cell_type == "code" and previous is not None and previous.source == cell.source:
            cell.outputs, cell.execution_count = previous.outputs, previous.execution_count
            cell.metadata = {**previous.metadata, **cell.metadata}
    nb.cells = new + [c for c in nb.cells if c.get("id") not in (BADGE, SETUP)]
    return nb


def notebooks(root: Path) -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (root / folder).rglob("*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts)  # fmt: skip


def main() -> int:
    root = Path.cwd()
    paths = notebooks(root)
    for notebook in paths:
        nbformat.write(with_colab_cells(root, notebook), notebook)
    print(f"Colab cells written into {len(paths)} notebooks; run `make exercises`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
