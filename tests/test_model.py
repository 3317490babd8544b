"""Every reference component in transformer_course.model passes its exercise's checks, and
an answer that merely runs it earns nothing."""

import pytest
import torch.nn as nn

from transformer_course import model
from transformer_course.checks import EXERCISES


def test_every_exercise_has_a_reference_in_model():
    for exercise in EXERCISES.values():
        parts = (
            exercise.reference if isinstance(exercise.reference, tuple) else (exercise.reference,)
        )
        assert all(p.__module__ == "transformer_course.model" for p in parts), exercise.id


@pytest.mark.parametrize("exercise", sorted(EXERCISES))
@pytest.mark.parametrize("suite", ["visible", "hidden"])
def test_reference_passes_its_checks(exercise, suite):
    ex = EXERCISES[exercise]
    report = ex.report(ex.reference, suite, reference_allowed=True)
    assert report.passed, str(report)


def wrapped_split_heads(x, num_heads):
    return model.split_heads(x, num_heads)


class SubclassedAttention(model.MultiHeadAttention):
    pass


class EncoderOfReferenceBlocks(nn.Module):
    def __init__(self, num_layers, embed_dim, num_heads, ff_hidden_dim, dropout=0.1,
                 norm_first=False):  # fmt: skip
        super().__init__()
        self.layers = nn.ModuleList(
            model.TransformerBlock(embed_dim, num_heads, ff_hidden_dim, dropout, norm_first)
            for _ in range(num_layers)
        )
        self.norm = model.LayerNorm(embed_dim) if norm_first else None

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x if self.norm is None else self.norm(x)


@pytest.mark.parametrize(
    "exercise, answer",
    [
        ("split_heads", model.split_heads),
        ("split_heads", wrapped_split_heads),
        ("multi_head_attention", SubclassedAttention),
        ("transformer_encoder", EncoderOfReferenceBlocks),
        ("layer_norm", model.LayerNorm),
    ],
    ids=["imported", "wrapped", "subclassed", "built_of_reference_blocks", "imported_class"],
)
def test_an_answer_that_runs_the_reference_earns_nothing(exercise, answer):
    report = EXERCISES[exercise].report(answer)
    assert not report.passed and "uses_reference" in report.mistakes, str(report)


class AttentionFromEarlierParts(nn.Module):
    """Chapter 2's module from the course's chapter 1 and 2 functions: allowed."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        self.h, self.dropout = num_heads, nn.Dropout(dropout)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(embed_dim, embed_dim, bias=bias) for _ in range(4)
        )

    def forward(self, query, key, value, mask=None):
        q, k, v = (
            model.split_heads(proj(t), self.h)
            for proj, t in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value))
        )
        out, weights = model.scaled_dot_product_attention(q, k, v, mask)
        if self.training:
            out = self.dropout(weights) @ v
        return self.out_proj(model.merge_heads(out)), weights


def test_earlier_components_of_the_course_may_be_used():
    for suite in ("visible", "hidden"):
        report = EXERCISES["multi_head_attention"].report(AttentionFromEarlierParts, suite)
        assert report.passed, str(report)
