"""nbgrader's configuration for this course; nbgrader and `transformer-course` both read it.

solutions/ is the instructor's source, exercises/ the release learners open. Grading work
folders (submitted/, autograded/, feedback/, gradebook.db) are git-ignored.
"""

from transformer_course.grading.release import preprocessors

c = get_config()  # noqa: F821 (nbgrader provides it)
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"
# The stubs say which exercise they belong to: raise NotImplementedError("<grade_id>: ...").
c.GenerateAssignment.preprocessors = preprocessors()
# Hidden tests run many cases; a slow but correct answer still finishes well inside this.
c.Execute.timeout = 300
