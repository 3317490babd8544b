"""Reference components of the course, one per exercise, in the order the chapters build them.

Later chapters' pages import earlier components from here, and a learner can swap in their
own. The course's tests run every component through its exercise's checks. A graded answer
that imports from this module instead of implementing the exercise earns nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def scaled_dot_product_attention(q, k, v, mask=None):
    """softmax(q kᵀ / √d_k) v over any leading dimensions; returns (output, weights).

    q: (..., Lq, d_k), k: (..., Lk, d_k), v: (..., Lk, d_v); mask: bool, broadcastable to
    (..., Lq, Lk), True = may attend. A query with no allowed key gets zero weights and output.
    """
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (..., Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)  # softmax of an all -inf row is NaN
    return weights @ v, weights  # (..., Lq, d_v), (..., Lq, Lk)


class SelfAttention(nn.Module):
    """One head of self-attention: q, k and v are three projections of the same x (B, L, E)."""

    def __init__(self, embed_dim, bias=True):
        super().__init__()
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x, mask=None):
        return scaled_dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), mask)
