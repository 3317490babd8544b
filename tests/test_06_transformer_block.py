"""The chapter 6 checks, proven both ways: every catalogued mistake fails and is named,
and implementations that differ from the reference but are correct all pass."""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_course import model
from transformer_course.checks import transformer_block as ch6
from transformer_course.checks.core import CheckFailed
from transformer_course.data import sorting_batch

from .proofs import (
    assert_fails_and_is_named,
    assert_meta_case_judges_only_where_the_data_is,
    assert_passes,
)

# ---- correct implementations written differently from the reference -------------------


class SublayerBlock(nn.Module):
    """One helper applies either norm placement around any sublayer."""

    def __init__(self, embed_dim, num_heads, ff_hidden_dim, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.attention = model.MultiHeadAttention(embed_dim, num_heads, dropout)
        self.norm1, self.norm2 = model.LayerNorm(embed_dim), model.LayerNorm(embed_dim)
        self.ff = model.FeedForward(embed_dim, ff_hidden_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def sublayer(self, x, norm, fn):
        if self.norm_first:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))

    def forward(self, x, mask=None):
        x = self.sublayer(x, self.norm1, lambda h: self.attention(h, h, h, mask)[0])
        return self.sublayer(x, self.norm2, self.ff)


class FunctionalDropoutBlock(SublayerBlock):
    """F.dropout with training=self.training instead of the dropout module's own flag."""

    def forward(self, x, mask=None):
        p = self.dropout.p
        if self.norm_first:
            h = self.norm1(x)
            x = x + F.dropout(self.attention(h, h, h, mask)[0], p, self.training)
            return x + F.dropout(self.ff(self.norm2(x)), p, self.training)
        x = self.norm1(x + F.dropout(self.attention(x, x, x, mask)[0], p, self.training))
        return self.norm2(x + F.dropout(self.ff(x), p, self.training))


class ReducedEncoder(nn.Module):
    """functools.reduce over the blocks, and an identity as the post-norm 'final norm'."""

    def __init__(self, num_layers, embed_dim, num_heads, ff_hidden_dim, dropout=0.1,
                 norm_first=False):  # fmt: skip
        super().__init__()
        self.layers = nn.ModuleList(
            [SublayerBlock(embed_dim, num_heads, ff_hidden_dim, dropout, norm_first)
             for _ in range(num_layers)]
        )  # fmt: skip
        self.norm = model.LayerNorm(embed_dim) if norm_first else nn.Identity()

    def forward(self, x, mask=None):
        return self.norm(functools.reduce(lambda h, layer: layer(h, mask), self.layers, x))


class SinusoidalSortingModel(nn.Module):
    """Fixed sinusoidal positions, a post-norm encoder of 3 layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.positions = model.SinusoidalPositionalEncoding(64, max_len=8)
        self.encoder = ReducedEncoder(3, 64, 4, 128, dropout=0.0)
        self.head = nn.Linear(64, 10)

    def forward(self, tokens):
        return self.head(self.encoder(self.positions(self.embed(tokens))))


def train_with_adam_constant_lr(net, num_steps):
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(num_steps):
        tokens, targets = (t.to(net.head.weight.device) for t in sorting_batch(256))
        loss = F.cross_entropy(net(tokens).transpose(1, 2), targets)  # (B, C, L) layout
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


CORRECT = [
    (ch6.TRANSFORMER_BLOCK, SublayerBlock),
    (ch6.TRANSFORMER_BLOCK, FunctionalDropoutBlock),
    (ch6.TRANSFORMER_ENCODER, ReducedEncoder),
    (ch6.SORTING_MODEL, SinusoidalSortingModel),
]
CATALOGUE = (
    [(ch6.TRANSFORMER_BLOCK, m) for m in ch6.BLOCK_MISTAKES]
    + [(ch6.TRANSFORMER_ENCODER, m) for m in ch6.ENCODER_MISTAKES]
    + [(ch6.SORTING_MODEL, m) for m in ch6.SORTING_MODEL_MISTAKES]
)


@pytest.mark.parametrize("exercise, impl", CORRECT, ids=[i.__name__ for _, i in CORRECT])
def test_correct_variants_pass(exercise, impl):
    assert_passes(exercise, impl)


@pytest.mark.parametrize(
    "exercise, mistake", CATALOGUE, ids=[f"{e.id}-{m.id}" for e, m in CATALOGUE]
)
def test_each_catalogued_mistake_fails_and_is_named(exercise, mistake):
    assert_fails_and_is_named(exercise, mistake)


@pytest.mark.slow
def test_another_correct_training_loop_reaches_the_target():
    """Constant-rate Adam, bigger batches, a (B, C, L) loss and a sinusoidal post-norm model;
    the reference loop and model are tested in test_model.py."""
    report = ch6.TRAIN_SORTING_MODEL.report((train_with_adam_constant_lr, SinusoidalSortingModel))
    assert report.passed, str(report)


OFF_DEVICE = ch6.TRAIN_MISTAKE["batches_off_the_model_device"]  # right on a CPU: meta shows it


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [m for m in ch6.TRAIN_MISTAKES if m is not OFF_DEVICE],
                         ids=lambda m: m.id)  # fmt: skip
def test_each_training_mistake_fails_and_is_named(mistake):
    report = ch6.TRAIN_SORTING_MODEL.report((mistake.impl, SinusoidalSortingModel))
    assert not report.passed and report.mistakes == [mistake.id], str(report)


def test_the_meta_case_names_batches_left_on_the_cpu_and_passes_every_other_loop():
    assert_meta_case_judges_only_where_the_data_is(
        ch6.TRAIN_SORTING_MODEL, OFF_DEVICE, SinusoidalSortingModel, [train_with_adam_constant_lr]
    )


def test_the_cuda_training_case_names_batches_left_on_the_cpu_here_on_meta():
    """On meta as on CUDA, PyTorch refuses the CPU batches; the case must say why."""
    with pytest.raises(CheckFailed, match="model on meta") as failure:
        ch6._trained(0, 900, device="meta")((OFF_DEVICE.impl, SinusoidalSortingModel), False)
    assert failure.value.mistake is OFF_DEVICE


def test_the_cuda_cases_code_path_runs_here_on_the_cpu():
    ch6._block_on_device("cpu")(SublayerBlock, False)
    with pytest.raises(AssertionError, match="Likely mistake|yours"):
        ch6._block_on_device("cpu")(ch6._NormsSwapped, False)
    ch6._encoder_on_device("cpu")(ReducedEncoder, False)
    (mask_dropped,) = [m for m in ch6.ENCODER_MISTAKES if m.id == "mask_not_passed_on"]
    with pytest.raises(CheckFailed) as failure:
        ch6._encoder_on_device("cpu")(mask_dropped.impl, False)
    assert failure.value.mistake is mask_dropped
    ch6._sorting_model_on_device("cpu")(SinusoidalSortingModel, False)
