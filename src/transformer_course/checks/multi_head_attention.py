"""Checks for chapter 2: `split_heads`, `merge_heads` and `MultiHeadAttention`.

References: an index-by-index closed form for the head split and merge, and PyTorch's
`nn.MultiheadAttention(E, H, batch_first=True)` with its weights copied for the module
(outputs, per-head weights with `average_attn_weights=False`, and gradients).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import model
from .core import (
    Case,
    CheckFailed,
    Exercise,
    LibraryCalls,
    Mistake,
    attempt,
    expect_close,
    expect_device,
    expect_on_meta,
    expect_shape,
    expect_value_error,
    load_linears,
    on_meta,
    randn,
    seeded,
)

# Outputs must agree with nn.MultiheadAttention to 1e-5 (float32) whatever their size.
TOLERANCE = {torch.float32: (1e-5, 0.0), torch.float64: (1e-10, 0.0)}


def reference_split(x, num_heads):
    """(B, L, E) -> (B, H, L, E/H): head h holds features h·d .. (h+1)·d - 1 of every position."""
    d = x.shape[-1] // num_heads
    return torch.stack([x[..., h * d : (h + 1) * d] for h in range(num_heads)], dim=1)


def reference_merge(x):
    """(B, H, L, d) -> (B, L, H·d): the heads' features side by side, head 0 first."""
    return torch.cat(x.unbind(dim=1), dim=-1)


# ---------------------------------------------------------------------------------------
# The catalogue. Splits and merges as learners get them wrong:


