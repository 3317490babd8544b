"""The chapter 4 checks, proven both ways: every catalogued mistake fails and is named,
and implementations that differ from the reference but are correct all pass."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_course.checks import feed_forward as ch4
from transformer_course.checks.core import (
    FAILED,
    PASSED,
    SKIPPED,
    CheckFailed,
    available_devices,
)

from .proofs import (
    assert_fails_and_is_named,
    assert_hidden_failures_show_no_values,
    assert_passes,
    reports,
)

FEED_FORWARD = ch4.FEED_FORWARD


# ---- correct implementations written differently from the reference -------------------


class FunctionalWeights(nn.Module):
    """F.linear on the layers' own weights, F.dropout with training=self.training."""

    FUNCTIONS = {"relu": F.relu, "gelu": F.gelu}

    def __init__(self, embed_dim, hidden_dim, dropout=0.0, activation="relu"):
        super().__init__()
        if activation not in self.FUNCTIONS:
            raise ValueError(f"unknown activation {activation!r}")
        self.act, self.p = self.FUNCTIONS[activation], dropout
        self.linear1 = nn.Linear(embed_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x):
        h = self.act(F.linear(x, self.linear1.weight, self.linear1.bias))
        h = F.dropout(h, p=self.p, training=self.training)
        return F.linear(h, self.linear2.weight, self.linear2.bias)


class SequentialAliases(nn.Module):
    """One nn.Sequential, with linear1 and linear2 as aliases of its first and last layers."""

    def __init__(self, embed_dim, hidden_dim, dropout=0.0, activation="relu"):
        super().__init__()
        modules = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in modules:
            raise ValueError(f"activation must be one of {list(modules)}")
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim),
            modules[activation](),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, embed_dim),
        )
        self.linear1, self.linear2 = self.net[0], self.net[-1]

    def forward(self, x):
        return self.net(x)


class EinsumHandMask(nn.Module):
    """einsum on the weights, GELU written with erf, dropout as a mask drawn on x's device."""

    def __init__(self, embed_dim, hidden_dim, dropout=0.0, activation="relu"):
        super().__init__()
        if activation.lower() not in ("relu", "gelu"):
            raise ValueError("activation: 'relu' or 'gelu'")
        self.gelu, self.p = activation.lower() == "gelu", dropout
        self.linear1 = nn.Linear(embed_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x):
        h = torch.einsum("...e,he->...h", x, self.linear1.weight) + self.linear1.bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2))) if self.gelu else h.clamp(min=0)
        if self.training and self.p > 0:
            h = h * (torch.rand_like(h) >= self.p) / (1 - self.p)
        return torch.einsum("...h,eh->...e", h, self.linear2.weight) + self.linear2.bias


class FlattenPositions(nn.Module):
    """All positions as the rows of one matrix, through addmm, then back to x's shape."""

    def __init__(self, embed_dim, hidden_dim, dropout=0.0, activation="relu"):
        super().__init__()
        if activation == "relu":
            self.activation = nn.ReLU()
        elif activation == "gelu":
            self.activation = nn.GELU(approximate="none")
        else:
            raise ValueError(f"{activation} is not supported")
        self.linear1 = nn.Linear(embed_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, embed_dim)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])  # (N, E): every position of every sequence
        h = torch.addmm(self.linear1.bias, rows, self.linear1.weight.t())
        h = self.dropout(self.activation(h))
        return torch.addmm(self.linear2.bias, h, self.linear2.weight.t()).reshape(x.shape)


CORRECT = [FunctionalWeights, SequentialAliases, EinsumHandMask, FlattenPositions]


@pytest.mark.parametrize("impl", CORRECT, ids=[c.__name__ for c in CORRECT])
def test_correct_variants_pass(impl):
    assert_passes(FEED_FORWARD, impl)


@pytest.mark.parametrize("mistake", ch4.MISTAKES, ids=[m.id for m in ch4.MISTAKES])
def test_each_catalogued_mistake_fails_and_is_named(mistake):
    assert_fails_and_is_named(FEED_FORWARD, mistake)


