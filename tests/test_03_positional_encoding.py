"""The chapter 3 checks, proven both ways: every catalogued mistake fails and is named,
and implementations that differ from the reference but are correct all pass."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_course.checks import positional_encoding as ch3
from transformer_course.checks.core import FAILED, PASSED, SKIPPED, available_devices

from .proofs import (
    assert_fails_and_is_named,
    assert_hidden_failures_show_no_values,
    assert_passes,
    reports,
)

TABLE = ch3.SINUSOIDAL_POSITIONAL_ENCODING
ENCODING = ch3.SINUSOIDAL_POSITIONAL_ENCODING_MODULE
LEARNED = ch3.LEARNED_POSITIONAL_EMBEDDING
ROPE = ch3.APPLY_ROTARY_EMBEDDING


# ---- correct implementations written differently from the reference -------------------


def outer_stack_table(num_positions, dim):
    if dim % 2:
        raise ValueError("dim must be even")
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angle = torch.outer(torch.arange(num_positions).float(), inv_freq)
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)


def log_space_table(num_positions, dim):
    """PyTorch's tutorial: frequencies exp(-2i·ln(10000)/d), written into a zero table."""
    if dim % 2 != 0:
        raise ValueError(f"odd dim {dim}")
    position = torch.arange(num_positions).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(num_positions, dim)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def float64_then_cast_table(num_positions, dim, device=None, dtype=torch.float32):
    if dim % 2:
        raise ValueError("sin and cos come in pairs: dim must be even")
    pos = torch.arange(num_positions, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(dim // 2, dtype=torch.float64, device=device)
    angle = pos / torch.pow(10000.0, 2 * i / dim)
    table = torch.empty(num_positions, dim, dtype=torch.float64, device=device)
    table[:, ::2], table[:, 1::2] = angle.sin(), angle.cos()
    return table.to(dtype)


def polar_table(num_positions, dim):
    """cos + i·sin from torch.polar; flipping the (real, imaginary) pairs gives (sin, cos)."""
    if dim % 2:
        raise ValueError("dim must be even")
    omega = 10000.0 ** (-torch.arange(dim // 2) * 2.0 / dim)
    angle = torch.arange(num_positions)[:, None] * omega
    return torch.view_as_real(torch.polar(torch.ones_like(angle), angle)).flip(-1).flatten(-2)


CORRECT_TABLES = [outer_stack_table, log_space_table, float64_then_cast_table, polar_table]


class Float64TableBatchFirstBuffer(nn.Module):
    """Builds the table in float64, keeps it as a (1, max_len, dim) float32 buffer."""

    def __init__(self, dim, max_len=5000, dropout=0.0):
        super().__init__()
        self.p = dropout
        table = float64_then_cast_table(max_len, dim, dtype=torch.float64).float()
        self.register_buffer("encoding", table.unsqueeze(0))

    def forward(self, x):
        if x.size(1) > self.encoding.size(1):
            raise ValueError("sequence longer than max_len")
        return F.dropout(x + self.encoding[:, : x.size(1)].type_as(x), self.p, self.training)


class NarrowAndAdd(nn.Module):
    def __init__(self, dim, max_len=5000, dropout=0.0):
        super().__init__()
        self.drop = nn.Dropout(p=dropout)
        self.register_buffer("table", log_space_table(max_len, dim), persistent=True)

    def forward(self, x):
        length = x.shape[-2]
        if length > len(self.table):
            raise ValueError(f"{length} positions, but max_len is {len(self.table)}")
        return self.drop(x.add(self.table.narrow(0, 0, length).to(dtype=x.dtype)))


class MaskByHand(nn.Module):
    """Dropout written out as a Bernoulli mask, drawn on x's device."""

    def __init__(self, dim, max_len=5000, dropout=0.0):
        super().__init__()
        self.dropout = dropout
        self.register_buffer("pe", polar_table(max_len, dim))

    def forward(self, x):
        if x.shape[1] > self.pe.shape[0]:
            raise ValueError("too long")
        y = x + self.pe[: x.shape[1]].to(x.dtype)
        if not self.training or self.dropout == 0:
            return y
        keep = torch.rand_like(y) >= self.dropout
        return y * keep / (1 - self.dropout)


CORRECT_ENCODINGS = [Float64TableBatchFirstBuffer, NarrowAndAdd, MaskByHand]


class IndexTheWeight(nn.Module):
    """Takes the first L rows of the embedding's weight instead of looking positions up."""

    def __init__(self, max_len, dim):
        super().__init__()
        self.embedding = nn.Embedding(max_len, dim)

    def forward(self, x):
        if x.shape[1] > self.embedding.num_embeddings:
            raise ValueError("sequence longer than max_len")
        return x + self.embedding.weight[: x.shape[1]]


class Gpt2Style(nn.Module):
    """GPT-2's wpe: positions of shape (1, L), looked up with F.embedding."""

    def __init__(self, max_len, dim):
        super().__init__()
        self.max_len = max_len
        self.wpe = nn.Embedding(max_len, dim)

    def forward(self, x):
        if x.size(1) > self.max_len:
            raise ValueError(f"cannot go past {self.max_len} positions")
        positions = torch.arange(0, x.size(1), dtype=torch.long, device=x.device).unsqueeze(0)
        return torch.add(x, F.embedding(positions, self.wpe.weight))


class CopyPositionsToDevice(nn.Module):
    """Makes the positions on the CPU and copies them to x's device: slower, but correct."""

    def __init__(self, max_len, dim):
        super().__init__()
        self.table = nn.Embedding(max_len, dim)

    def forward(self, x):
        if x.shape[1] > self.table.num_embeddings:
            raise ValueError("too long")
        return x + self.table(torch.arange(x.shape[1]).to(x.device))


CORRECT_LEARNED = [IndexTheWeight, Gpt2Style, CopyPositionsToDevice]


def _angles(x, positions, dtype):
    d = x.shape[-1]
    if d % 2:
        raise ValueError("dim must be even")
    if positions is None:
        positions = torch.arange(x.shape[-2], device=x.device)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)
    return positions.to(dtype)[:, None] * inv_freq  # (L, d/2)


def complex_rope(x, positions=None):
    """Each pair as one complex number, multiplied by e^{iθ} from torch.polar."""
    angle = _angles(x, positions, torch.float64 if x.dtype == torch.float64 else torch.float32)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).flatten(-2)


def matrix_rope(x, positions=None):
    """A 2x2 rotation matrix per (position, pair), applied with einsum."""
    angle = _angles(x, positions, torch.float32).to(x.dtype)
    c, s = angle.cos(), angle.sin()
    rotation = torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)
    pairs = x.unflatten(-1, (-1, 2))  # (..., L, d/2, 2)
    return torch.einsum("lpij,...lpj->...lpi", rotation, pairs).flatten(-2)


def rotate_every_two_rope(x, positions=None):
    """GPT-J's layout: cos and sin repeated per pair, x·cos + rotate_every_two(x)·sin."""
    angle = _angles(x, positions, torch.float32)
    cos = angle.cos().repeat_interleave(2, dim=-1).to(x.dtype)
    sin = angle.sin().repeat_interleave(2, dim=-1).to(x.dtype)
    turned = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).reshape(x.shape)
    return x * cos + turned * sin


