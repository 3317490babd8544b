"""nbgrader's Execute, made to survive a kernel that hangs or dies in one exercise.

nbgrader interrupts a cell that runs past its timeout, which stops an ordinary endless loop.
Code that ignores the interrupt keeps the kernel busy, and every later cell then times out
too; code that kills its own process (`os._exit`, a SIGKILL to itself) ends the whole
notebook's grading. Here the cell fails, the kernel's whole process group is killed and a
fresh kernel started, the code cells before it that are not tests run again in silence, and
grading goes on: only the exercise whose code hung or crashed loses its points.
"""

from __future__ import annotations

from jupyter_core.utils import ensure_async, run_sync
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat import NotebookNode
from nbgrader.converters import Autograde
from nbgrader.preprocessors import Execute

from .notebooks import is_test_cell

GRACE = 5  # seconds an interrupted kernel gets to become responsive again
OUTPUT_CAP = 1_000_000  # characters of output a cell may keep; the rest is dropped as it comes


class RecoveringExecute(Execute):
    def preprocess_cell(self, cell, resources, index):
        self._kept = 0  # characters of this cell's output so far
        try:
            cell, resources = super().preprocess_cell(cell, resources, index)
        except (DeadKernelError, CellTimeoutError) as error:  # died, or hung past the interrupt
            cell.outputs.append(_error(type(error).__name__, str(error).splitlines()[0]))
            self._restart(index)
            return cell, self.resources
        timed_out = any(o.get("ename") == "CellTimeoutError" for o in cell.get("outputs", []))
        if timed_out and not self._responsive():
            self._restart(index)
        return cell, resources

    def output(self, outs, msg, display_id, cell_index):
        """Keep a cell's output up to OUTPUT_CAP characters, so that a flood of printing
        cannot fill the grader's memory; say once that the rest was dropped."""
        size = len(str(msg["content"].get("text", msg["content"].get("data", ""))))
        if self._kept > OUTPUT_CAP:
            return None
        self._kept += size
        if self._kept > OUTPUT_CAP:
            note = f"[output cut: this cell printed more than {OUTPUT_CAP:,} characters]\n"
            outs.append(NotebookNode(output_type="stream", name="stderr", text=note))
            return None
        return super().output(outs, msg, display_id, cell_index)

    def _responsive(self) -> bool:
        """Whether the kernel answers a request within GRACE seconds (a busy one cannot)."""
        try:
            _wait(self.kc.kernel_info, reply=True, timeout=GRACE)
        except Exception:  # queue.Empty or a dead channel: either way, it did not answer
            return False
        return True

    def _restart(self, index: int) -> None:
        _wait(self.km.restart_kernel, now=True)  # SIGKILL to the kernel's process group
        _wait(self.kc.kernel_info, reply=True, timeout=60)  # until the new kernel is up
        for before in self.nb.cells[:index]:
            if before.cell_type == "code" and not is_test_cell(before):
                _wait(self.kc.execute_interactive, before.source, silent=True,
                      store_history=False, timeout=self.timeout,
                      output_hook=lambda msg: None)  # fmt: skip


@run_sync
async def _wait(method, *args, **kwargs):
    """Call a kernel manager's or client's method, sync or async, and wait for its result."""
    return await ensure_async(method(*args, **kwargs))


def autograde_preprocessors() -> list[type]:
    """nbgrader's autograde pipeline with RecoveringExecute in Execute's place."""
    default = Autograde.class_traits()["autograde_preprocessors"].default()
    return [RecoveringExecute if p is Execute else p for p in default]


def _error(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue, traceback=[])
