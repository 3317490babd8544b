"""The chapter 2 checks, proven both ways: every catalogued mistake fails and is named,
and implementations that differ from the reference but are correct all pass."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_course.checks import multi_head_attention as ch2

from .proofs import assert_fails_and_is_named, assert_passes

# ---- correct implementations written differently from the reference -------------------


def split_by_chunks(x, num_heads):
    return torch.stack(x.chunk(num_heads, dim=-1), dim=1)


def split_by_unflatten(x, num_heads):
    return x.unflatten(-1, (num_heads, -1)).permute(0, 2, 1, 3)


def split_contiguous(x, num_heads):
    b, length, _ = x.shape
    return x.reshape(b, length, num_heads, -1).swapaxes(1, 2).contiguous()


def merge_by_cat(x):
    return torch.cat(x.unbind(1), dim=-1)


def merge_by_flatten(x):
    return x.permute(0, 2, 1, 3).flatten(2)


def merge_contiguous_view(x):
    b, _, length, _ = x.shape
    return x.transpose(1, 2).contiguous().view(b, length, -1)


class _Projections(nn.Module):
    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError("embed_dim must be a multiple of num_heads")
        self.h, self.p = num_heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(embed_dim, embed_dim, bias=bias) for _ in range(4)
        )


class PerHeadLoop(_Projections):
    """One head at a time, on slices of the projections' outputs."""

    def forward(self, query, key, value, mask=None):
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        d = q.shape[-1] // self.h
        b, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        mask = None if mask is None else mask.expand(b, self.h, lq, lk)
        outs, weights = [], []
        for h in range(self.h):
            cols = slice(h * d, (h + 1) * d)
            scores = q[..., cols] @ k[..., cols].mT / d**0.5  # (B, Lq, Lk)
            if mask is not None:
                scores = scores.masked_fill(~mask[:, h], float("-inf"))
            w = scores.softmax(-1).nan_to_num(0.0)
            outs.append(F.dropout(w, self.p, self.training) @ v[..., cols])
            weights.append(w)
        return self.out_proj(torch.cat(outs, -1)), torch.stack(weights, 1)


class FlatBatchHeads(_Projections):
    """Heads folded into the batch, (B·H, L, d), with baddbmm, as PyTorch does internally."""

    def forward(self, query, key, value, mask=None):
        b, lq, e = query.shape
        lk, d = key.shape[1], e // self.h

        def fold(t, length):
            return t.view(b, length, self.h, d).transpose(1, 2).reshape(b * self.h, length, d)

        q, k, v = (
            fold(self.q_proj(query), lq),
            fold(self.k_proj(key), lk),
            fold(self.v_proj(value), lk),
        )
        bias = torch.zeros(b * self.h, lq, lk, dtype=q.dtype, device=q.device)
        if mask is not None:
            allowed = mask.expand(b, self.h, lq, lk).reshape(b * self.h, lq, lk)
            bias = bias.masked_fill(~allowed, float("-inf"))
        w = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=d**-0.5).softmax(-1)  # (B·H, Lq, Lk)
        out = torch.bmm(F.dropout(w, self.p, self.training), v)  # (B·H, Lq, d)
        out = out.view(b, self.h, lq, d).transpose(1, 2).reshape(b, lq, e)
        return self.out_proj(out), w.view(b, self.h, lq, lk)


class EinsumWeights(_Projections):
    """Per-head projection weights viewed as (H, d, E) and applied with einsum."""

    def forward(self, query, key, value, mask=None):
        e = query.shape[-1]
        d = e // self.h

        def project(layer, t):
            w = layer.weight.view(self.h, d, e)  # (H, d, E)
            out = torch.einsum("ble,hde->bhld", t, w)  # (B, H, L, d)
            return out if layer.bias is None else out + layer.bias.view(self.h, 1, d)

        q, k, v = (
            project(self.q_proj, query),
            project(self.k_proj, key),
            project(self.v_proj, value),
        )
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * d**-0.5
        if mask is not None:
            scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
        w = scores.softmax(-1)
        if mask is not None:
            w = w * mask
        out = torch.einsum("bhqk,bhkd->bqhd", F.dropout(w, self.p, self.training), v)
        return self.out_proj(out.flatten(2)), w


CORRECT = [
    (ch2.SPLIT_HEADS, split_by_chunks),
    (ch2.SPLIT_HEADS, split_by_unflatten),
    (ch2.SPLIT_HEADS, split_contiguous),
    (ch2.MERGE_HEADS, merge_by_cat),
    (ch2.MERGE_HEADS, merge_by_flatten),
    (ch2.MERGE_HEADS, merge_contiguous_view),
    (ch2.MULTI_HEAD_ATTENTION, PerHeadLoop),
    (ch2.MULTI_HEAD_ATTENTION, FlatBatchHeads),
    (ch2.MULTI_HEAD_ATTENTION, EinsumWeights),
]
CATALOGUE = (
    [(ch2.SPLIT_HEADS, m) for m in ch2.SPLIT_MISTAKES]
    + [(ch2.MERGE_HEADS, m) for m in ch2.MERGE_MISTAKES]
    + [(ch2.MULTI_HEAD_ATTENTION, m) for m in ch2.MODULE_MISTAKES]
)


@pytest.mark.parametrize("exercise, impl", CORRECT, ids=[i.__name__ for _, i in CORRECT])
def test_correct_variants_pass(exercise, impl):
    assert_passes(exercise, impl)


@pytest.mark.parametrize(
    "exercise, mistake", CATALOGUE, ids=[f"{e.id}-{m.id}" for e, m in CATALOGUE]
)
def test_each_catalogued_mistake_fails_and_is_named(exercise, mistake):
    assert_fails_and_is_named(exercise, mistake)


def test_the_article_trap_is_caught():
    """nn.MultiheadAttention without batch_first, fed (B, L, E): attention across the batch."""

    class SequenceFirstTrap(_Projections):
        def forward(self, query, key, value, mask=None):
            mha = nn.MultiheadAttention(query.shape[-1], self.h, bias=self.q_proj.bias is not None)
            return mha(query, key, value)

    report = ch2.MULTI_HEAD_ATTENTION.report(SequenceFirstTrap)
    assert not report.passed and "calls_library" in report.mistakes


def test_the_cuda_cases_code_path_runs_here_on_the_cpu():
    ch2._on_device("cpu")(PerHeadLoop, False)
    ch2._split_shapes(split_by_chunks, False, device="cpu")
    with pytest.raises(AssertionError, match="Likely mistake|yours"):
        ch2._on_device("cpu")(ch2._ScaleByEmbedDim, False)