def float64_inside_rope(x, positions=None):
    angle = _angles(x, positions, torch.float64)
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    out[..., 0::2] = a * angle.cos() - b * angle.sin()
    out[..., 1::2] = a * angle.sin() + b * angle.cos()
    return out.to(x.dtype)


CORRECT_ROPE = [complex_rope, matrix_rope, rotate_every_two_rope, float64_inside_rope]


CORRECT = (
    [(TABLE, f) for f in CORRECT_TABLES]
    + [(ENCODING, c) for c in CORRECT_ENCODINGS]
    + [(LEARNED, c) for c in CORRECT_LEARNED]
    + [(ROPE, f) for f in CORRECT_ROPE]
)
CATALOGUE = [
    (exercise, m) for exercise in (TABLE, ENCODING, LEARNED, ROPE) for m in exercise.mistakes
]


@pytest.mark.parametrize("exercise, impl", CORRECT, ids=[i.__name__ for _, i in CORRECT])
def test_correct_variants_pass(exercise, impl):
    assert_passes(exercise, impl)


@pytest.mark.parametrize("exercise, mistake", CATALOGUE, ids=[m.id for _, m in CATALOGUE])
def test_each_catalogued_mistake_fails_and_is_named(exercise, mistake):
    assert_fails_and_is_named(exercise, mistake)


