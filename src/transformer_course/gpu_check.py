"""`make gpu-check`: what only a GPU can test, run on a machine that has one.

`make test` runs on CPU-only machines, where every exercise's CUDA cases are skipped. This
runs those cases against the course's reference, then every solution notebook (which picks
the GPU itself), and prints a table with timings. Exit status 1 when anything failed.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checks import EXERCISES
from .checks.core import PASSED, SKIPPED

SUITES = ("visible", "hidden")
ROW = "{:<40}{:>9}{:>9}{:>9}{:>9}"


def _clock(devices: Sequence[str]) -> float:
    # CUDA runs asynchronously: wait for the GPU's queued work, or its time goes uncounted.
    if "cuda" in devices and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def check_exercises(
    devices: Sequence[str] = ("cuda",),
    ids: Sequence[str] | None = None,
    impls: Mapping[str, Any] | None = None,
) -> int:
    """Print one row per exercise: its cases on `devices`, run on impls[id] (default: the
    course's reference), passed/ran in each suite. Return 1 if a case failed or was skipped."""
    impls = impls or {}
    print(ROW.format("exercise", "visible", "hidden", "skipped", "seconds"), flush=True)
    problems, without = [], []
    for name in ids or EXERCISES:
        exercise = EXERCISES[name]
        # Only the cases for these devices: `make test` runs the rest, and timing them here
        # would hide the GPU's share of the time.
        cases = tuple(case for case in exercise.cases if case.device in devices)
        exercise = dataclasses.replace(exercise, cases=cases)
        impl = impls.get(name, exercise.reference)
        start = _clock(devices)
        reports = [exercise.report(impl, suite, reference_allowed=True) for suite in SUITES]
        seconds = _clock(devices) - start
        counts, n_skipped = [], 0
        for report in reports:
            ran = [r for r in report.results if r.status != SKIPPED]
            n_passed = sum(r.status == PASSED for r in ran)
            counts.append(f"{n_passed}/{len(ran)}")
            if n_passed < len(ran):
                problems.append(str(report))
            # A skipped case means its device is missing: the check did not do its job.
            for r in report.results:
                if r.status == SKIPPED:
                    n_skipped += 1
                    problems.append(f"{name}: {r.case} (skipped: no {'/'.join(devices)} here)")
        if not cases:
            without.append(name)
        print(ROW.format(name, *counts, n_skipped, f"{seconds:.2f}"), flush=True)
    if without:  # so a row of 0/0 reads as "nothing to run", not as a check that went missing
        print(f"no {'/'.join(devices)} cases: {', '.join(without)}")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


def check_notebooks(root: Path, timeout: int = 600) -> int:
    """Run every solution notebook (timeout: seconds per cell); print its test cells' tally
    and time. Return 1 when a test cell did not pass."""
    from .grading import notebooks  # Jupyter's client: only this part needs it

    print(ROW.format("solution notebook", "tests", "", "", "seconds"), flush=True)
    status = 0
    for path in sorted(root.glob("solutions/*/*.ipynb")):
        start = time.perf_counter()  # the notebook's kernel is its own process: nothing to wait on
        verdicts = notebooks.run(path, timeout)
        seconds = time.perf_counter() - start
        n_passed = sum(v.status == PASSED for v in verdicts)
        print(ROW.format(path.stem, f"{n_passed}/{len(verdicts)}", "", "", f"{seconds:.1f}"))
        for v in verdicts:
            if v.status != PASSED:  # the checks' own report says which case failed and how
                print(f"  {v.status}: {v.test_id}")
                print("\n".join("      " + line for line in v.message.splitlines()))
        sys.stdout.flush()
        if not verdicts or n_passed < len(verdicts):
            status = 1
    return status


def main() -> int:
    if not torch.cuda.is_available():
        build = f"yes, CUDA {torch.version.cuda}" if torch.version.cuda else "no"
        print(
            "No CUDA device found: nothing was run on a GPU. "
            f"(torch {torch.__version__}, CUDA build: {build})"
        )
        return 0
    from .grading.course import find_root

    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"GPU: {torch.cuda.get_device_name()} ({versions})")
    torch.zeros(1, device="cuda")  # start CUDA now, so its start-up isn't the first row's time
    exercises = check_exercises()
    print()
    return max(exercises, check_notebooks(find_root()))


if __name__ == "__main__":
    sys.exit(main())
