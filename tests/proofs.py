"""The two ways every check is proven, shared by the chapters' tests: correct variants pass
both suites, and each catalogued mistake fails and is named."""

import dataclasses

SUITES = ("visible", "hidden")


def only_on(exercise, device):
    """The exercise with only its cases on `device`, to prove those alone."""
    return dataclasses.replace(
        exercise, cases=tuple(c for c in exercise.cases if c.device == device)
    )


def reports(exercise, impl):
    return [exercise.report(impl, suite) for suite in SUITES]


def assert_passes(exercise, impl):
    for report in reports(exercise, impl):
        assert report.passed, str(report)


def assert_fails_and_is_named(exercise, mistake):
    found = reports(exercise, mistake.impl)
    assert not all(r.passed for r in found), f"{mistake.id} passed every check"
    named = [m for r in found for m in r.mistakes]
    assert mistake.id in named, f"{mistake.id} was diagnosed as {named}"


def assert_hidden_failures_show_no_values(exercise, impl):
    """Hidden cases fail with shapes, dtypes and a diagnosis, never the values of their inputs."""
    report = exercise.report(impl, "hidden")
    failed = [r for r in report.results if r.status == "failed"]
    assert failed and all("values [" not in r.message for r in failed), str(report)
    return report


def assert_meta_case_judges_only_where_the_data_is(exercise, misplaced, model_cls, correct):
    """A training exercise's meta case: the loop that leaves its data on the CPU (`misplaced`)
    fails and is named; the reference, the `correct` loops and every other catalogued loop
    pass."""
    meta = only_on(exercise, "meta")
    report = meta.report((misplaced.impl, model_cls), "hidden")
    assert not report.passed and report.mistakes == [misplaced.id], str(report)
    assert meta.report(meta.reference, "hidden", reference_allowed=True).passed
    others = [m.impl for m in exercise.mistakes if m is not misplaced]
    for train in [*correct, *others]:
        report = meta.report((train, model_cls), "hidden")
        assert report.passed, str(report)
