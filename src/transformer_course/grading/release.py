"""Generate the learners' release (exercises/) from the instructor's source (solutions/)."""

from __future__ import annotations

from pathlib import Path

from nbgrader.apps import NbGraderAPI
from nbgrader.converters import GenerateAssignment
from nbgrader.coursedir import CourseDirectory
from nbgrader.preprocessors import ClearSolutions

from .course import assignments, load_config

STUB = '# YOUR CODE HERE\nraise NotImplementedError("{exercise}: replace with your code")'


class ClearSolutionsWithId(ClearSolutions):
    """nbgrader's ClearSolutions, with a stub that names the exercise (the cell's grade_id)."""

    def _replace_solution_region(self, cell, language):
        exercise = cell.metadata.get("nbgrader", {}).get("grade_id", "this exercise")
        self.code_stub = {**self.code_stub, language: STUB.format(exercise=exercise)}
        return super()._replace_solution_region(cell, language)


def preprocessors() -> list[type]:
    """nbgrader's generate_assignment pipeline with our ClearSolutions in its place."""
    default = GenerateAssignment.class_traits()["preprocessors"].default()
    return [ClearSolutionsWithId if p is ClearSolutions else p for p in default]


def release(root: Path, dest: Path | None = None) -> list[Path]:
    """Write every assignment's release into dest (default: the course's exercises/)."""
    config = load_config(root)
    config.GenerateAssignment.no_database = True  # what `nbgrader generate_assignment --no-db` sets
    config.SaveCells.enabled = False
    if dest is not None:
        config.CourseDirectory.release_directory = str(Path(dest).resolve())
    coursedir = CourseDirectory(config=config)
    api = NbGraderAPI(coursedir=coursedir, config=config)
    written = []
    for name, notebooks in assignments(root).items():
        result = api.generate_assignment(name, force=True, create=False)
        if not result["success"]:
            raise RuntimeError(f"nbgrader could not release {name}:\n{result.get('log', '')}")
        folder = Path(coursedir.format_path(coursedir.release_directory, ".", name))
        written += [folder / nb for nb in notebooks]
    return written