def test_mistake_ids_are_unique():
    ids = [m.id for m in ch4.MISTAKES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("impl", CORRECT, ids=[c.__name__ for c in CORRECT])
def test_tolerance_leaves_a_margin(impl):
    """Correct float32 variants stay within a fifth of the tolerance of PyTorch at every shape
    the checks use, while GELU's tanh approximation, the nearest mistake, is 10x beyond it."""
    atol, _ = ch4.TOLERANCE[torch.float32]
    for i, (shape, h) in enumerate(ch4.SHAPES):
        x = ch4.randn(*shape, seed=410 + i)
        for activation in ch4.ACTIVATIONS:
            yours, expected, _ = ch4._run(impl, x, h, activation)
            assert (yours - expected).abs().max().item() <= atol / 5, (shape, h, activation)
        tanh, expected, _ = ch4._run(ch4.MISTAKE["gelu_tanh_approximation"].impl, x, h, "gelu")
        assert (tanh - expected).abs().max().item() >= 10 * atol, (shape, h)


def test_dropout_before_relu_is_the_same_function():
    """Why the training case uses GELU: relu(2·m·h) = 2·m·relu(h) for a 0/1 mask m, so with ReLU
    dropout before the activation is not a mistake at all."""
    x, weights = ch4.randn(4, 10, 16, seed=1), ch4._weights(16, 8, 1)
    outs = []
    for cls in (ch4._CataloguedFeedForward, ch4.MISTAKE["dropout_before_activation"].impl):
        torch.manual_seed(0)
        outs.append(ch4._build(cls, 16, 8, weights, dropout=0.5).train()(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)


def test_a_mistake_is_named_in_the_visible_feedback():
    with pytest.raises(AssertionError) as failure:
        ch4.check_feed_forward(ch4.MISTAKE["gelu_tanh_approximation"].impl)
    text = str(failure.value)
    assert "agrees with PyTorch (exact GELU)" in text and "activation='gelu'" in text
    assert "yours:" in text and "expected:" in text and "values [" in text  # the case is visible
    assert "Likely mistake [gelu_tanh_approximation]" in text and "erf" in text


HIDDEN_FAILURES = ["dropout_after_linear2", "dropout_before_activation", "assumes_3d_input"]


@pytest.mark.parametrize("mistake", HIDDEN_FAILURES)
def test_hidden_feedback_shows_no_values(mistake):
    report = assert_hidden_failures_show_no_values(FEED_FORWARD, ch4.MISTAKE[mistake].impl)
    assert mistake in report.mistakes


def test_dtype_is_kept():
    class ToFloat32(FunctionalWeights):
        def forward(self, x):
            return super().forward(x).float()

    report = FEED_FORWARD.report(ToFloat32, "hidden")
    messages = " ".join(r.message for r in report.results if r.status == FAILED)
    assert "dtype torch.float32, expected torch.float64" in messages


def test_untouched_stub_is_not_attempted_and_raises_not_implemented():
    class Stub(nn.Module):
        def __init__(self, embed_dim, hidden_dim, dropout=0.0, activation="relu"):
            super().__init__()
            raise NotImplementedError("feed_forward: replace with your code")

    for report in reports(FEED_FORWARD, Stub):
        assert report.not_attempted and not report.passed, str(report)
    with pytest.raises(NotImplementedError, match="not attempted yet"):
        ch4.check_feed_forward(Stub)


def test_meta_case_runs_here_and_cuda_only_when_present():
    expected = PASSED if "cuda" in available_devices() else SKIPPED
    statuses = {r.case: r.status for r in FEED_FORWARD.report(EinsumHandMask, "hidden").results}
    assert statuses["creates nothing on the CPU (meta device)"] == PASSED
    assert statuses["runs on CUDA"] == expected


def test_the_cuda_cases_code_path_runs_here_on_the_cpu():
    """The CUDA case only moves tensors; run its code on the CPU so it is tested without a GPU."""
    ch4._on_device("cpu")(SequentialAliases, False)
    ch4._on_device("cpu")(EinsumHandMask, False)
    with pytest.raises(CheckFailed) as failure:
        ch4._on_device("cpu")(ch4.MISTAKE["dropout_after_linear2"].impl, False)
    assert failure.value.mistake is ch4.MISTAKE["dropout_after_linear2"]


def test_report_is_plain_data():
    data = FEED_FORWARD.report(ch4.MISTAKE["no_activation"].impl).to_dict()
    assert data["exercise"] == "feed_forward"
    assert any(r["mistake"] == "no_activation" for r in data["results"])
