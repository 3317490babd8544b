"""The chapter 5 checks, proven both ways: every catalogued mistake fails and is named,
and implementations that differ from the reference but are correct all pass."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_course import model
from transformer_course.checks import norms_and_residuals as ch5
from transformer_course.checks.core import FAILED, PASSED, SKIPPED, available_devices, randn

from .proofs import (
    assert_fails_and_is_named,
    assert_hidden_failures_show_no_values,
    assert_passes,
    reports,
)

LAYER_NORM, RMS_NORM, RESIDUAL = ch5.LAYER_NORM, ch5.RMS_NORM, ch5.RESIDUAL


# ---- correct implementations written differently from the reference -------------------


class _Affine(nn.Module):
    """Parameters as nn.LayerNorm keeps them: weight and bias, or both registered as None."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def affine(self, y):
        return y if self.weight is None else y * self.weight + self.bias


class VarMeanLayerNorm(_Affine):
    def forward(self, x):
        dims = tuple(range(-len(self.normalized_shape), 0))
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return self.affine((x - mean) * torch.rsqrt(var + self.eps))


class CentredLayerNorm(_Affine):
    """Centre by hand, variance as the mean of squares, affine with addcmul."""

    def forward(self, x):
        dims = [-i for i in range(1, len(self.normalized_shape) + 1)]
        centred = x - x.mean(dim=dims, keepdim=True)
        y = centred / (centred.pow(2).mean(dim=dims, keepdim=True) + self.eps).sqrt()
        return y if self.weight is None else torch.addcmul(self.bias, y, self.weight)


class Float64InsideLayerNorm(_Affine):
    """Statistics and normalization in float64, cast back to x's dtype."""

    def forward(self, x):
        dims = tuple(range(x.dim() - len(self.normalized_shape), x.dim()))
        h = x.double()
        var = h.var(dims, unbiased=False, keepdim=True)
        return self.affine(
            ((h - h.mean(dims, keepdim=True)) / torch.sqrt(var + self.eps)).to(x.dtype)
        )


class FlattenLayerNorm(_Affine):
    """The normalized axes flattened into one, normalized, and unflattened."""

    def forward(self, x):
        flat = x.flatten(-len(self.normalized_shape)) if x.dim() else x
        mean = flat.mean(-1, keepdim=True)
        var = ((flat - mean) ** 2).mean(-1, keepdim=True)
        return self.affine(((flat - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape))


CORRECT_LAYER_NORMS = [VarMeanLayerNorm, CentredLayerNorm, Float64InsideLayerNorm, FlattenLayerNorm]


class RsqrtRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class VectorNormRMSNorm(RsqrtRMSNorm):
    """mean(x²) as the squared length over the dimension."""

    def forward(self, x):
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True) ** 2 / x.shape[-1]
        return self.weight * (x / torch.sqrt(mean_square + self.eps))


class UpcastRMSNorm(RsqrtRMSNorm):
    """LLaMA's: computed in at least float32, cast back before the weight."""

    def forward(self, x):
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return h.type_as(x) * self.weight


CORRECT_RMS_NORMS = [RsqrtRMSNorm, VectorNormRMSNorm, UpcastRMSNorm]


class LayerNorm(FlattenLayerNorm):
    """The chapter's LayerNorm as a learner's notebook names it."""


class FunctionalDropoutResidual(nn.Module):
    """The course's LayerNorm; F.dropout with the module's training flag."""

    def __init__(self, sublayer, dim, dropout=0.0, norm_first=False):
        super().__init__()
        self.sublayer, self.p, self.norm_first = sublayer, dropout, norm_first
        self.norm = model.LayerNorm(dim)

    def forward(self, x):
        if self.norm_first:
            return x + F.dropout(self.sublayer(self.norm(x)), self.p, self.training)
        return self.norm(x + F.dropout(self.sublayer(x), self.p, self.training))


