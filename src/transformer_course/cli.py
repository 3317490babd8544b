"""`transformer-course`: release exercises, check a learner's notebook, grade a batch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .grading.course import find_root
from .grading.notebooks import PASSED


def _release(args) -> int:
    from .grading.release import release

    for path in release(args.course or find_root()):
        print(f"wrote {path}")
    return 0


def _check(args) -> int:
    from .grading.notebooks import run

    path = Path(args.notebook)
    if not path.is_file():
        print(f"error: no notebook at {path}", file=sys.stderr)
        return 2
    verdicts = run(path, timeout=args.timeout)
    if not verdicts:
        print(f"error: {path} has no graded test cells", file=sys.stderr)
        return 2
    for v in verdicts:
        print(f"{v.status:>13}  {v.test_id}")
        if v.status != PASSED:
            print("\n".join("               " + line for line in v.message.splitlines()))
    n_passed = sum(v.status == PASSED for v in verdicts)
    print(f"{n_passed} of {len(verdicts)} tests passed")
    return 0 if n_passed == len(verdicts) else 1


def _grade(args) -> int:
    from .grading.grade import GRADED, grade

    folder = Path(args.submissions)
    if not folder.is_dir():
        print(f"error: {folder} is not a folder of submissions", file=sys.stderr)
        return 2
    if not any(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts):
        print(f"error: no .ipynb files under {folder}", file=sys.stderr)
        return 2
    subs = grade(args.course or find_root(), folder, Path(args.out), timeout=args.timeout,
                 jobs=args.jobs, memory=args.memory)  # fmt: skip
    for s in subs:
        print(f"{s.student:>20}  {s.assignment or '?':<24} {s.score:g}/{s.max_score:g}  {s.status}")
    n_graded = sum(s.status == GRADED for s in subs)
    print(f"graded {n_graded} of {len(subs)} submissions; tables and feedback in {args.out}")
    held = sorted({", ".join(s.sandbox) for s in subs if s.status == GRADED})
    for isolation in held:  # one line unless the platform's answer changed during the batch
        print(f"learners' code ran in a sandbox with: {isolation or 'no isolation'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="transformer-course", description=__doc__)
    parser.add_argument(
        "--course", type=Path, help="the course folder (default: found from the current folder)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    release = commands.add_parser("release", help="regenerate exercises/ from solutions/")
    release.set_defaults(run=_release)

    check = commands.add_parser("check", help="run your notebook's tests and summarise them")
    check.add_argument("notebook", help="the .ipynb file to check")
    check.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    check.set_defaults(run=_check)

    grade = commands.add_parser("grade", help="autograde a folder of submissions")
    grade.add_argument("submissions", help="folder of <student>/<assignment>/<notebook>.ipynb")
    grade.add_argument("--out", required=True, help="folder for grades, feedback and gradebook")
    grade.add_argument(
        "--timeout", type=int, help="seconds per cell (default: nbgrader_config.py's, 300)"
    )
    grade.add_argument(
        "--jobs", type=int, help="notebooks graded at once (default: one per CPU core)"
    )
    grade.add_argument(
        "--memory", type=float, default=8, help="GiB for each notebook's code (default 8)"
    )
    grade.set_defaults(run=_grade)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
