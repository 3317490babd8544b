"""nbgrader's Execute, split in two: the learner's cells run in a sandbox, the tests here.

nbgrader runs a notebook's test cells in the same kernel as the learner's code, so that code
can decide the verdict: patch the comparison, skip the asserts, read the hidden tests. Here
the learner's cells run in a `Sandbox`, a separate, confined process; each test cell runs in
the grader's own process, where the learner's names stand for their objects in the sandbox
(see `remote`) and the checks compare what comes back with references computed here. The
outputs are written into the notebook as a kernel would, so nbgrader's gradebook, feedback
and formgrader work as before.

A cell that runs past the time limit, or whose code kills the sandbox, fails; the sandbox is
killed with its whole process group, a fresh one runs the learner's earlier cells again, and
grading goes on: only the exercise whose code hung or crashed loses its points.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import shutil
import tempfile

from nbformat import NotebookNode
from nbgrader.converters import Autograde
from nbgrader.preprocessors import Execute
from traitlets import Float, Integer, List, Unicode

from .. import checks
from .confine import Limits
from .notebooks import is_test_cell
from .remote import Sandbox, SandboxDied, SandboxStopped

# The check functions a test cell may call: the course's own, never the learner's.
CHECKS = {
    name: obj
    for module in vars(checks).values()
    if getattr(module, "__name__", "").startswith(checks.__name__ + ".")
    for name, obj in vars(module).items()
    if name.startswith("check_") and callable(obj)
}


class TrustedExecute(Execute):
    memory = Float(8, help="GiB of address space for the learner's code").tag(config=True)
    threads = Integer(1, help="threads the learner's code may use").tag(config=True)
    hide = List(Unicode(), help="folders the learner's code must not see").tag(config=True)

    def preprocess(self, nb, resources):
        workdir = tempfile.mkdtemp(prefix="sandbox-")
        self.limits = Limits(memory=int(self.memory * 2**30), hide=tuple(self.hide),
                             workdir=workdir, threads=self.threads)  # fmt: skip
        self.sandbox, self.ran = None, []  # the sandbox, and the learner cells it has run
        self.enforced: list[str] = []
        self.uids: list[int] = []
        try:
            for cell in nb.cells:
                if cell.cell_type == "code":
                    cell.outputs = []
                    if is_test_cell(cell):
                        self._test(cell)
                    else:
                        self._learner(cell)
        finally:
            if self.sandbox is not None:
                self.sandbox.kill()
            shutil.rmtree(workdir, ignore_errors=True)
        # What isolation held, for the instructor's summary (it varies by platform), and the
        # users the sandboxes ran as, by which a test sees that none of their processes is left.
        nb.metadata["transformer_course"] = {"sandbox": self.enforced, "uids": self.uids}
        return nb, resources

    def _start(self) -> Sandbox:
        """The sandbox, started (again) if need be, with the cells that ran before replayed."""
        if self.sandbox is None:
            self.sandbox = Sandbox(self.limits)
            self.enforced = self.sandbox.enforced
            self.uids.append(self.sandbox.uid)
            for source in self.ran:
                with self.sandbox.limit(self.timeout):
                    self.sandbox.exec(source)
        return self.sandbox

    def _learner(self, cell) -> None:
        try:
            with self._start().limit(self.timeout) as sandbox:
                reply = sandbox.exec(cell.source)
        except (SandboxStopped, SandboxDied) as stop:
            cell.outputs.append(self._stopped(stop))
            return
        self.ran.append(cell.source)
        for name in ("stdout", "stderr"):
            if reply[name]:
                cell.outputs.append(_stream(name, reply[name]))
        if reply["error"]:
            error = reply["error"]
            cell.outputs.append(_error(error["type"], error["message"], error["traceback"]))

    def _test(self, cell) -> None:
        printed = io.StringIO()
        try:
            names = _TestNames(self._start())
            with self.sandbox.limit(self.timeout), contextlib.redirect_stdout(printed):
                exec(compile(cell.source, "<test cell>", "exec"), {"__builtins__": builtins}, names)
        except (SandboxStopped, SandboxDied) as stop:
            error = self._stopped(stop)
        except Exception as failure:  # the verdict: a check's report, never the cell's source
            error = _error(type(failure).__name__, str(failure))
        else:
            error = None
        if printed.getvalue():
            cell.outputs.append(_stream("stdout", printed.getvalue()))
        if error is not None:
            cell.outputs.append(error)

    def _stopped(self, stop: BaseException) -> NotebookNode:
        """The sandbox is gone (killed by us or by the learner's code): say which."""
        self.sandbox = None
        ename = "CellTimeoutError" if isinstance(stop, SandboxStopped) else "DeadKernelError"
        return _error(ename, str(stop))


class _TestNames(dict):
    """A test cell's names: the course's checks and Python's builtins from here, the rest
    (the learner's functions and classes) from the sandbox."""

    def __init__(self, sandbox: Sandbox):
        super().__init__()
        self.sandbox = sandbox

    def __missing__(self, name):
        if hasattr(builtins, name):
            raise KeyError(name)  # Python then finds it among the builtins
        self[name] = CHECKS[name] if name in CHECKS else self.sandbox.lookup(name)
        return self[name]


def autograde_preprocessors() -> list[type]:
    """nbgrader's autograde pipeline with TrustedExecute in Execute's place."""
    default = Autograde.class_traits()["autograde_preprocessors"].default()
    return [TrustedExecute if p is Execute else p for p in default]


def _stream(name: str, text: str) -> NotebookNode:
    return NotebookNode(output_type="stream", name=name, text=text)


def _error(ename: str, evalue: str, traceback=()) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue, traceback=list(traceback))
