"""Run a notebook and read the verdict of each of its nbgrader test cells."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted"
# How a cell that ran past the time limit ends: interrupted, or given up on by the client.
STOPPED = ("KeyboardInterrupt", "CellTimeoutError")
STOPPED_MESSAGE = (
    "Stopped: the cell ran longer than the time limit. Look for a loop that never ends, or "
    "code that is far slower than it needs to be."
)
DIED_MESSAGE = (
    "The Python process running the notebook died in this cell: the code ended its own "
    "process (os._exit, sys.exit in a thread, a signal) or used far too much memory."
)


@dataclass
class TestResult:
    test_id: str  # the test cell's nbgrader grade_id
    status: str  # PASSED, FAILED or NOT_ATTEMPTED
    points: float  # what the test cell is worth
    message: str = ""  # the error's message: the checks' report, never the cell's source


def is_test_cell(cell) -> bool:
    meta = cell.metadata.get("nbgrader", {})
    return cell.cell_type == "code" and meta.get("grade", False) and not meta.get("solution", False)


def execute(nb, cwd: Path, timeout: int = 300):
    """Run every cell, errors included, in a fresh kernel started in cwd."""
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(cwd)}},
    )  # fmt: skip
    # The kernel process's own log (not the cells' output) would clutter the learner's report.
    client.execute(stderr=subprocess.DEVNULL)
    return nb


def results(nb) -> list[TestResult]:
    """The verdict of each test cell of an executed notebook."""
    verdicts = []
    for cell in nb.cells:
        if not is_test_cell(cell):
            continue
        meta = cell.metadata["nbgrader"]
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if not errors:
            status, message = PASSED, ""
        else:
            error = errors[0]
            status = NOT_ATTEMPTED if error["ename"] == "NotImplementedError" else FAILED
            message = f"{error['ename']}: {error['evalue']}"
            if error["ename"] in STOPPED:
                message = STOPPED_MESSAGE
            elif error["ename"] == "DeadKernelError":
                message = DIED_MESSAGE
        verdicts.append(TestResult(meta["grade_id"], status, float(meta.get("points", 0)), message))
    return verdicts


def run(path: Path, timeout: int = 300) -> list[TestResult]:
    nb = nbformat.read(path, as_version=4)
    return results(execute(nb, path.parent, timeout))
