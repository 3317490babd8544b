"""Rebuild a submission on the instructor's release: the learner's code in, the rest theirs.

Only the learner's code is taken from the submitted file: what they wrote in each solution
cell, and code cells they added. Every other cell (specs, imports, test cells) and all
nbgrader metadata come from the release. Edited, deleted, duplicated or retyped test cells
and forged metadata therefore change nothing.

The learner's cells are placed by landmarks: submitted cells that still carry a release
cell's grade_id, or that are unchanged copies of a release cell that learners cannot edit.
A notebook that lost nbgrader's metadata (say, on a trip through Colab) is placed by content
and order alone. Code between two landmarks belongs to the release's solution cell between
them; code after a landmark with no solution cell before the next one is kept as an added
cell at that place.
"""

from __future__ import annotations

import copy

from nbformat.v4 import new_code_cell


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _text(cell) -> str:
    """The cell's source, without trailing spaces or blank lines at either end."""
    return "\n".join(line.rstrip() for line in cell.get("source", "").strip().splitlines())


def _landmarks(submitted, release) -> dict[int, int]:
    """Submitted cell index -> release cell index, increasing in both."""
    fixed = {
        i: (cell.cell_type, _text(cell))
        for i, cell in enumerate(release.cells)
        if not _nbgrader(cell).get("solution") and _text(cell)
    }
    ids = {_nbgrader(cell).get("grade_id"): i for i, cell in enumerate(release.cells)}
    ids.pop(None, None)
    order = sorted(fixed)
    found, last = {}, -1
    for j, cell in enumerate(submitted.cells):
        i = ids.get(_nbgrader(cell).get("grade_id"))
        if i is None or i <= last or cell.cell_type != release.cells[i].cell_type:
            key = (cell.cell_type, _text(cell))
            i = next((k for k in order if k > last and fixed[k] == key), None)
        if i is not None:
            found[j], last = i, i
    return found


def rebuild(submitted, release):
    """The release notebook with the learner's code from `submitted` in its solution cells."""
    landmarks = _landmarks(submitted, release)
    fixed_texts = {_text(c) for c in release.cells if not _nbgrader(c).get("solution")}
    # learner code, by the release cell index it follows
    code: dict[int, list[str]] = {}
    at = -1
    for j, cell in enumerate(submitted.cells):
        if j in landmarks:
            at = landmarks[j]
            if _nbgrader(release.cells[at]).get("solution"):
                code.setdefault(at, []).append(cell.source)
        elif cell.cell_type == "code" and _text(cell) and _text(cell) not in fixed_texts:
            code.setdefault(at, []).append(cell.source)

    is_solution = [bool(_nbgrader(c).get("solution")) for c in release.cells]
    placed: dict[int, list[str]] = {}
    for at, sources in sorted(code.items()):
        if at >= 0 and is_solution[at]:
            placed.setdefault(at, []).extend(sources)
            continue
        # the next solution cell, unless a landmark comes first
        nxt = next((i for i in range(at + 1, len(release.cells))
                    if is_solution[i] or i in landmarks.values()), None)  # fmt: skip
        target = nxt if nxt is not None and is_solution[nxt] else at
        placed.setdefault(target, []).extend(sources)

    cells = []
    for i, cell in enumerate(release.cells):
        cell = copy.deepcopy(cell)
        sources = placed.get(i, [])
        if is_solution[i] and sources:
            cell.source = "\n\n".join(sources)
        cells.append(cell)
        if not is_solution[i]:  # code the learner wrote after a fixed cell follows it
            cells.extend(new_code_cell(source) for source in sources)
    cells[0:0] = [new_code_cell(s) for s in placed.get(-1, [])]
    notebook = copy.deepcopy(release)
    notebook.cells = cells
    return notebook
