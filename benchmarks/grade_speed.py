"""How fast `transformer-course grade` is against stock `nbgrader autograde`.

Prepares N honest submissions of one assignment (the reference answers typed into the release,
every other one with the last exercise left undone), grades them once with each grader on
this machine, checks that both give every student the same score, and prints the seconds per
submission and the ratio. A benchmark, not a test: run it by hand on an idle machine.

    python benchmarks/grade_speed.py [--students 20] [--assignment 01_self_attention]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbgrader.api import Gradebook

from transformer_course.grading.course import filled_release, reference_answers

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def stock(work: Path, assignment: str, students: dict[str, str], notebook: str) -> tuple:
    """Seconds for `nbgrader autograde` on a plain nbgrader course folder; scores by student."""
    course = work / "stock"
    shutil.copytree(ROOT / "solutions" / assignment, course / "source" / assignment)
    config = (ROOT / "nbgrader_config.py").read_text()
    (course / "nbgrader_config.py").write_text(
        config.replace('"solutions"', '"source"').replace('"exercises"', '"release"')
    )
    # nbgrader runs `alembic` from PATH to create its gradebook
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    run = dict(cwd=course, check=True, capture_output=True, env=env)
    subprocess.run([BIN / "nbgrader", "generate_assignment", assignment, "--create"], **run)
    for student, text in students.items():
        path = course / "submitted" / student / assignment / notebook
        path.parent.mkdir(parents=True)
        path.write_text(text)
    start = time.perf_counter()
    subprocess.run([BIN / "nbgrader", "autograde", assignment], **run)
    seconds = time.perf_counter() - start
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        scores = {s.student.id: s.score for s in gb.assignment_submissions(assignment)}
    return seconds, scores


def ours(work: Path, assignment: str, students: dict[str, str], notebook: str) -> tuple:
    folder, out = work / "submissions", work / "out"
    for student, text in students.items():
        path = folder / student / assignment / notebook
        path.parent.mkdir(parents=True)
        path.write_text(text)
    command = [BIN / "transformer-course", "--course", ROOT, "grade", folder, "--out", out]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    with open(out / "grades.csv", newline="") as f:
        scores = {row["student"]: float(row["score"]) for row in csv.DictReader(f)}
    return seconds, scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=20)
    parser.add_argument("--assignment", default="01_self_attention")
    args = parser.parse_args()
    notebook = f"{args.assignment}.ipynb"
    typed = reference_answers(ROOT, args.assignment)
    last = list(typed)[-1]
    students = {
        f"student-{i:02d}": nbformat.writes(
            filled_release(
                ROOT,
                args.assignment,
                typed if i % 2 == 0 else {k: v for k, v in typed.items() if k != last},
            )
        )
        for i in range(args.students)
    }
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per kernel, as `make test`
    with tempfile.TemporaryDirectory() as tmp:
        stock_s, stock_scores = stock(Path(tmp), args.assignment, students, notebook)
        ours_s, our_scores = ours(Path(tmp), args.assignment, students, notebook)
    n = args.students
    print(f"{n} submissions of {args.assignment} on {os.cpu_count()} CPUs")
    print(f"stock nbgrader autograde: {stock_s:7.1f} s, {stock_s / n:5.2f} s per submission")
    print(f"transformer-course grade: {ours_s:7.1f} s, {ours_s / n:5.2f} s per submission")
    print(f"speed-up: {stock_s / ours_s:.2f}x")
    same = stock_scores == our_scores
    print("same scores for every student:", same)
    if not same:
        for student in sorted(set(stock_scores) | set(our_scores)):
            print(f"  {student}: stock {stock_scores.get(student)}, ours {our_scores.get(student)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
