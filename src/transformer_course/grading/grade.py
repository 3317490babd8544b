"""Grade a folder of submissions with nbgrader and write the instructor's tables and feedback.

nbgrader does the work it is built for: it generates the release, runs its autograde
pipeline and keeps the gradebook (OUT/gradebook.db), with TrustedExecute in its Execute's
place (the learner's code in a sandbox, the tests here). This module finds the submissions,
sets aside the ones nbgrader cannot read, rebuilds each on the release, and turns the
gradebook into CSV files and feedback pages that quote each failing test's diagnosis but
never its source.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import re
import shutil
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import torch
from nbgrader.api import Gradebook, MissingEntry
from nbgrader.apps import NbGraderAPI
from nbgrader.coursedir import CourseDirectory
from sqlalchemy.exc import SAWarning

from . import feedback
from .course import assignments, load_config
from .execute import autograde_preprocessors
from .notebooks import TestResult, results
from .restore import rebuild

GRADED = "graded"


@dataclass
class Submission:
    student: str
    path: Path  # the file as found under SUBMISSIONS
    assignment: str | None = None  # None when no assignment matches
    notebook: str | None = None  # the source notebook's file name
    status: str = GRADED  # GRADED, or why it could not be graded
    score: float = 0.0
    max_score: float = 0.0
    tests: list[TestResult] = field(default_factory=list)
    test_scores: dict[str, float] = field(default_factory=dict)
    sandbox: list[str] = field(default_factory=list)  # the isolation that held while graded


# What browsers and Colab make of a notebook's name: "Copy of X.ipynb" (Colab's "Save a copy
# in Drive"), "X (3).ipynb" (a repeated download), "X-Copy1.ipynb" (Jupyter's Duplicate).
_RENAMED = re.compile(r"^(?:Copy of )*(?P<stem>.+?)(?: \(\d+\)|-Copy\d+)*\.ipynb$")


def original_name(name: str) -> str:
    """The notebook's file name before Colab, a browser or Jupyter renamed the copy."""
    found = _RENAMED.match(name)
    return f"{found['stem']}.ipynb" if found else name


def find_submissions(folder: Path, known: dict[str, list[str]]) -> list[Submission]:
    """Every .ipynb under folder, laid out as student/assignment/nb or student/nb."""
    found = []
    by_notebook = {nb: name for name, nbs in known.items() for nb in nbs}
    for path in sorted(folder.rglob("*.ipynb")):
        parts = path.relative_to(folder).parts
        if ".ipynb_checkpoints" in parts:
            continue
        if len(parts) not in (2, 3):
            found.append(
                Submission(parts[0], path, status="unexpected location: " + "/".join(parts))
            )
            continue
        sub = Submission(parts[0], path)
        named = parts[1] if len(parts) == 3 else None
        name = original_name(path.name)
        sub.assignment = named if named in known else by_notebook.get(name)
        if sub.assignment is None:
            sub.status = (
                f"unknown assignment: {'/'.join(parts[1:])} matches none of {sorted(known)}"
            )
        elif name in known[sub.assignment]:
            sub.notebook = name
        elif len(known[sub.assignment]) == 1:
            sub.notebook = known[sub.assignment][0]
        else:
            sub.status = f"unknown notebook {path.name} for {sub.assignment}"
        found.append(sub)
    return found


def _readable(sub: Submission) -> None:
    """Set a status for notebooks that are not valid nbformat 4 JSON."""
    if not sub.path.read_bytes().strip():
        sub.status = "invalid notebook: the file is empty"
        return
    try:
        nb = nbformat.read(sub.path, as_version=nbformat.NO_CONVERT)
        if nb.get("nbformat") != 4:
            raise ValueError(f"nbformat {nb.get('nbformat')}, expected 4")
        nbformat.validate(nb)
    except Exception as error:
        sub.status = f"invalid notebook: {type(error).__name__}: {str(error).splitlines()[0][:200]}"


def _mark_duplicates(subs: list[Submission]) -> None:
    seen = {}
    for sub in subs:
        if sub.status != GRADED:
            continue
        key = (sub.student, sub.assignment)
        if key in seen:
            sub.status = f"duplicate: {seen[key].path.name} was graded for this assignment"
        else:
            seen[key] = sub