def _split_without_transpose(x, num_heads):
    b, length, e = x.shape
    return x.reshape(b, num_heads, length, e // num_heads)


def _split_head_dim_first(x, num_heads):
    b, length, e = x.shape
    return x.view(b, length, e // num_heads, num_heads).permute(0, 3, 1, 2)


def _merge_without_transpose(x):
    b, h, length, d = x.shape
    return x.reshape(b, length, h * d)


def _merge_with_view(x):
    b, h, length, d = x.shape
    return x.transpose(1, 2).view(b, length, h * d)


def _merge_head_dim_first(x):
    b, h, length, d = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, length, h * d)


SPLIT_MISTAKES = (
    Mistake(
        "reshape_without_transpose",
        "(B, L, E) was reshaped straight to (B, H, L, d), which cuts the sequence, not the "
        "features, into heads. View it as (B, L, H, d) first, then transpose(1, 2).",
        _split_without_transpose,
    ),
    Mistake(
        "head_dim_first",
        "E was viewed as (d, H) instead of (H, d), so each head gets every H-th feature "
        "rather than a contiguous block of d features.",
        _split_head_dim_first,
    ),
)

MERGE_MISTAKES = (
    Mistake(
        "merge_without_transpose",
        "(B, H, L, d) was reshaped straight to (B, L, E), which mixes positions across "
        "heads. transpose(1, 2) back to (B, L, H, d) first, then reshape.",
        _merge_without_transpose,
    ),
    Mistake(
        "view_on_non_contiguous",
        "after transpose(1, 2) the tensor is not contiguous, so .view cannot merge the "
        "last two dimensions. Use .reshape, or .contiguous().view.",
        _merge_with_view,
    ),
    Mistake(
        "merge_head_dim_first",
        "the heads were merged as (d, H) instead of (H, d): head h's features must land "
        "in the block h·d .. (h+1)·d - 1.",
        _merge_head_dim_first,
    ),
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class _CataloguedMultiHeadAttention(nn.Module):
    """Correct as written; each catalogued mistake below overrides one step."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True):
        super().__init__()
        self.check_divisible(embed_dim, num_heads)
        self.num_heads, self.p = num_heads, dropout
        for name in PROJECTIONS:
            setattr(self, name, nn.Linear(embed_dim, embed_dim, bias=bias))

    def check_divisible(self, embed_dim, num_heads):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")

    def split(self, x):
        return reference_split(x, self.num_heads)

    def merge(self, x):
        return reference_merge(x)

    def scale(self, q):
        return q.shape[-1] ** -0.5

    def masked(self, scores, mask):
        return scores if mask is None else scores.masked_fill(~mask, float("-inf"))

    def dropout(self, weights):
        return F.dropout(weights, self.p, self.training)

    def project_out(self, x):
        return self.out_proj(x)

    def qkv(self, query, key, value):
        q = self.split(self.q_proj(query))  # (B, H, Lq, d)
        k = self.split(self.k_proj(key))  # (B, H, Lk, d)
        v = self.split(self.v_proj(value))  # (B, H, Lk, d)
        return q, k, v

    def forward(self, query, key, value, mask=None):
        q, k, v = self.qkv(query, key, value)
        scores = self.masked(q @ k.transpose(-2, -1) * self.scale(q), mask)  # (B, H, Lq, Lk)
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out = self.merge(self.dropout(weights) @ v)  # (B, Lq, E)
        return self.project_out(out), weights


class _SplitWithoutTranspose(_CataloguedMultiHeadAttention):
    def split(self, x):
        return _split_without_transpose(x, self.num_heads)


class _MergeWithoutTranspose(_CataloguedMultiHeadAttention):
    def merge(self, x):
        return _merge_without_transpose(x)


class _ScaleByEmbedDim(_CataloguedMultiHeadAttention):
    def scale(self, q):
        return (q.shape[-1] * self.num_heads) ** -0.5


class _NoOutProj(_CataloguedMultiHeadAttention):
    def project_out(self, x):
        return x


class _FirstHeadMaskOnly(_CataloguedMultiHeadAttention):
    def masked(self, scores, mask):
        if mask is None:
            return scores
        first = mask.expand(scores.shape)[:, :1]  # (B, 1, Lq, Lk): head 0's mask for all
        return scores.masked_fill(~first, float("-inf"))


class _DropoutInEval(_CataloguedMultiHeadAttention):
    def dropout(self, weights):
        return F.dropout(weights, self.p, training=True)


class _WeightsAfterDropout(_CataloguedMultiHeadAttention):
    def forward(self, query, key, value, mask=None):
        q, k, v = self.qkv(query, key, value)
        scores = self.masked(q @ k.transpose(-2, -1) * self.scale(q), mask)
        weights = self.dropout(torch.softmax(scores, dim=-1).nan_to_num(0.0))
        return self.project_out(self.merge(weights @ v)), weights


class _NoDivisibilityCheck(_CataloguedMultiHeadAttention):
    def check_divisible(self, embed_dim, num_heads):
        pass


class _CpuMask(_CataloguedMultiHeadAttention):
    def masked(self, scores, mask):
        if mask is None:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool)
        return super().masked(scores, mask)


class _CallsLibrary(_CataloguedMultiHeadAttention):
    def forward(self, query, key, value, mask=None):
        _, weights = super().forward(query, key, value, mask)
        q, k, v = self.qkv(query, key, value)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, d)
        return self.out_proj(self.merge(out)), weights


MODULE_MISTAKES = (
    Mistake("reshape_without_transpose", SPLIT_MISTAKES[0].explanation, _SplitWithoutTranspose),
    Mistake("merge_without_transpose", MERGE_MISTAKES[0].explanation, _MergeWithoutTranspose),
    Mistake(
        "scale_by_embed_dim",
        "the scores are divided by √E; each head works in d = E / H dimensions, so divide by √d.",
        _ScaleByEmbedDim,
    ),
    Mistake(
        "missing_out_proj",
        "the merged heads are returned without out_proj, the W^O that mixes the heads.",
        _NoOutProj,
    ),
    Mistake(
        "mask_not_broadcast_over_heads",
        "every head used the first head's mask; the mask broadcasts to (B, H, Lq, Lk) and "
        "may differ per head: apply it to the (B, H, Lq, Lk) scores as it is.",
        _FirstHeadMaskOnly,
    ),
    Mistake(
        "dropout_in_eval",
        "dropout is applied in eval mode too; use nn.Dropout (or F.dropout with "
        "training=self.training) so that eval mode is deterministic.",
        _DropoutInEval,
    ),
    Mistake(
        "weights_after_dropout",
        "the returned weights are the ones after dropout. Return them before dropout (they "
        "are what you plot and inspect) and use the dropped ones only to mix the values.",
        _WeightsAfterDropout,
    ),
    Mistake(
        "no_divisibility_check",
        "embed_dim not divisible by num_heads must raise a ValueError in __init__ that says so.",
        _NoDivisibilityCheck,
    ),
    Mistake(
        "cpu_tensor",
        "a tensor (a default mask?) is created without device=..., so it lives on the CPU "
        "and the module fails on a GPU.",
        _CpuMask,
    ),
    Mistake(
        "calls_library",
        "the answer calls PyTorch's own attention (F.scaled_dot_product_attention or "
        "nn.MultiheadAttention); the exercise is to build it from your own parts.",
        _CallsLibrary,
    ),
)
MODULE_MISTAKE = {m.id: m for m in MODULE_MISTAKES}


# ---------------------------------------------------------------------------------------
# split_heads and merge_heads: pure data movement, so they must match exactly.


def _check_movement(fn, x, expected, mistakes, reveal, what, *args):
    def rerun(impl):
        return impl(x.clone(), *args)

    rerun = on_meta(rerun) if x.device.type == "meta" else rerun
    yours = attempt(rerun, fn, mistakes, f"x {tuple(x.shape)}")
    expect_device("Your result", yours, x.device)
    if x.device.type == "meta":
        return expect_shape(what, yours, tuple(expected.shape), x.dtype)
    expect_close(what, yours, expected.cpu(), atol=0, rtol=0, reveal=reveal, rerun=rerun,
                 mistakes=mistakes)  # fmt: skip


SHAPES = [(1, 1, 4, 1), (3, 7, 12, 3), (2, 4, 8, 8), (2, 6, 16, 4), (1, 9, 6, 2)]  # B, L, E, H


def _split_shape(fn, reveal):
    x = randn(2, 5, 12, seed=1)
    expect_shape("split_heads(x of shape (2, 5, 12), 3)", fn(x, 3), (2, 3, 5, 4), x.dtype)


def _split_values(fn, reveal):
    x = torch.arange(24.0).view(1, 3, 8)  # position l holds 8l .. 8l + 7
    _check_movement(fn, x, reference_split(x, 2), SPLIT_MISTAKES, True,
                    "split_heads(arange(24).view(1, 3, 8), 2)", 2)  # fmt: skip


def _split_shapes(fn, reveal, dtype=torch.float32, device="cpu"):
    for i, (b, length, e, h) in enumerate(SHAPES):
        x = randn(b, length, e, seed=10 + i, dtype=dtype)
        _check_movement(fn, x.to(device), reference_split(x, h), SPLIT_MISTAKES, reveal,
                        f"split_heads(x of shape {tuple(x.shape)}, {h}), {dtype}", h)  # fmt: skip


def _merge_shape(fn, reveal):
    x = randn(2, 3, 5, 4, seed=2)
    expect_shape("merge_heads(x of shape (2, 3, 5, 4))", fn(x), (2, 5, 12), x.dtype)


def _merge_values(fn, reveal):
    x = torch.arange(24.0).view(1, 2, 3, 4)  # head h, position l holds 12h + 4l .. + 3
    _check_movement(fn, x, reference_merge(x), MERGE_MISTAKES, True,
                    "merge_heads(arange(24).view(1, 2, 3, 4))")  # fmt: skip


def _merge_shapes(fn, reveal, dtype=torch.float32, device="cpu"):
    for i, (b, length, e, h) in enumerate(SHAPES):
        x = randn(b, h, length, e // h, seed=20 + i, dtype=dtype)
        _check_movement(fn, x.to(device), reference_merge(x), MERGE_MISTAKES, reveal,
                        f"merge_heads(x of shape {tuple(x.shape)}), {dtype}")  # fmt: skip


def _merge_undoes_split(fn, reveal):
    x = randn(3, 7, 12, seed=3)
    _check_movement(fn, reference_split(x, 4), x, MERGE_MISTAKES, reveal,
                    "merge_heads(split_heads(x, 4)) for x of shape (3, 7, 12)")  # fmt: skip


def _movement_cases(name, shape, values, shapes, extra=()):
    return (
        Case(f"{name} returns the right shape", "visible", shape),
        Case(f"{name} on a readable input", "visible", values),
        Case("many shapes, H from 1 to E", "hidden", shapes),
        *extra,
        Case("float64 in, float64 out", "hidden",
             lambda fn, reveal: shapes(fn, reveal, torch.float64)),
        Case("runs on the meta device", "hidden",
             lambda fn, reveal: shapes(fn, reveal, device="meta"), "meta"),
        Case("runs on CUDA", "hidden",
             lambda fn, reveal: shapes(fn, reveal, device="cuda"), "cuda"),
    )  # fmt: skip


SPLIT_HEADS = Exercise(
    "split_heads",
    _movement_cases("split_heads", _split_shape, _split_values, _split_shapes),
    SPLIT_MISTAKES,
    reference=model.split_heads,
)
MERGE_HEADS = Exercise(
    "merge_heads",
    _movement_cases(
        "merge_heads",
        _merge_shape,
        _merge_values,
        _merge_shapes,
        (Case("undoes split_heads", "hidden", _merge_undoes_split),),
    ),  # fmt: skip
    MERGE_MISTAKES,
    reference=model.merge_heads,
)


# ---------------------------------------------------------------------------------------
# MultiHeadAttention against nn.MultiheadAttention with the same weights.


def _weights(e, bias, seed, dtype):
    return {
        name: (
            randn(e, e, seed=seed + 2 * i, dtype=dtype, scale=e**-0.5),
            randn(e, seed=seed + 2 * i + 1, dtype=dtype) if bias else None,
        )
        for i, name in enumerate(PROJECTIONS)
    }


def _build(cls, e, h, bias, weights, dtype, device="cpu", dropout=0.0):
    module = cls(e, h, dropout=dropout, bias=bias).to(dtype)
    load_linears(module, weights)
    return module.to(device).eval()


def _pytorch_reference(e, h, bias, weights, dtype):
    mha = nn.MultiheadAttention(e, h, bias=bias, batch_first=True).to(dtype).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([weights[n][0] for n in PROJECTIONS[:3]]))
        mha.out_proj.weight.copy_(weights["out_proj"][0])
        if bias:
            mha.in_proj_bias.copy_(torch.cat([weights[n][1] for n in PROJECTIONS[:3]]))
            mha.out_proj.bias.copy_(weights["out_proj"][1])
    return mha


def _mha_mask(mask, b, h, lq, lk):
    """Ours (True = may attend, broadcast to (B, H, Lq, Lk)) as PyTorch's (True = may not)."""
    if mask is None:
        return {}
    return {"attn_mask": ~mask.expand(b, h, lq, lk).reshape(b * h, lq, lk)}


def _run(cls, query, key, value, mask, h, bias=True, seed=100, dropout=0.0):
    """The learner's module and PyTorch's with the same weights: (yours, expected, rerun)."""
    (b, lq, e), lk, dtype = query.shape, key.shape[1], query.dtype
    weights = _weights(e, bias, seed, dtype)
    mha = _pytorch_reference(e, h, bias, weights, dtype)
    cpu = [None if t is None else t.cpu() for t in (query, key, value, mask)]
    expected = mha(*cpu[:3], need_weights=True, average_attn_weights=False,
                   **_mha_mask(cpu[3], b, h, lq, lk))  # fmt: skip

    def rerun(impl):
        module = _build(impl, e, h, bias, weights, dtype, query.device, dropout)
        return module(query, key, value, mask)

    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, H = {h}"
    yours = attempt(rerun, cls, MODULE_MISTAKES, shapes)
    if not (isinstance(yours, tuple) and len(yours) == 2):
        raise CheckFailed("forward must return a pair (output, weights).")
    expect_device("Your output", yours[0], query.device)
    return yours, expected, rerun


def _compare(cls, query, key, value, mask, h, reveal, what, bias=True):
    (out, w), (expected_out, expected_w), rerun = _run(cls, query, key, value, mask, h, bias)
    atol, rtol = TOLERANCE[query.dtype]
    for i, name, yours, expected in (
        (1, "weights", w, expected_w),
        (0, "output", out, expected_out),
    ):
        expect_close(
            f"{name} ({what})", yours, expected.detach(), atol=atol, rtol=rtol, reveal=reveal,
            rerun=lambda impl, i=i: rerun(impl)[i], mistakes=MODULE_MISTAKES,
        )  # fmt: skip
    return out, w


def _random_mask(shape, seed):
    mask = torch.rand(shape, generator=seeded(seed)) > 0.35
    mask[..., 0] = True  # every query keeps a key: nn.MultiheadAttention gives NaN otherwise
    return mask


def _structure(cls, reveal):
    _build(cls, 8, 2, True, _weights(8, True, 0, torch.float32), torch.float32)


def _shapes(cls, reveal):
    x = randn(2, 5, 8, seed=101)
    (out, w), _, _ = _run(cls, x, x, x, None, 2)
    expect_shape("output for x of shape (2, 5, 8), 2 heads", out, (2, 5, 8), x.dtype)
    expect_shape("weights for x of shape (2, 5, 8), 2 heads", w, (2, 2, 5, 5), x.dtype)


def _self_attention(cls, reveal):
    x = randn(2, 5, 8, seed=102)
    _compare(cls, x, x, x, None, 2, reveal, "self-attention, E = 8, H = 2")


def _cross_attention(cls, reveal):
    query, memory = randn(2, 3, 12, seed=103), randn(2, 6, 12, seed=104)
    padding = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    padding[1, ..., 4:] = False  # the second memory has two padded positions
    _compare(cls, query, memory, memory, padding, 3, reveal,
             "cross-attention, Lq = 3, Lk = 6, padding mask (2, 1, 1, 6)")  # fmt: skip


def _not_divisible(cls, reveal):
    expect_value_error(lambda: cls(10, 3), "MultiHeadAttention(10, 3)",
                       MODULE_MISTAKE["no_divisibility_check"])  # fmt: skip


def _no_library_call(cls, reveal):
    x = randn(2, 4, 8, seed=105)
    module = _build(cls, 8, 2, True, _weights(8, True, 0, torch.float32), torch.float32)
    with LibraryCalls(F.scaled_dot_product_attention, F.multi_head_attention_forward) as calls:
        module(x, x, x)
    if calls.called:
        raise CheckFailed(f"Your module calls {calls.called[0]}.", MODULE_MISTAKE["calls_library"])


def _masks(cls, reveal):
    x = randn(2, 5, 8, seed=106)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    _compare(cls, x, x, x, causal, 2, reveal, "causal mask (5, 5)")
    _compare(cls, x, x, x, _random_mask((2, 2, 5, 5), 107), 2, reveal,
             "a different mask per head, (2, 2, 5, 5)")  # fmt: skip
    _compare(cls, x, x, x, _random_mask((2, 1, 5, 5), 108), 2, reveal, "mask (2, 1, 5, 5)")


def _many_shapes(cls, reveal, dtype=torch.float32):
    for i, (b, lq, lk, e, h) in enumerate([(1, 1, 3, 8, 1), (3, 4, 7, 12, 3), (2, 6, 2, 6, 6)]):
        query, kv = (
            randn(b, lq, e, seed=110 + i, dtype=dtype),
            randn(b, lk, e, seed=120 + i, dtype=dtype),
        )
        for bias in (True, False):
            what = f"B {b}, Lq {lq}, Lk {lk}, E {e}, H {h}, bias={bias}, {dtype}"
            _compare(cls, query, kv, kv, None, h, reveal, what, bias)


def _eval_is_deterministic(cls, reveal):
    """In eval mode, dropout=0.5 must change nothing: compare with the same module at 0.0."""
    x = randn(2, 5, 8, seed=130)
    weights = _weights(8, True, 100, torch.float32)
    no_dropout = _build(cls, 8, 2, True, weights, torch.float32)(x, x, x)[0]
    module = _build(cls, 8, 2, True, weights, torch.float32, dropout=0.5)
    for out in (module(x, x, x)[0], module(x, x, x)[0]):
        if not torch.equal(out, no_dropout):
            raise CheckFailed(
                "In eval mode, dropout=0.5 changed the output (or two calls differ).",
                MODULE_MISTAKE["dropout_in_eval"],
            )


def _training_drops_weights(cls, reveal):
    x = randn(2, 6, 8, seed=131)
    weights = _weights(8, True, 100, torch.float32)

    def rerun(impl):
        torch.manual_seed(0)  # the same dropout masks for the learner and the catalogue
        return _build(impl, 8, 2, True, weights, torch.float32, dropout=0.5).train()(x, x, x)

    out, w = attempt(rerun, cls, MODULE_MISTAKES)
    mha = _pytorch_reference(8, 2, True, weights, torch.float32)
    expected_out, expected_w = mha(x, x, x, average_attn_weights=False)
    if torch.allclose(out, expected_out, atol=1e-5, rtol=0):
        raise CheckFailed("In training mode with dropout=0.5 the output should change.")
    expect_close("weights in training mode, which are returned before dropout", w,
                 expected_w.detach(), atol=1e-5, rtol=0, reveal=reveal,
                 rerun=lambda impl: rerun(impl)[1], mistakes=MODULE_MISTAKES)  # fmt: skip


def _heads_are_independent(cls, reveal):
    x = randn(2, 5, 8, seed=140)
    weights = _weights(8, True, 100, torch.float32)

    def changed_heads(impl):
        """Which heads' weights move when only head 1's rows of q_proj change."""
        module = _build(impl, 8, 4, True, weights, torch.float32)
        before = module(x, x, x)[1]
        with torch.no_grad():
            module.q_proj.weight[2:4] += randn(2, 8, seed=141)  # head 1 of 4: rows 2..3
        return ((module(x, x, x)[1] - before).abs().amax(dim=(0, 2, 3)) > 1e-6).float()

    yours = attempt(changed_heads, cls, MODULE_MISTAKES)
    expect_close("heads whose weights changed (1 = changed) after editing head 1's q_proj rows",
                 yours, torch.tensor([0.0, 1.0, 0.0, 0.0]), atol=0, rtol=0, reveal=True,
                 rerun=changed_heads, mistakes=MODULE_MISTAKES)  # fmt: skip


def _gradients(cls, reveal):
    x = randn(2, 5, 8, seed=150, dtype=torch.float64)
    weights = _weights(8, True, 100, torch.float64)
    module = _build(cls, 8, 2, True, weights, torch.float64)
    mha = _pytorch_reference(8, 2, True, weights, torch.float64)
    g = randn(2, 5, 8, seed=151, dtype=torch.float64)
    (module(x, x, x)[0] * g).sum().backward()
    (mha(x, x, x)[0] * g).sum().backward()
    expected = dict(
        zip(PROJECTIONS, (*mha.in_proj_weight.grad.chunk(3), mha.out_proj.weight.grad), strict=True)
    )
    for name, e in expected.items():
        grad = getattr(module, name).weight.grad
        if grad is None:
            raise CheckFailed(f"No gradient reached {name}.weight.")
        expect_close(f"gradient of {name}.weight", grad, e, atol=1e-9, rtol=1e-7, reveal=reveal)


def _on_device(device):
    def run(cls, reveal):
        x = randn(2, 5, 8, seed=160)
        mask = _random_mask((2, 1, 5, 5), 161)
        if device != "meta":
            return _compare(cls, x.to(device), x.to(device), x.to(device), mask.to(device), 2,
                            reveal, f"on {device}")  # fmt: skip
        weights = _weights(8, True, 100, torch.float32)
        meta_x = torch.empty(2, 5, 8, device="meta")
        for meta_mask in (None, mask.to("meta")):

            def rerun(impl, meta_mask=meta_mask):
                module = _build(impl, 8, 2, True, weights, torch.float32).to("meta")
                return module(meta_x, meta_x, meta_x, meta_mask)

            given = "None" if meta_mask is None else "(2, 1, 5, 5)"
            context = f"on the meta device, mask {given}"
            out, w = attempt(on_meta(rerun), cls, MODULE_MISTAKES, context)
            expect_on_meta("output", out, (2, 5, 8))
            expect_on_meta("weights", w, (2, 2, 5, 5))

    return run


MULTI_HEAD_ATTENTION = Exercise(
    "multi_head_attention",
    (
        Case("has q_proj, k_proj, v_proj, out_proj as nn.Linear(E, E)", "visible", _structure),
        Case("output and weight shapes", "visible", _shapes),
        Case("self-attention agrees with nn.MultiheadAttention", "visible", _self_attention),
        Case("cross-attention with a padding mask", "visible", _cross_attention),
        Case("ValueError when embed_dim % num_heads != 0", "visible", _not_divisible),
        Case("does not call PyTorch's attention", "visible", _no_library_call),
        Case("causal, per-head and broadcast masks", "hidden", _masks),
        Case("many shapes, with and without bias", "hidden", _many_shapes),
        Case(
            "float64 in, float64 out",
            "hidden",
            lambda cls, reveal: _many_shapes(cls, reveal, torch.float64),
        ),
        Case("eval mode is deterministic", "hidden", _eval_is_deterministic),
        Case("training mode drops attention weights", "hidden", _training_drops_weights),
        Case("heads are independent", "hidden", _heads_are_independent),
        Case("gradients equal PyTorch's", "hidden", _gradients),
        Case("creates nothing on the CPU (meta device)", "hidden", _on_device("meta"), "meta"),
        Case("runs on CUDA", "hidden", _on_device("cuda"), "cuda"),
    ),  # fmt: skip
    MODULE_MISTAKES,
    reference=model.MultiHeadAttention,
)

check_split_heads = SPLIT_HEADS.check
check_merge_heads = MERGE_HEADS.check
check_multi_head_attention = MULTI_HEAD_ATTENTION.check
