"""The two ways every check is proven, shared by the chapters' tests: correct variants pass
both suites, and each catalogued mistake fails and is named."""

SUITES = ("visible", "hidden")


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