def grade(
    root: Path,
    submissions: Path,
    out: Path,
    timeout: int | None = None,
    jobs: int | None = None,
    memory: float = 8,
) -> list[Submission]:
    """Grade everything under `submissions`; write OUT/grades.csv, grades_by_test.csv, feedback/.

    timeout: seconds a cell may run (default: nbgrader_config.py's Execute.timeout). A cell
    that runs longer is interrupted and fails; the cells after it still run.
    jobs: notebooks graded at once (default: one per CPU core).
    memory: GiB of address space for the learner's code of each notebook.
    """
    known = assignments(root)
    subs = find_submissions(submissions, known)
    for sub in subs:
        if sub.status == GRADED:
            _readable(sub)
    _mark_duplicates(subs)

    work = out / "nbgrader"  # nbgrader's course folder: source, release, submitted, autograded
    if work.exists():
        shutil.rmtree(work)
    config = load_config(root)
    config.CourseDirectory.root = str(work)
    config.CourseDirectory.db_url = f"sqlite:///{(out / 'gradebook.db').resolve()}"
    config.CourseDirectory.source_directory = "source"
    if timeout is not None:
        config.Execute.timeout = timeout
    config.Autograde.autograde_preprocessors = autograde_preprocessors()
    config.CourseDirectory.release_directory = "release"
    api = NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)
    # nbgrader creates the gradebook by running `alembic` from PATH, which lacks our
    # environment's scripts folder when the command was run without activating it.
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ["PATH"].split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ["PATH"]

    # nbgrader's own session handling warns on every new student; the warnings are not ours.
    warnings.filterwarnings("ignore", category=SAWarning)
    graded = [s for s in subs if s.status == GRADED]
    for name in sorted({s.assignment for s in graded}):
        shutil.copytree(root / "solutions" / name, work / "source" / name)
        result = api.generate_assignment(name, force=True, create=True)
        if not result["success"]:
            raise RuntimeError(f"nbgrader could not prepare {name}:\n{result.get('log', '')}")
    for sub in graded:
        # Only the learner's code is taken from the file; test cells and metadata are the
        # release's, whatever the submission did to them.
        release = work / "release" / sub.assignment / sub.notebook
        notebook = rebuild(nbformat.read(sub.path, as_version=4),
                           nbformat.read(release, as_version=4))  # fmt: skip
        target = work / "submitted" / sub.student / sub.assignment / sub.notebook
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, target)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(graded)))
    config.TrustedExecute.memory = memory
    config.TrustedExecute.threads = max(1, (os.cpu_count() or 1) // jobs)
    # What the learner's code must not see: the instructor's solutions and tests (and git
    # history holding them), the other submissions, the gradebook and everything graded.
    private = [root / "solutions", root / "tests", root / ".git", submissions, out]
    config.TrustedExecute.hide = [str(p.resolve()) for p in private]
    outcomes = _autograde_all(config, [(s.assignment, s.student) for s in graded], jobs)
    for sub, failure in zip(graded, outcomes, strict=True):
        if failure:
            sub.status = f"autograde failed: {failure}"
    _read_gradebook(config.CourseDirectory.db_url, work, subs, known)
    _write_tables(out, subs)
    for sub in subs:
        if sub.assignment:
            feedback.write(out / "feedback" / sub.student / f"{sub.assignment}.html", sub)
    return subs


def _autograde_all(config, work: list[tuple[str, str]], jobs: int) -> list[str]:
    """_autograde for each (assignment, student) in a pool of worker processes; a worker
    that dies costs only its own submission."""
    # Spawned, not forked: a fork would share this process's database and ZMQ state.
    spawn = multiprocessing.get_context("spawn")
    setup = {"initializer": _setup_worker, "initargs": (config.TrustedExecute.threads,)}
    outcomes: dict[int, str] = {}
    with ProcessPoolExecutor(jobs, spawn, **setup) as pool:
        futures = [pool.submit(_autograde, config, *item) for item in work]
        for i, future in enumerate(futures):
            try:
                outcomes[i] = future.result()
            except BrokenProcessPool:
                pass  # which submission broke the pool is unknown: retry each on its own
    for i in sorted(set(range(len(work))) - set(outcomes)):
        with ProcessPoolExecutor(1, spawn, **setup) as alone:
            try:
                outcomes[i] = alone.submit(_autograde, config, *work[i]).result()
            except BrokenProcessPool:
                outcomes[i] = "the grading process died"
    return [outcomes[i] for i in range(len(work))]


def _setup_worker(threads: int) -> None:
    """A grading worker's share of the cores (processes that each start a thread per core on
    a shared CPU wait on each other, many times slower than one thread each)."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=SAWarning)  # as in grade(), for this process


def _autograde(config, assignment: str, student: str) -> str:
    """nbgrader's autograde of one student's assignment; what went wrong, or ""."""
    api = NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)
    result = api.autograde(assignment, student, force=True, create=True)
    if result["success"]:
        return ""
    return ((result.get("log") or "").strip().splitlines()[-1:] or ["no log"])[0][:200]


def _read_gradebook(db_url: str, work: Path, subs: list[Submission], known) -> None:
    with Gradebook(db_url) as gb:
        max_scores = {}
        for name in known:
            try:
                max_scores[name] = gb.find_assignment(name).max_score
            except MissingEntry:
                continue
        for sub in subs:
            sub.max_score = max_scores.get(sub.assignment, 0.0)
            if sub.status != GRADED:
                continue
            submitted = gb.find_submission(sub.assignment, sub.student)
            sub.score = submitted.score
            for nb in submitted.notebooks:
                sub.test_scores.update({g.name: g.score for g in nb.grades})
            autograded = work / "autograded" / sub.student / sub.assignment / sub.notebook
            nb = nbformat.read(autograded, as_version=4)
            sub.tests = results(nb)
            sub.sandbox = nb.metadata.get("transformer_course", {}).get("sandbox", [])


def _write_tables(out: Path, subs: list[Submission]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "grades.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "assignment", "score", "max_score", "status"])
        for s in subs:
            writer.writerow([s.student, s.assignment or "", s.score, s.max_score, s.status])
    with open(out / "grades_by_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "assignment", "test_id", "score", "max_score", "status"])
        for s in subs:
            for t in s.tests:
                score = s.test_scores.get(t.test_id, 0.0)
                writer.writerow([s.student, s.assignment, t.test_id, score, t.points, t.status])