def test_mistake_ids_are_unique_across_the_chapter():
    ids = [m.id for _, m in CATALOGUE]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("table", CORRECT_TABLES, ids=[f.__name__ for f in CORRECT_TABLES])
def test_tolerance_leaves_a_margin_for_correct_float32_tables(table):
    """table_atol is at least twice the error of every correct float32 variant, at every size
    the checks use; mistakes are orders of magnitude further off (see the catalogue tests)."""
    for n, dim in ((50, 16), (512, 64), (2048, 512), (4096, 64), (10000, 8), (10000, 128)):
        error = (table(n, dim).double() - ch3.reference_table(n, dim)).abs().max().item()
        assert error <= ch3.table_atol(n - 1) / 2, (n, dim, error)


def test_a_mistake_is_named_in_the_visible_feedback():
    halves = ch3.TABLE_MISTAKE["halves_not_interleaved"].impl
    with pytest.raises(AssertionError) as failure:
        ch3.check_sinusoidal_positional_encoding(halves)
    text = str(failure.value)
    assert "the hand-checkable table" in text and "row 0 (position 0)" in text
    assert "yours:" in text and "values [0, 0, 1, 1]" in text  # shown: the case is visible
    assert "expected:" in text and "values [0, 1, 0, 1]" in text
    assert "Likely mistake [halves_not_interleaved]" in text and "interleaves" in text


HIDDEN_FAILURES = [
    (TABLE, ch3.TABLE_MISTAKE["multiplied_not_divided"]),
    (ENCODING, ch3.ENCODING_MISTAKE["sequence_first"]),
    (LEARNED, ch3.LEARNED_MISTAKE["learned_positions_from_one"]),
    (ROPE, ch3.ROPE_MISTAKE["rope_halves"]),
]


@pytest.mark.parametrize(
    "exercise, mistake", HIDDEN_FAILURES, ids=[m.id for _, m in HIDDEN_FAILURES]
)
def test_hidden_feedback_shows_no_values(exercise, mistake):
    assert_hidden_failures_show_no_values(exercise, mistake.impl)


def test_dtype_is_kept():
    def to_float32(x, positions=None):
        return complex_rope(x, positions).float()

    report = ROPE.report(to_float32, "hidden")
    messages = " ".join(r.message for r in report.results if r.status == FAILED)
    assert "dtype torch.float32, expected torch.float64" in messages


def test_untouched_stubs_are_not_attempted_and_raise_not_implemented():
    def stub(num_positions, dim):
        raise NotImplementedError("sinusoidal_positional_encoding: replace this line")

    class StubModule(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            raise NotImplementedError("replace this line with your code")

    for exercise, impl in ((TABLE, stub), (ENCODING, StubModule), (LEARNED, StubModule)):
        for report in reports(exercise, impl):
            assert report.not_attempted and not report.passed, str(report)
    with pytest.raises(NotImplementedError, match="not attempted yet"):
        ch3.check_learned_positional_embedding(StubModule)


def test_meta_cases_run_here_and_cuda_only_when_present():
    expected = PASSED if "cuda" in available_devices() else SKIPPED
    for exercise, impl in ((ENCODING, NarrowAndAdd), (LEARNED, Gpt2Style), (ROPE, complex_rope)):
        statuses = {r.case: r.status for r in exercise.report(impl, "hidden").results}
        assert statuses["creates nothing on the CPU (meta device)"] == PASSED
        assert statuses["runs on CUDA"] == expected


def test_the_cuda_cases_code_path_runs_here_on_the_cpu():
    """The CUDA cases only move tensors; run their code on the CPU so it is tested without a GPU."""
    ch3._encoding_on_device("cpu")(MaskByHand, False)
    ch3._learned_on_device("cpu")(IndexTheWeight, False)
    ch3._rope_on_device("cpu")(matrix_rope, False)
    with pytest.raises(AssertionError, match="Likely mistake|yours"):
        ch3._rope_on_device("cpu")(ch3.ROPE_MISTAKE["rope_positions_ignored"].impl, False)


def test_report_is_plain_data():
    data = ENCODING.report(ch3.ENCODING_MISTAKE["parameter_not_buffer"].impl).to_dict()
    assert data["exercise"] == "sinusoidal_positional_encoding_module"
    assert any(r["mistake"] == "parameter_not_buffer" for r in data["results"])
