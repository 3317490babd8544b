"""Checks for every exercise, by id: the one engine behind notebook tests, tests and grading."""

from .core import Exercise, Report
from .multi_head_attention import MERGE_HEADS, MULTI_HEAD_ATTENTION, SPLIT_HEADS
from .positional_encoding import (
    APPLY_ROTARY_EMBEDDING,
    LEARNED_POSITIONAL_EMBEDDING,
    SINUSOIDAL_POSITIONAL_ENCODING,
    SINUSOIDAL_POSITIONAL_ENCODING_MODULE,
)
from .self_attention import SCALED_DOT_PRODUCT_ATTENTION, SELF_ATTENTION

EXERCISES: dict[str, Exercise] = {
    exercise.id: exercise
    for exercise in (
        SCALED_DOT_PRODUCT_ATTENTION,
        SELF_ATTENTION,
        SPLIT_HEADS,
        MERGE_HEADS,
        MULTI_HEAD_ATTENTION,
        SINUSOIDAL_POSITIONAL_ENCODING,
        SINUSOIDAL_POSITIONAL_ENCODING_MODULE,
        LEARNED_POSITIONAL_EMBEDDING,
        APPLY_ROTARY_EMBEDDING,
    )
}

__all__ = ["EXERCISES", "Exercise", "Report"]