class HandMaskResidual(nn.Module):
    """Dropout written out as a Bernoulli mask on x's device: other random numbers than
    nn.Dropout's, which the training case must accept."""

    def __init__(self, sublayer, dim, dropout=0.0, norm_first=False):
        super().__init__()
        self.sublayer, self.p, self.norm_first = sublayer, dropout, norm_first
        self.norm = LayerNorm(dim)

    def drop(self, s):
        if not self.training or self.p == 0:
            return s
        return s * (torch.rand_like(s) >= self.p) / (1 - self.p)

    def forward(self, x):
        branch = self.drop(self.sublayer(self.norm(x) if self.norm_first else x))
        return x + branch if self.norm_first else self.norm(x + branch)


class OrderChosenAtInit(nn.Module):
    """Pre- or post-norm picked once in __init__; nn.Dropout."""

    def __init__(self, sublayer, dim, dropout=0.0, norm_first=False):
        super().__init__()
        self.sublayer, self.dropout = sublayer, nn.Dropout(dropout)
        self.norm = type("LayerNorm", (VarMeanLayerNorm,), {})(dim)
        self.step = self.pre_norm if norm_first else self.post_norm

    def pre_norm(self, x):
        return x + self.dropout(self.sublayer(self.norm(x)))

    def post_norm(self, x):
        return self.norm(x + self.dropout(self.sublayer(x)))

    def forward(self, x):
        return self.step(x)


CORRECT_RESIDUALS = [FunctionalDropoutResidual, HandMaskResidual, OrderChosenAtInit]

CORRECT = (
    [(LAYER_NORM, c) for c in CORRECT_LAYER_NORMS]
    + [(RMS_NORM, c) for c in CORRECT_RMS_NORMS]
    + [(RESIDUAL, c) for c in CORRECT_RESIDUALS]
)
CATALOGUE = [(e, m) for e in (LAYER_NORM, RMS_NORM, RESIDUAL) for m in e.mistakes]


@pytest.mark.parametrize("exercise, impl", CORRECT, ids=[i.__name__ for _, i in CORRECT])
def test_correct_variants_pass(exercise, impl):
    assert_passes(exercise, impl)


@pytest.mark.parametrize("exercise, mistake", CATALOGUE, ids=[m.id for _, m in CATALOGUE])
def test_each_catalogued_mistake_fails_and_is_named(exercise, mistake):
    assert_fails_and_is_named(exercise, mistake)


def test_mistake_ids_are_unique_across_the_chapter():
    ids = [m.id for _, m in CATALOGUE]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("layer_norm", [*CORRECT_LAYER_NORMS, model.LayerNorm])
def test_offset_tolerance_leaves_a_margin_and_catches_the_naive_variance(layer_norm):
    """Correct float32 variants stay within a fifth of offset_atol for rows near 1000; the naive
    E[x²] - E[x]² is off by over 100 times it."""

    def error(cls, x, params):
        module = ch5._layer_norm_of(32, params)(cls)
        return (module(x).double() - ch5.reference_layer_norm(x, 32, params, 1e-5)).abs().max()

    naive = ch5.LAYER_NORM_MISTAKE["naive_variance"].impl
    for seed in range(131, 141):
        x, params = randn(4, 6, 32, seed=seed) + 1000.0, ch5._ln_params(32, seed)
        assert error(layer_norm, x, params) <= ch5.offset_atol(1000.0) / 5
        assert error(naive, x, params) >= ch5.offset_atol(1000.0) * 100


def test_a_mistake_is_named_in_the_visible_feedback():
    with pytest.raises(AssertionError) as failure:
        ch5.check_layer_norm(ch5.LAYER_NORM_MISTAKE["eps_outside_sqrt"].impl)
    text = str(failure.value)
    assert "the hand-checkable example" in text and "LayerNorm(4, eps=0.75)" in text
    assert "expected: shape (1, 4), torch.float32, values [-1.061, -0.3536, 0.3536, 1.061]" in text
    assert "Likely mistake [eps_outside_sqrt]" in text and "inside the square root" in text


HIDDEN_FAILURES = [
    (LAYER_NORM, ch5.LAYER_NORM_MISTAKE["last_dim_only"]),
    (LAYER_NORM, ch5.LAYER_NORM_MISTAKE["naive_variance"]),
    (RMS_NORM, ch5.RMS_NORM_MISTAKE["rms_eps_outside_sqrt"]),
    (RESIDUAL, ch5.RESIDUAL_MISTAKE["dropout_on_sum"]),
]


