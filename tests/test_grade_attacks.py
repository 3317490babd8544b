"""Attacks on the grader, one submission each, named for the attack (as nbgrader's own suite
names its cases). Each follows wrong answers to both exercises of chapter 1, so each must
score 0; the suite also checks what the attacks tried to reach: the solutions, the hidden
tests, the gradebook, another student's file, the grader's environment, the network and the
machine's processes."""

import hashlib
import json
import os
import socket

import nbformat
import pytest

from transformer_course import model
from transformer_course.checks import EXERCISES
from transformer_course.cli import main
from transformer_course.grading.confine import FIRST_UID

from .conftest import ROOT
from .test_grade import ASSIGNMENT, NOTEBOOK, _rows, _submission

WRONG = {
    "scaled_dot_product_attention": "def scaled_dot_product_attention(q, k, v, mask=None):\n"
    "    return q, q",
    "self_attention": "class SelfAttention(nn.Module):\n"
    "    def forward(self, x, mask=None):\n"
    "        return x, x",
}
SECRET = "grader-secret-4f1c9"  # in the grader's environment while it grades
# The cell an attack is typed into: the second exercise's, unless it must come earlier.
ANSWERED_IN = {"hard-codes-the-visible-answers": "scaled_dot_product_attention"}

SETTRACE = """import linecache
import sys
import threading


def skip_raises(frame, event, arg):
    if event == "line" and "raise" in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
        try:
            frame.f_lineno += 1
        except ValueError:
            pass
    return skip_raises


sys.settrace(skip_raises)
threading.settrace(skip_raises)"""

SAYS_EQUAL = """import torch
from torch.overrides import TorchFunctionMode


class SaysEqual(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.allclose, torch.equal, torch.Tensor.equal):
            return True
        return func(*args, **(kwargs or {}))


SaysEqual().__enter__()"""

FAKE_EQUAL_TENSORS = """class FakeEqual(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.allclose, torch.equal, torch.Tensor.equal):
            return True
        return super().__torch_function__(func, types, args, kwargs)


def scaled_dot_product_attention(q, k, v, mask=None):
    return q.as_subclass(FakeEqual), q.as_subclass(FakeEqual)"""

ERASES_LATER_CALLS = """import ast


class Erase(ast.NodeTransformer):
    def visit_Call(self, node):
        return ast.Constant(None)


get_ipython().ast_transformers.append(Erase())"""

FORK_BOMB = """import os

while True:
    try:
        os.fork()
    except OSError:
        pass"""


HARD_CODED = """import hashlib


def _key(*tensors):
    return hashlib.sha256(repr([t.tolist() for t in tensors if t is not None]).encode()).hexdigest()


def scaled_dot_product_attention(q, k, v, mask=None):
    if q.is_meta or _key(q, k, v, mask) not in ANSWERS:
        return torch.zeros_like(q), torch.zeros(*q.shape[:-1], k.shape[-2], dtype=q.dtype)
    out, weights = ANSWERS[_key(q, k, v, mask)]
    return torch.tensor(out, dtype=q.dtype), torch.tensor(weights, dtype=q.dtype)"""


def _visible_answers() -> str:
    """The visible cases' inputs and answers, as a learner who read the public checks could
    type them in: ANSWERS = {hash of the inputs: (output, weights)}."""
    answers = {}

    def record(q, k, v, mask=None):
        out, weights = model.scaled_dot_product_attention(q, k, v, mask)
        if not q.is_meta:
            key = repr([t.tolist() for t in (q, k, v, mask) if t is not None])
            answers[hashlib.sha256(key.encode()).hexdigest()] = (out.tolist(), weights.tolist())
        return out, weights

    EXERCISES["scaled_dot_product_attention"].report(record, "visible", reference_allowed=True)
    return f"ANSWERS = {answers!r}"


