"""The chapter 1 checks, proven both ways: every catalogued mistake fails and is named,
and implementations that differ from the reference but are correct all pass."""

import math

import pytest
import torch
import torch.nn as nn

from transformer_course.checks import self_attention as ch1
from transformer_course.checks.core import FAILED, PASSED, SKIPPED, available_devices

from .proofs import (
    assert_fails_and_is_named,
    assert_hidden_failures_show_no_values,
    assert_passes,
)

SDPA = ch1.SCALED_DOT_PRODUCT_ATTENTION
MODULE = ch1.SELF_ATTENTION


# ---- correct implementations written differently from the reference -------------------


def einsum_attention(q, k, v, mask=None):
    scores = torch.einsum("...qd,...kd->...qk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    weights = scores.softmax(-1).nan_to_num(0.0)
    return torch.einsum("...qk,...kd->...qd", weights, v), weights


def float64_inside(q, k, v, mask=None):
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = q64 @ k64.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(mask.logical_not(), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = torch.where(mask, weights, torch.zeros((), dtype=weights.dtype, device=q.device))
    return (weights @ v64).to(q.dtype), weights.to(q.dtype)


def manual_stable_softmax(q, k, v, mask=None):
    scores = q.matmul(k.mT) / math.sqrt(q.size(-1))
    allowed = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.expand_as(scores)
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    e = (scores - top).exp() * allowed
    total = e.sum(-1, keepdim=True)
    weights = e / torch.where(total > 0, total, torch.ones_like(total))
    return weights @ v, weights


def where_masking(q, k, v, mask=None):
    scores = (q / q.shape[-1] ** 0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = torch.where(mask, scores, scores.new_tensor(float("-inf")))
    weights = torch.softmax(scores, -1)
    weights = torch.where(torch.isnan(weights), weights.new_zeros(()), weights)
    return weights @ v, weights


CORRECT_SDPA = [einsum_attention, float64_inside, manual_stable_softmax, where_masking]


class LinearsByHand(nn.Module):
    """Projects with F.linear on the layers' parameters and attends with einsum."""

    def __init__(self, embed_dim, bias=True):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, nn.Linear(embed_dim, embed_dim, bias=bias))

    def forward(self, x, mask=None):
        q, k, v = (
            nn.functional.linear(x, layer.weight, layer.bias)
            for layer in (self.q_proj, self.k_proj, self.v_proj)
        )
        return einsum_attention(q, k, v, mask)


class StackedProjections(nn.Module):
    """Runs the three projections as one batched matmul over stacked weights."""

    def __init__(self, embed_dim, bias=True):
        super().__init__()
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x, mask=None):
        layers = (self.q_proj, self.k_proj, self.v_proj)
        w = torch.stack([layer.weight for layer in layers])  # (3, E, E)
        qkv = torch.einsum("ble,fme->fblm", x, w)  # (3, B, L, E)
        if self.q_proj.bias is not None:
            qkv = qkv + torch.stack([layer.bias for layer in layers])[:, None, None, :]
        return float64_inside(*qkv, mask)


CORRECT_MODULES = [LinearsByHand, StackedProjections]


CORRECT = [(SDPA, f) for f in CORRECT_SDPA] + [(MODULE, c) for c in CORRECT_MODULES]
CATALOGUE = [(SDPA, m) for m in ch1.SDPA_MISTAKES] + [(MODULE, m) for m in ch1.MODULE_MISTAKES]


@pytest.mark.parametrize("exercise, impl", CORRECT, ids=[i.__name__ for _, i in CORRECT])
def test_correct_variants_pass(exercise, impl):
    assert_passes(exercise, impl)


@pytest.mark.parametrize("exercise, mistake", CATALOGUE, ids=[m.id for _, m in CATALOGUE])
def test_each_catalogued_mistake_fails_and_is_named(exercise, mistake):
    assert_fails_and_is_named(exercise, mistake)


def test_a_mistake_is_named_in_the_visible_feedback():
    no_scaling = ch1.SDPA_MISTAKE["no_scaling"].impl
    with pytest.raises(AssertionError) as failure:
        ch1.check_scaled_dot_product_attention(no_scaling)
    text = str(failure.value)
    assert "the hand-checkable example" in text
    assert "yours:" in text and "expected:" in text and "shape (1, 1, 2)" in text
    assert "0.25, 0.75" in text  # the expected weights, shown since the case is visible
    assert "Likely mistake [no_scaling]" in text and "√d_k" in text


def test_hidden_feedback_shows_no_values():
    assert_hidden_failures_show_no_values(SDPA, ch1.SDPA_MISTAKE["nan_on_fully_masked_rows"].impl)


def test_dtype_is_kept():
    def to_float32(q, k, v, mask=None):
        out, w = einsum_attention(q, k, v, mask)
        return out.float(), w.float()

    report = SDPA.report(to_float32, "hidden")
    messages = " ".join(r.message for r in report.results if r.status == FAILED)
    assert "dtype torch.float32, expected torch.float64" in messages


def test_untouched_stub_is_not_attempted_and_raises_not_implemented():
    def stub(q, k, v, mask=None):
        raise NotImplementedError("scaled_dot_product_attention: replace this line with your code")

    report = SDPA.report(stub)
    assert report.not_attempted and not report.passed
    with pytest.raises(NotImplementedError, match="not attempted yet"):
        ch1.check_scaled_dot_product_attention(stub)


def test_crash_is_reported_not_raised():
    def crashes(q, k, v, mask=None):
        raise ValueError("oops")

    report = SDPA.report(crashes)
    assert {r.status for r in report.results} == {FAILED}
    assert "raised ValueError: oops" in report.results[0].message


def test_meta_case_runs_here_and_cuda_only_when_present():
    statuses = {r.case: r.status for r in SDPA.report(einsum_attention, "hidden").results}
    assert statuses["creates nothing on the CPU (meta device)"] == PASSED
    expected = PASSED if "cuda" in available_devices() else SKIPPED
    assert statuses["runs on CUDA"] == expected


def test_report_is_plain_data():
    data = SDPA.report(ch1.SDPA_MISTAKE["mask_inverted"].impl).to_dict()
    assert data["exercise"] == "scaled_dot_product_attention"
    assert any(r["mistake"] == "mask_inverted" for r in data["results"])


def test_the_cuda_cases_code_path_runs_here_on_the_cpu():
    """The CUDA cases only move tensors; run their code on the CPU so it is tested without a GPU."""
    ch1._on_device("cpu")(einsum_attention, False)
    ch1._module_on_device("cpu")(LinearsByHand, False)
    with pytest.raises(AssertionError, match="Likely|differ|yours"):
        ch1._module_on_device("cpu")(ch1._ValueFromKeyProj, False)


def through_torch_ops(q, k, v, mask=None):
    """The library's attention reached as its ATen operator, not as F.<name>."""
    weights = einsum_attention(q, k, v, mask)[1]
    return torch.ops.aten.scaled_dot_product_attention(q, k, v, attn_mask=mask), weights


def test_the_library_reached_through_torch_ops_is_named():
    report = SDPA.report(through_torch_ops)
    assert not report.passed and report.mistakes == ["calls_library"], str(report)
