"""Checks for every exercise, by id: the one engine behind notebook tests, tests and grading."""

from .core import Exercise, Report
from .feed_forward import FEED_FORWARD
from .multi_head_attention import MERGE_HEADS, MULTI_HEAD_ATTENTION, SPLIT_HEADS
from .norms_and_residuals import LAYER_NORM, RESIDUAL, RMS_NORM
from .positional_encoding import (
    APPLY_ROTARY_EMBEDDING,
    LEARNED_POSITIONAL_EMBEDDING,
    SINUSOIDAL_POSITIONAL_ENCODING,
    SINUSOIDAL_POSITIONAL_ENCODING_MODULE,
)
from .self_attention import SCALED_DOT_PRODUCT_ATTENTION, SELF_ATTENTION
from .transformer_block import (
    SORTING_MODEL,
    TRAIN_SORTING_MODEL,
    TRANSFORMER_BLOCK,
    TRANSFORMER_ENCODER,
)
from .vision_transformer import (
    PATCH_EMBEDDING,
    PATCHIFY,
    TRAIN_VISION_TRANSFORMER,
    VISION_TRANSFORMER,
)

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
        FEED_FORWARD,
        LAYER_NORM,
        RMS_NORM,
        RESIDUAL,
        TRANSFORMER_BLOCK,
        TRANSFORMER_ENCODER,
        SORTING_MODEL,
        TRAIN_SORTING_MODEL,
        PATCHIFY,
        PATCH_EMBEDDING,
        VISION_TRANSFORMER,
        TRAIN_VISION_TRANSFORMER,
    )
}

__all__ = ["EXERCISES", "Exercise", "Report"]