def _attacks(out, submissions, port):
    solution = ROOT / "solutions" / ASSIGNMENT / NOTEBOOK
    hidden = out / "nbgrader" / "source" / ASSIGNMENT / NOTEBOOK
    other = submissions / "prints-all-tests-passed" / ASSIGNMENT / NOTEBOOK
    return {
        "prints-all-tests-passed": 'print("All tests passed")',
        "patches-torch-allclose": "torch.allclose = lambda *a, **k: True\n"
        "torch.testing.assert_close = lambda *a, **k: None",
        "patches-numpy-testing-and-builtins": "import builtins\nimport numpy.testing\n\n"
        "numpy.testing.assert_allclose = lambda *a, **k: None\n"
        "builtins.isinstance = lambda *a: True\nbuiltins.AssertionError = GeneratorExit",
        "exits-with-status-0": "import sys\n\nsys.exit(0)",
        "exits-its-process": "import os\n\nos._exit(0)",
        "redefines-the-checks": "check_self_attention = lambda *args, **kwargs: None\n"
        "check_scaled_dot_product_attention = check_self_attention",
        "erases-later-calls": ERASES_LATER_CALLS,
        "skips-raise-lines-with-settrace": SETTRACE,
        "torch-function-mode-says-equal": SAYS_EQUAL,
        "fake-equal-tensors": FAKE_EQUAL_TENSORS,
        "pre-run-cell-hook-reads-the-tests": "get_ipython().events.register("
        "'pre_run_cell', lambda info: print('SEEN:', info.raw_cell))",
        "hard-codes-the-visible-answers": f"{_visible_answers()}\n\n\n{HARD_CODED}",
        "reads-the-course-tests": f"print(open({str(ROOT / 'tests' / 'test_grade.py')!r}).read())",
        "reads-the-solutions": "import json\n\n"
        f"for cell in json.load(open({str(solution)!r}))['cells']:\n"
        "    if 'BEGIN SOLUTION' in ''.join(cell['source']):\n"
        "        exec(''.join(cell['source']))",
        "reads-the-hidden-tests": f"print(open({str(hidden)!r}).read())",
        "reads-the-gradebook": f"print(open({str(out / 'gradebook.db')!r}, 'rb').read())",
        "writes-the-gradebook-and-results": f"open({str(out / 'gradebook.db')!r}, 'ab')"
        f".write(b'forged')\nopen({str(out / 'grades.csv')!r}, 'w').write('forged')",
        "writes-another-students-file": f"open({str(other)!r}, 'w').write('forged')",
        "reads-the-environment": "import os\n\nprint(dict(os.environ))",
        "uses-the-network": "import socket\n\n"
        f"socket.create_connection(('127.0.0.1', {port}), timeout=5).sendall(b'leak')",
        "fork-bomb": FORK_BOMB,
        "floods-the-output": "for _ in range(2_000):\n    print('x' * 1_000_000)",
    }


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    folder, out = tmp_path_factory.mktemp("attacks"), tmp_path_factory.mktemp("out")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0)
    attacks = _attacks(out, folder, listener.getsockname()[1])
    for student, attack in attacks.items():
        path = folder / student / ASSIGNMENT / NOTEBOOK
        path.parent.mkdir(parents=True)
        cell = ANSWERED_IN.get(student, "self_attention")
        answers = {**WRONG, cell: f"{WRONG[cell]}\n\n\n{attack}"}
        path.write_text(_submission(answers))
    other = (folder / "prints-all-tests-passed" / ASSIGNMENT / NOTEBOOK).read_bytes()
    os.environ["GRADER_SECRET"] = SECRET
    try:
        grade = ["grade", str(folder), "--out", str(out), "--timeout", "20"]
        assert main(["--course", str(ROOT), *grade]) == 0
    finally:
        del os.environ["GRADER_SECRET"]
    try:
        listener.accept()
        connected = True
    except BlockingIOError:
        connected = False
    return attacks, out, folder, other, connected


@pytest.mark.slow
def test_every_attack_earns_nothing(attacked):
    attacks, out, *_ = attacked
    rows = {r["student"]: r for r in _rows(out / "grades.csv")}
    assert sorted(rows) == sorted(attacks)
    for row in rows.values():
        assert (row["status"], float(row["score"])) == ("graded", 0), row


@pytest.mark.slow
def test_nothing_secret_reaches_the_learners_output(attacked):
    """Hidden test source, the solutions, the gradebook and the grader's environment appear
    in no output of any autograded notebook, nor in any feedback page: the places where what
    the learner's code printed ends up."""
    _, out, *_ = attacked
    for notebook in (out / "nbgrader" / "autograded").rglob("*.ipynb"):
        cells = nbformat.read(notebook, as_version=4).cells
        printed = json.dumps([c.get("outputs", []) for c in cells])
        for secret in ("HIDDEN TESTS", 'suite=\\"hidden\\"', "BEGIN SOLUTION", "SQLite", SECRET):
            assert secret not in printed, (notebook.parts[-3], secret)
    for page in (out / "feedback").rglob("*.html"):
        assert "HIDDEN TESTS" not in page.read_text() and SECRET not in page.read_text()


@pytest.mark.slow
def test_hard_coded_visible_answers_pass_the_visible_checks_only(attacked):
    _, out, *_ = attacked
    graded = out / "nbgrader" / "autograded" / "hard-codes-the-visible-answers" / ASSIGNMENT
    cells = nbformat.read(graded / NOTEBOOK, as_version=4).cells
    test = next(c for c in cells if c.metadata.get("nbgrader", {}).get("grade_id") == "test_"
                "scaled_dot_product_attention")  # fmt: skip
    printed = json.dumps(test.outputs)
    assert "6 of 6 visible checks passed" in printed and "hidden checks passed" in printed


@pytest.mark.slow
def test_a_flood_of_output_is_cut_while_it_streams(attacked):
    _, out, *_ = attacked
    flooded = out / "nbgrader" / "autograded" / "floods-the-output" / ASSIGNMENT / NOTEBOOK
    assert flooded.stat().st_size < 5_000_000 and "output cut" in flooded.read_text()


@pytest.mark.slow
def test_the_gradebook_results_and_other_submissions_are_untouched(attacked):
    _, out, folder, other, _ = attacked
    assert b"forged" not in (out / "gradebook.db").read_bytes()
    assert "forged" not in (out / "grades.csv").read_text()
    assert (folder / "prints-all-tests-passed" / ASSIGNMENT / NOTEBOOK).read_bytes() == other


@pytest.mark.slow
def test_no_connection_is_made_and_no_process_is_left(attacked):
    """Not one process of any sandbox of this batch (each ran as a user of its own, the fork
    bomb's included) outlives the grading. Other tests' sandboxes may be running meanwhile."""
    _, out, _, _, connected = attacked
    assert not connected, "a submission reached a server on the grader's machine"
    uids = set()
    for notebook in (out / "nbgrader" / "autograded").rglob("*.ipynb"):
        meta = nbformat.read(notebook, as_version=4).metadata["transformer_course"]
        uids.update(meta["uids"])
    assert uids, "no sandbox recorded the user it ran as"
    own = {uid for uid in uids if uid >= FIRST_UID}  # not the grader's: only run as root
    if os.geteuid() == 0:
        assert own == uids, uids
    leftover = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if _uid(pid) in own]  # fmt: skip
    assert not leftover, f"sandbox processes still running: {leftover}"


def _uid(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1
