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


# Chapter 2: multi-head attention


def split_heads(x, num_heads):
    """(B, L, E) -> (B, H, L, E // H): head h gets features h·d .. (h+1)·d - 1."""
    B, L, E = x.shape
    return x.view(B, L, num_heads, E // num_heads).transpose(1, 2)  # (B, H, L, d)


def merge_heads(x):
    """(B, H, L, d) -> (B, L, H·d), the inverse of split_heads."""
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)  # (B, L, E)


class MultiHeadAttention(nn.Module):
    """H heads of width E / H side by side, mixed by out_proj; batch first, True = may attend."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, key, value, mask=None):
        q = split_heads(self.q_proj(query), self.num_heads)  # (B, H, Lq, d)
        k = split_heads(self.k_proj(key), self.num_heads)  # (B, H, Lk, d)
        v = split_heads(self.v_proj(value), self.num_heads)  # (B, H, Lk, d)
        out, weights = scaled_dot_product_attention(q, k, v, mask)  # (B, H, Lq, d)
        if self.training and self.dropout.p > 0:
            out = self.dropout(weights) @ v  # weights are returned as computed, before dropout
        return self.out_proj(merge_heads(out)), weights  # (B, Lq, E), (B, H, Lq, Lk)


# Chapter 3: positional encoding


def sinusoidal_positional_encoding(num_positions, dim, device=None, dtype=torch.float32):
    """The (num_positions, dim) table PE[p, 2i] = sin(p ω_i), PE[p, 2i+1] = cos(p ω_i), with
    ω_i = 10000^(-2i/dim); dim must be even."""
    if dim % 2 != 0:
        raise ValueError(f"dim must be even, since sines and cosines come in pairs; got {dim}")
    position = torch.arange(num_positions, device=device, dtype=dtype)  # (P,)
    omega = 10000.0 ** (-torch.arange(0, dim, 2, device=device, dtype=dtype) / dim)  # (dim/2,)
    angle = position[:, None] * omega  # (P, dim/2)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)  # (P, dim), interleaved


class SinusoidalPositionalEncoding(nn.Module):
    """dropout(x + PE[:L]) for x (B, L, dim); the table is a buffer of max_len rows."""

    def __init__(self, dim, max_len=5000, dropout=0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoidal_positional_encoding(max_len, dim))  # (max_len, dim)

    def forward(self, x):
        length, max_len = x.size(1), self.pe.size(0)
        if length > max_len:
            raise ValueError(f"sequence length {length} is longer than max_len={max_len}")
        return self.dropout(x + self.pe[:length].to(x.dtype))  # (B, L, dim)


class LearnedPositionalEmbedding(nn.Module):
    """x + embedding(0, 1, ..., L-1) for x (B, L, dim): a trained vector per position."""

    def __init__(self, max_len, dim):
        super().__init__()
        self.embedding = nn.Embedding(max_len, dim)  # (max_len, dim) weight

    def forward(self, x):
        length, max_len = x.size(1), self.embedding.num_embeddings
        if length > max_len:
            raise ValueError(f"sequence length {length} is longer than max_len={max_len}")
        return x + self.embedding(torch.arange(length, device=x.device))  # (B, L, dim)


def apply_rotary_embedding(x, positions=None):
    """RoPE: rotates each pair (x[..., 2i], x[..., 2i+1]) of x (..., L, dim) by the angle
    positions[l] · ω_i, ω_i = 10000^(-2i/dim); positions (L,) default to 0, 1, ..., L-1."""
    length, dim = x.shape[-2:]
    if dim % 2 != 0:
        raise ValueError(f"dim must be even, since dimensions are rotated in pairs; got {dim}")
    if positions is None:
        positions = torch.arange(length, device=x.device)  # (L,)
    dtype = torch.promote_types(x.dtype, torch.float32)  # angles in at least float32
    omega = 10000.0 ** (-torch.arange(0, dim, 2, device=x.device, dtype=dtype) / dim)  # (dim/2,)
    angle = positions.to(x.device, dtype)[:, None] * omega  # (L, dim/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]  # (..., L, dim/2) each
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)  # (..., L, dim)
