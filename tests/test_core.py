"""The check engine itself: verdicts, reports and diagnosis, independent of any chapter."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_course.checks.core import (
    FAILED,
    NOT_ATTEMPTED,
    Case,
    CheckFailed,
    CpuTensorUsed,
    Exercise,
    FirstStep,
    LibraryCalls,
    Mistake,
    NoCpuTensors,
    describe,
    expect_close,
    expect_on_meta,
    load_linears,
)

DOUBLE = Mistake("double", "twice the expected value", lambda x: 2 * x)
NEGATE = Mistake("negate", "the sign is flipped", lambda x: -x)


def _case(fn, reveal):
    x = torch.arange(4.0)
    expect_close("f(x)", fn(x), x + 1, atol=0, rtol=0, reveal=reveal,
                 rerun=lambda impl: impl(x), mistakes=(NEGATE, DOUBLE))  # fmt: skip


PLUS_ONE = Exercise(
    "plus_one",
    (Case("adds one", "visible", _case), Case("adds one, hidden", "hidden", _case)),
    (NEGATE, DOUBLE),
)


def test_a_right_answer_passes_and_prints_its_report(capsys):
    PLUS_ONE.check(lambda x: x + 1)
    assert "plus_one: 1 of 1 visible checks passed" in capsys.readouterr().out


def test_a_wrong_answer_is_named_and_shown_beside_the_expected_one():
    report = PLUS_ONE.report(lambda x: 2 * x)
    assert [r.status for r in report.results] == [FAILED]
    assert report.mistakes == ["double"]
    text = str(report)
    assert "yours:    shape (4,), torch.float32, values [0, 2, 4, 6]" in text
    assert "expected: shape (4,), torch.float32, values [1, 2, 3, 4]" in text
    assert "Likely mistake [double]: twice the expected value" in text
    with pytest.raises(AssertionError, match="Likely mistake"):
        report.raise_for_status()


def test_an_unknown_mistake_is_reported_without_a_name():
    report = PLUS_ONE.report(lambda x: x + 2)
    assert report.results[0].status == FAILED and report.mistakes == []


def test_hidden_cases_never_show_values():
    text = str(PLUS_ONE.report(lambda x: 2 * x, "hidden"))
    assert "values" not in text and "Likely mistake [double]" in text


def test_a_stub_is_not_attempted():
    def stub(x):
        raise NotImplementedError("plus_one: replace this line with your code")

    report = PLUS_ONE.report(stub)
    assert [r.status for r in report.results] == [NOT_ATTEMPTED]
    with pytest.raises(NotImplementedError, match="not attempted yet"):
        report.raise_for_status()


def test_a_dtype_change_is_its_own_message():
    with pytest.raises(CheckFailed, match="dtype torch.float64, expected torch.float32"):
        expect_close("y", torch.zeros(2, dtype=torch.float64), torch.zeros(2), atol=0, rtol=0,
                     reveal=True)  # fmt: skip


def test_describe_names_the_device_and_hides_values_when_asked():
    meta = torch.empty(2, 3, device="meta")
    assert describe(meta) == "shape (2, 3), torch.float32, on meta"
    assert "values" not in describe(torch.ones(2), reveal=False)
    assert describe([1, 2]) == "list (expected a tensor)"


def test_library_calls_are_seen_through_an_alias():
    sdpa = F.scaled_dot_product_attention
    q = torch.randn(1, 2, 4)
    with LibraryCalls(F.scaled_dot_product_attention) as calls:
        sdpa(q, q, q)
    assert calls.called == ["scaled_dot_product_attention"]
    with LibraryCalls(F.scaled_dot_product_attention) as calls:
        q @ q.mT
    assert calls.called == []


def test_load_linears_explains_a_missing_or_misshapen_layer():
    module = nn.Module()
    module.proj = nn.Linear(3, 2, bias=False)
    w = torch.ones(2, 3)
    load_linears(module, {"proj": (w, None)})
    assert torch.equal(module.proj.weight, w)
    with pytest.raises(CheckFailed, match=r"proj should be nn.Linear\(3, 2, bias=True\)"):
        load_linears(module, {"proj": (w, torch.zeros(2))})
    with pytest.raises(CheckFailed, match="other should be an nn.Linear, found NoneType"):
        load_linears(module, {"other": (w, None)})


def test_passed_needs_at_least_one_case_run():
    empty = Exercise("nothing", (), ())
    assert not empty.report(lambda x: x).passed


def test_cpu_tensors_on_meta_are_caught_even_where_meta_would_run_them():
    """On meta, an embedding looked up with CPU positions runs; on a GPU it fails."""
    weight = torch.empty(10, 4, device="meta")
    F.embedding(torch.arange(3), weight)  # no error on meta
    with pytest.raises(CpuTensorUsed, match="embedding"), NoCpuTensors():
        F.embedding(torch.arange(3), weight)
    with NoCpuTensors():  # a CPU tensor copied to the device, or a CPU scalar, is fine
        F.embedding(torch.arange(3).to("meta"), weight) * torch.tensor(2.0)


def test_a_training_loop_on_meta_reads_zeros_and_stops_at_its_first_step():
    """A loop that logs loss.item() gets a 0; its first step on meta parameters ends it, and
    only then: steps on the CPU, or after the mode, go on."""
    meta, cpu = nn.Linear(3, 1).to("meta"), nn.Linear(3, 1)
    with NoCpuTensors():
        loss = meta(torch.empty(4, 3, device="meta")).pow(2).mean()
        assert loss.item() == 0 and not bool(loss > 1)
        loss.backward()
        torch.optim.SGD(cpu.parameters(), lr=0.1).step()
        with pytest.raises(FirstStep):
            torch.optim.AdamW(meta.parameters(), fused=True).step()
    torch.optim.SGD(meta.parameters(), lr=0.1).step()


def test_expect_on_meta_wants_shape_dtype_and_the_meta_device():
    expect_on_meta("output", torch.empty(2, 3, device="meta"), (2, 3))
    wrong = {
        "on the cpu": (torch.empty(2, 3), "is on cpu"),
        "wrong shape": (torch.empty(3, 2, device="meta"), "shape (3, 2)"),
        "wrong dtype": (torch.empty(2, 3, dtype=torch.float64, device="meta"), "torch.float64"),
    }
    for case, (yours, message) in wrong.items():
        with pytest.raises(CheckFailed, match=re.escape(message)):
            expect_on_meta("output", yours, (2, 3))
            pytest.fail(case)
