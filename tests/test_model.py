"""Every reference component in transformer_course.model passes its exercise's checks."""

import pytest

from transformer_course import model
from transformer_course.checks import EXERCISES

# exercise id -> the reference component that answers it
REFERENCES = {
    "scaled_dot_product_attention": model.scaled_dot_product_attention,
    "self_attention": model.SelfAttention,
    "split_heads": model.split_heads,
    "merge_heads": model.merge_heads,
    "multi_head_attention": model.MultiHeadAttention,
    "sinusoidal_positional_encoding": model.sinusoidal_positional_encoding,
    "sinusoidal_positional_encoding_module": model.SinusoidalPositionalEncoding,
    "learned_positional_embedding": model.LearnedPositionalEmbedding,
    "apply_rotary_embedding": model.apply_rotary_embedding,
}


def test_every_exercise_has_a_reference():
    assert sorted(REFERENCES) == sorted(EXERCISES)


@pytest.mark.parametrize("exercise", sorted(REFERENCES))
@pytest.mark.parametrize("suite", ["visible", "hidden"])
def test_reference_passes_its_checks(exercise, suite):
    report = EXERCISES[exercise].report(REFERENCES[exercise], suite)
    assert report.passed, str(report)
