"""The two ways every check is proven, shared by the chapters' tests: correct variants pass
both suites, and each catalogued mistake fails and is named."""

import pytest

from transformer_course.checks.core import available_devices

SUITES = ("visible", "hidden")


def catalogue(mistakes):
    """pytest params of `mistakes`, each skipped where the device it shows on is missing."""
    return [
        pytest.param(m, id=m.id, marks=pytest.mark.skipif(
            m.device not in available_devices(), reason=f"shows only on {m.device}"
        ))
        for m in mistakes
    ]  # fmt: skip


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