@pytest.mark.parametrize(
    "exercise, mistake", HIDDEN_FAILURES, ids=[m.id for _, m in HIDDEN_FAILURES]
)
def test_hidden_feedback_shows_no_values(exercise, mistake):
    report = assert_hidden_failures_show_no_values(exercise, mistake.impl)
    assert mistake.id in report.mistakes


def test_dtype_is_kept():
    class Float32Out(VarMeanLayerNorm):
        def forward(self, x):
            return super().forward(x).float()

    report = LAYER_NORM.report(Float32Out, "hidden")
    messages = " ".join(r.message for r in report.results if r.status == FAILED)
    assert "dtype torch.float32, expected torch.float64" in messages


def test_a_wrong_layer_norm_inside_residual_points_to_exercise_1():
    class WrongNormResidual(FunctionalDropoutResidual):
        def __init__(self, sublayer, dim, dropout=0.0, norm_first=False):
            super().__init__(sublayer, dim, dropout, norm_first)
            self.norm = ch5.LAYER_NORM_MISTAKE["unbiased_variance"].impl(dim)

    report = RESIDUAL.report(WrongNormResidual)
    first = report.results[0]
    assert first.status == FAILED and "fix exercise 1 first" in first.message


def test_residual_with_a_renamed_norm_is_told_what_to_call_it():
    class NoNorm(FunctionalDropoutResidual):
        def __init__(self, sublayer, dim, dropout=0.0, norm_first=False):
            super().__init__(sublayer, dim, dropout, norm_first)
            self.ln = self.norm
            del self.norm

    report = RESIDUAL.report(NoNorm)
    assert "self.norm should be your LayerNorm(dim)" in report.results[0].message


def test_untouched_stubs_are_not_attempted_and_raise_not_implemented():
    class StubModule(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            raise NotImplementedError("replace this line with your code")

    for exercise in (LAYER_NORM, RMS_NORM, RESIDUAL):
        for report in reports(exercise, StubModule):
            assert report.not_attempted and not report.passed, str(report)
    with pytest.raises(NotImplementedError, match="not attempted yet"):
        ch5.check_residual(StubModule)


def test_meta_cases_run_here_and_cuda_only_when_present():
    expected = PASSED if "cuda" in available_devices() else SKIPPED
    for exercise, impl in ((LAYER_NORM, CentredLayerNorm), (RMS_NORM, UpcastRMSNorm),
                           (RESIDUAL, HandMaskResidual)):  # fmt: skip
        statuses = {r.case: r.status for r in exercise.report(impl, "hidden").results}
        assert statuses["creates nothing on the CPU (meta device)"] == PASSED
        assert statuses["runs on CUDA"] == expected


def test_the_cuda_cases_code_path_runs_here_on_the_cpu():
    """The CUDA cases only move tensors; run their code on the CPU so it is tested without a GPU."""
    ch5._ln_on_device("cpu")(Float64InsideLayerNorm, False)
    ch5._rms_on_device("cpu")(VectorNormRMSNorm, False)
    ch5._residual_on_device("cpu")(OrderChosenAtInit, False)
    with pytest.raises(AssertionError, match="Likely mistake|yours"):
        ch5._residual_on_device("cpu")(ch5.RESIDUAL_MISTAKE["pre_post_swapped"].impl, False)


def test_the_training_case_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    RESIDUAL.report(HandMaskResidual, "hidden")
    assert torch.equal(torch.rand(3), expected)


def test_report_is_plain_data():
    data = RMS_NORM.report(ch5.RMS_NORM_MISTAKE["rms_subtracts_mean"].impl).to_dict()
    assert data["exercise"] == "rms_norm"
    assert any(r["mistake"] == "rms_subtracts_mean" for r in data["results"])


class LayerNormThroughTorchOps(VarMeanLayerNorm):
    """nn.LayerNorm's own operator, reached as torch.ops.aten.layer_norm."""

    def forward(self, x):
        shape = list(self.normalized_shape)
        return torch.ops.aten.layer_norm(x, shape, self.weight, self.bias, self.eps)


def test_the_library_reached_through_torch_ops_is_named():
    report = LAYER_NORM.report(LayerNormThroughTorchOps)
    assert not report.passed and "calls_layer_norm" in report.mistakes, str(report)
