"""Checks for chapter 1: `scaled_dot_product_attention` and `SelfAttention`.

References: `torch.nn.functional.scaled_dot_product_attention` for outputs and gradients,
`torch.nn.MultiheadAttention` (one head, weights copied) for the module, and a float64
closed form for the attention weights, which PyTorch's function does not return.
"""

from __future__ import annotations

import math

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
    NoCpuTensors,
    attempt,
    expect_close,
    expect_device,
    expect_on_meta,
    expect_shape,
    load_linears,
    on_meta,
    randn,
    seeded,
)

# (atol, rtol) per dtype: float32 rounding of a few dot products stays far below 1e-5.
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-8)}


def reference_weights(q, k, mask=None):
    """softmax(QKᵀ/√d_k) in float64, with fully masked rows set to zero like PyTorch's output."""
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)


def reference_output(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------
# The catalogue: attention as learners really get it wrong. `_attention` is correct with
# its defaults; each mistake turns one knob or changes one line.


def _attention(
    q,
    k,
    v,
    mask=None,
    *,
    scale=lambda d: d**-0.5,
    dim=-1,
    mask_mode="before",
    zero_empty_rows=True,
    softmax=torch.softmax,
    matmul=torch.matmul,
):
    scores = matmul(q, k.transpose(-2, -1)) * scale(q.shape[-1])
    if mask is not None and mask_mode == "inverted":
        mask = ~mask
    if mask is None or mask_mode == "ignored":
        weights = softmax(scores, dim)
    elif mask_mode == "after":
        weights = softmax(scores, dim).masked_fill(~mask, 0.0)
    else:
        weights = softmax(scores.masked_fill(~mask, float("-inf")), dim)
        if zero_empty_rows:
            weights = weights.masked_fill(~mask, 0.0)
    return matmul(weights, v), weights


def _unstable_softmax(scores, dim):
    e = scores.exp()
    return e / e.sum(dim, keepdim=True)


def _modifies_input(q, k, v, mask=None):
    q /= math.sqrt(q.shape[-1])
    return _attention(q, k, v, mask, scale=lambda d: 1.0)


def _cpu_tensor(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = torch.where(mask, scores, torch.full(scores.shape, float("-inf")))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v, weights


def _calls_library(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), _attention(q, k, v, mask)[1]


SDPA_MISTAKES = (
    Mistake(
        "no_scaling",
        "the scores are not divided by √d_k, so softmax sees scores √d_k times too large.",
        lambda q, k, v, mask=None: _attention(q, k, v, mask, scale=lambda d: 1.0),
    ),
    Mistake(
        "divide_by_dk",
        "the scores are divided by d_k instead of √d_k.",
        lambda q, k, v, mask=None: _attention(q, k, v, mask, scale=lambda d: 1.0 / d),
    ),
    Mistake(
        "softmax_over_queries",
        "softmax runs over the query axis (dim=-2); each query's weights must sum to 1 "
        "over the keys (dim=-1).",
        lambda q, k, v, mask=None: _attention(q, k, v, mask, dim=-2),
    ),
    Mistake(
        "mask_after_softmax",
        "the mask is applied after softmax, so the remaining weights no longer sum to 1. "
        "Fill masked scores with -inf before softmax.",
        lambda q, k, v, mask=None: _attention(q, k, v, mask, mask_mode="after"),
    ),
    Mistake(
        "mask_inverted",
        "the mask is read the wrong way round: True means 'may attend', as in "
        "torch.nn.functional.scaled_dot_product_attention.",
        lambda q, k, v, mask=None: _attention(q, k, v, mask, mask_mode="inverted"),
    ),
    Mistake(
        "mask_ignored",
        "the mask is not used at all.",
        lambda q, k, v, mask=None: _attention(q, k, v, mask, mask_mode="ignored"),
    ),
    Mistake(
        "nan_on_fully_masked_rows",
        "a query whose keys are all masked gets softmax of all -inf, which is NaN. "
        "PyTorch returns zero weights and a zero output there: zero the masked weights "
        "after softmax (for example weights.masked_fill(~mask, 0.0)).",
        lambda q, k, v, mask=None: _attention(q, k, v, mask, zero_empty_rows=False),
    ),
    Mistake(
        "only_3d",
        "the code assumes exactly one batch dimension (torch.bmm or transpose(1, 2)); "
        "use @ and transpose(-2, -1) so any number of leading dimensions works.",
        lambda q, k, v, mask=None: _attention(q, k, v, mask, matmul=torch.bmm),
    ),
    Mistake(
        "unstable_softmax",
        "softmax is computed as exp(s) / sum(exp(s)), which overflows to inf/inf = NaN "
        "for large scores. Subtract the row maximum first, or use torch.softmax.",
        lambda q, k, v, mask=None: _attention(q, k, v, mask, softmax=_unstable_softmax),
    ),
    Mistake(
        "modifies_input",
        "an input tensor is changed in place (for example q /= ...); compute a new tensor "
        "instead, the caller still needs theirs.",
        _modifies_input,
    ),
    Mistake(
        "drops_gradient",
        "the result is cut off from autograd (.detach(), .data, torch.no_grad() or "
        "rebuilding a tensor from values), so no gradient reaches q, k or v.",
        lambda q, k, v, mask=None: _attention(q, k, v, mask, matmul=lambda a, b: (a @ b).detach()),
    ),
    Mistake(
        "cpu_tensor",
        "a tensor is created without device=... (torch.full, torch.tensor, torch.zeros), "
        "so it lives on the CPU and the code fails on a GPU. Create it on q.device, or use "
        "masked_fill with a Python float.",
        _cpu_tensor,
    ),
    Mistake(
        "calls_library",
        "the answer calls torch.nn.functional.scaled_dot_product_attention; the exercise "
        "is to write it yourself.",
        _calls_library,
    ),
)
SDPA_MISTAKE = {m.id: m for m in SDPA_MISTAKES}


# ---------------------------------------------------------------------------------------
# Running a learner's function on seeded inputs.


def _clone(t):
    return None if t is None else t.clone()


def _shape(t):
    return None if t is None else tuple(t.shape)


def _call(fn, q, k, v, mask=None):
    """Run fn on copies of the inputs; a crash becomes a CheckFailed naming the likely mistake."""

    def rerun(impl):
        return impl(_clone(q), _clone(k), _clone(v), _clone(mask))

    shapes = f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}, mask {_shape(mask)}"
    result = attempt(rerun, fn, SDPA_MISTAKES, shapes)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise CheckFailed(
            f"Your function returned a {type(result).__name__}; it must return a pair "
            "(output, weights)."
        )
    return result, rerun


def _inputs(batch, lq, lk, dk, dv, seed, dtype=torch.float32, device="cpu", scale=1.0):
    q = randn(*batch, lq, dk, seed=seed, dtype=dtype, device=device, scale=scale)
    k = randn(*batch, lk, dk, seed=seed + 1, dtype=dtype, device=device, scale=scale)
    v = randn(*batch, lk, dv, seed=seed + 2, dtype=dtype, device=device)
    return q, k, v


def _random_mask(shape, seed, device="cpu"):
    """A boolean mask with about a third of the keys hidden; every row keeps one key."""
    mask = torch.rand(shape, generator=seeded(seed)) > 0.35
    mask[..., 0] = True
    return mask.to(device)


def _on_cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


def _compare(fn, q, k, v, mask, reveal, what=""):
    """Output against PyTorch and weights against the float64 closed form, both on the CPU."""
    expected_out = reference_output(*_on_cpu(q, k, v, mask))
    expected_w = reference_weights(*_on_cpu(q, k, mask))
    (out, w), rerun = _call(fn, q, k, v, mask)
    expect_device("Your output", out, q.device)
    atol, rtol = TOLERANCE[q.dtype]
    label = f" ({what})" if what else ""
    expect_close(
        "output" + label, out, expected_out, atol=atol, rtol=rtol, reveal=reveal,
        rerun=lambda impl: rerun(impl)[0], mistakes=SDPA_MISTAKES,
    )  # fmt: skip
    expect_close(
        "weights" + label, w, expected_w, atol=atol, rtol=rtol, reveal=reveal,
        rerun=lambda impl: rerun(impl)[1], mistakes=SDPA_MISTAKES,
    )  # fmt: skip
    return out, w


# ---------------------------------------------------------------------------------------
# Cases: visible ones appear in the learner's notebook, hidden ones are added by the grader.


def _shapes(fn, reveal):
    q, k, v = _inputs((2,), 3, 5, 4, 6, seed=1)
    (out, w), _ = _call(fn, q, k, v)
    expect_shape("output for q (2, 3, 4), k (2, 5, 4), v (2, 5, 6)", out, (2, 3, 6), q.dtype)
    expect_shape("weights for q (2, 3, 4), k (2, 5, 4)", w, (2, 3, 5), q.dtype)


def _hand_example(fn, reveal):
    # d_k = 4, so √d_k = 2: the scores are [0, ln 3], the weights [1/4, 3/4], the output
    # 1/4·[4, 0] + 3/4·[0, 4] = [1, 3].
    q = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    k = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2 * math.log(3.0), 0.0, 0.0, 0.0]]])
    v = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]])
    (out, w), rerun = _call(fn, q, k, v)
    for what, yours, expected, index in (
        ("weights", w, torch.tensor([[[0.25, 0.75]]]), 1),
        ("output", out, torch.tensor([[[1.0, 3.0]]]), 0),
    ):
        expect_close(
            f"{what} of the hand-checkable example", yours, expected, atol=1e-6, rtol=1e-5,
            reveal=True, rerun=lambda impl, i=index: rerun(impl)[i], mistakes=SDPA_MISTAKES,
        )  # fmt: skip


def _matches_pytorch(fn, reveal):
    q, k, v = _inputs((2,), 4, 6, 8, 5, seed=2)
    _compare(fn, q, k, v, None, reveal, "no mask")
    padding = torch.ones(2, 1, 6, dtype=torch.bool)
    padding[1, :, 4:] = False  # the second sequence has two padded keys
    _compare(fn, q, k, v, padding, reveal, "padding mask of shape (2, 1, 6)")


def _rows_sum_to_one(fn, reveal):
    q, k, v = _inputs((3,), 5, 7, 4, 4, seed=3)
    (_, w), _ = _call(fn, q, k, v)
    expect_shape("weights", w, (3, 5, 7), q.dtype)
    expect_close(
        "sum of each row of weights", w.sum(-1), torch.ones(3, 5), atol=1e-5, rtol=0,
        reveal=reveal, rerun=lambda impl: _call(impl, q, k, v)[0][1].sum(-1),
        mistakes=SDPA_MISTAKES,
    )  # fmt: skip


def _masked_keys_get_zero_weight(fn, reveal):
    q, k, v = _inputs((2,), 5, 5, 4, 3, seed=4)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    out, w = _compare(fn, q, k, v, causal, reveal, "causal mask")
    if (w.masked_select(~causal.expand_as(w)) != 0).any():
        raise CheckFailed(
            "weights on masked keys should be exactly 0.", SDPA_MISTAKE["mask_ignored"]
        )


def _no_library_call(fn, reveal):
    q, k, v = _inputs((2,), 3, 3, 4, 4, seed=5)
    with LibraryCalls(F.scaled_dot_product_attention) as calls:
        _call(fn, q, k, v, torch.ones(3, 3, dtype=torch.bool).tril())
    if calls.called:
        raise CheckFailed(
            "Your function calls torch.nn.functional.scaled_dot_product_attention.",
            SDPA_MISTAKE["calls_library"],
        )


def _batch_dims(fn, reveal):
    gen = seeded(6)
    for n_batch in range(4):
        batch = tuple(int(x) for x in torch.randint(1, 4, (n_batch,), generator=gen))
        lq, lk, dk, dv = (int(x) for x in torch.randint(2, 9, (4,), generator=gen))
        lk = lq + 1 if lk == lq else lk
        dv = dk + 1 if dv == dk else dv
        q, k, v = _inputs(batch, lq, lk, dk, dv, seed=60 + n_batch)
        mask = _random_mask((*batch, lq, lk), seed=70 + n_batch) if n_batch % 2 else None
        _compare(fn, q, k, v, mask, reveal, f"{n_batch} batch dimensions, q {tuple(q.shape)}")


def _float64(fn, reveal):
    q, k, v = _inputs((2,), 4, 6, 8, 3, seed=8, dtype=torch.float64)
    _compare(fn, q, k, v, _random_mask((2, 4, 6), seed=9), reveal, "float64")


def _broadcast_masks(fn, reveal):
    q, k, v = _inputs((2, 3), 4, 5, 6, 6, seed=10)
    for i, shape in enumerate([(4, 5), (1, 5), (2, 1, 1, 5), (3, 4, 5), (2, 3, 1, 5)]):
        _compare(fn, q, k, v, _random_mask(shape, seed=11 + i), reveal, f"mask of shape {shape}")


def _fully_masked_rows(fn, reveal):
    q, k, v = _inputs((2,), 4, 5, 4, 3, seed=20)
    mask = _random_mask((2, 4, 5), seed=21)
    mask[0, 1] = False
    mask[1, 3] = False
    out, w = _compare(fn, q, k, v, mask, reveal, "rows whose keys are all masked")
    if torch.isnan(out).any() or torch.isnan(w).any():
        raise CheckFailed("NaN in the result.", SDPA_MISTAKE["nan_on_fully_masked_rows"])


def _large_scores(fn, reveal):
    q, k, v = _inputs((2,), 5, 6, 16, 4, seed=30, dtype=torch.float64, scale=100.0)
    _compare(fn, q, k, v, _random_mask((5, 6), seed=31), reveal, "scores of magnitude 1e4")
    # In float32 a few ulps of a 1e4 score move the weights, so only finiteness is exact.
    (out, w), _ = _call(fn, *(t.float() for t in (q, k, v)))
    if not (torch.isfinite(out).all() and torch.isfinite(w).all()):
        raise CheckFailed(
            "float32 scores of magnitude 1e4 give inf or NaN.", SDPA_MISTAKE["unstable_softmax"]
        )


def _gradients(fn, reveal):
    q, k, v = _inputs((2,), 4, 6, 5, 3, seed=40, dtype=torch.float64)
    mask = _random_mask((2, 4, 6), seed=41)
    g = randn(2, 4, 3, seed=42, dtype=torch.float64)
    expected = torch.autograd.grad(
        (reference_output(*(t.requires_grad_() for t in (q, k, v)), mask) * g).sum(), (q, k, v)
    )
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = fn(q, k, v, mask)
    if not out.requires_grad:
        raise CheckFailed("The output does not require grad.", SDPA_MISTAKE["drops_gradient"])
    (out * g).sum().backward()
    for name, t, e in zip("qkv", (q, k, v), expected, strict=True):
        if t.grad is None:
            raise CheckFailed(f"No gradient reached {name}.", SDPA_MISTAKE["drops_gradient"])
        expect_close(f"gradient with respect to {name}", t.grad, e, atol=1e-9, rtol=1e-7,
                     reveal=reveal)  # fmt: skip


def _inputs_unchanged(fn, reveal):
    q, k, v = _inputs((2,), 3, 4, 4, 2, seed=50)
    mask = _random_mask((2, 3, 4), seed=51)
    before = [t.clone() for t in (q, k, v, mask)]
    fn(q, k, v, mask)
    for name, t, b in zip(("q", "k", "v", "mask"), (q, k, v, mask), before, strict=True):
        if not torch.equal(t, b):
            raise CheckFailed(f"Your function changed {name}.", SDPA_MISTAKE["modifies_input"])


def _on_device(device):
    def run(fn, reveal):
        q, k, v = _inputs((2,), 3, 4, 8, 5, seed=55, device=device)
        mask = _random_mask((3, 4), seed=56, device=device)
        if device == "meta":  # no values on meta: shapes, dtypes and devices only
            with NoCpuTensors():
                (out, w), _ = _call(fn, q, k, v, mask)
            expect_on_meta("output", out, (2, 3, 5), q.dtype)
            expect_on_meta("weights", w, (2, 3, 4), q.dtype)
        else:
            _compare(fn, q, k, v, mask, reveal, f"inputs on {device}")

    return run


SCALED_DOT_PRODUCT_ATTENTION = Exercise(
    "scaled_dot_product_attention",
    (
        Case("returns (output, weights) with the right shapes", "visible", _shapes),
        Case("the hand-checkable example", "visible", _hand_example),
        Case("agrees with PyTorch on random inputs", "visible", _matches_pytorch),
        Case("each row of weights sums to 1", "visible", _rows_sum_to_one),
        Case("masked keys get zero weight", "visible", _masked_keys_get_zero_weight),
        Case("does not call PyTorch's own attention", "visible", _no_library_call),
        Case("0 to 3 batch dimensions, Lq ≠ Lk, d_k ≠ d_v", "hidden", _batch_dims),
        Case("float64 in, float64 out", "hidden", _float64),
        Case("masks that broadcast", "hidden", _broadcast_masks),
        Case("fully masked rows give zeros, never NaN", "hidden", _fully_masked_rows),
        Case("scores of magnitude 1e4", "hidden", _large_scores),
        Case("gradients equal PyTorch's", "hidden", _gradients),
        Case("inputs are not modified", "hidden", _inputs_unchanged),
        Case("creates nothing on the CPU (meta device)", "hidden", _on_device("meta"), "meta"),
        Case("runs on CUDA", "hidden", _on_device("cuda"), "cuda"),
    ),
    SDPA_MISTAKES,
    reference=model.scaled_dot_product_attention,
)


# ---------------------------------------------------------------------------------------
# SelfAttention: one head of nn.MultiheadAttention with its output projection set to the
# identity computes exactly softmax(QKᵀ/√d)V with Q, K, V = the three projections of x.

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class _CataloguedSelfAttention(nn.Module):
    """Correct as written; each catalogued mistake below overrides one step."""

    def __init__(self, embed_dim, bias=True):
        super().__init__()
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def project(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def choose_mask(self, x, mask):
        return mask

    def forward(self, x, mask=None):
        return _attention(*self.project(x), self.choose_mask(x, mask))


class _ValueFromKeyProj(_CataloguedSelfAttention):
    def project(self, x):
        return self.q_proj(x), self.k_proj(x), self.k_proj(x)


class _QueryKeySwapped(_CataloguedSelfAttention):
    def project(self, x):
        return self.k_proj(x), self.q_proj(x), self.v_proj(x)


class _MaskNotPassed(_CataloguedSelfAttention):
    def choose_mask(self, x, mask):
        return None


class _DefaultMaskOnCpu(_CataloguedSelfAttention):
    def choose_mask(self, x, mask):
        length = x.shape[-2]
        return torch.ones(length, length, dtype=torch.bool) if mask is None else mask


MODULE_MISTAKES = (
    Mistake(
        "wrong_projection",
        "the values come from k_proj; each of q, k and v has its own projection.",
        _ValueFromKeyProj,
    ),
    Mistake(
        "query_key_swapped",
        "q_proj and k_proj are swapped, which transposes the attention pattern.",
        _QueryKeySwapped,
    ),
    Mistake("module_mask_ignored", "forward does not pass the mask on.", _MaskNotPassed),
    Mistake(
        "module_cpu_tensor",
        "forward builds a tensor (a default mask?) without device=x.device, so the module "
        "fails on a GPU.",
        _DefaultMaskOnCpu,
    ),
)


def _weights(embed_dim, bias, seed, dtype):
    """Seeded projection weights, as a list of (weight, bias or None) for q, k, v."""
    return [
        (
            randn(embed_dim, embed_dim, seed=seed + 2 * i, dtype=dtype, scale=embed_dim**-0.5),
            randn(embed_dim, seed=seed + 2 * i + 1, dtype=dtype) if bias else None,
        )
        for i in range(3)
    ]


def _build(cls, embed_dim, bias, weights, dtype, device="cpu"):
    module = cls(embed_dim, bias=bias).to(dtype)
    load_linears(module, dict(zip(PROJECTIONS, weights, strict=True)))
    return module.to(device)


def _pytorch_reference(embed_dim, bias, weights, dtype):
    mha = nn.MultiheadAttention(embed_dim, 1, bias=bias, batch_first=True).to(dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([w for w, _ in weights]))
        mha.out_proj.weight.copy_(torch.eye(embed_dim, dtype=dtype))
        if bias:
            mha.in_proj_bias.copy_(torch.cat([b for _, b in weights]))
            mha.out_proj.bias.zero_()
    return mha


def _mha_masks(mask, batch, length):
    """Our mask (True = may attend) in nn.MultiheadAttention's terms (True = may not)."""
    if mask is None:
        return {}
    if mask.dim() == 3 and mask.shape[1] == 1:  # (B, 1, L): padding
        return {"key_padding_mask": ~mask[:, 0, :]}
    return {"attn_mask": ~mask.expand(length, length) if mask.dim() == 2 else ~mask}


def _run_module(cls, x, mask, bias, seed):
    """The learner's module and PyTorch's, with the same weights, on the same x."""
    embed_dim = x.shape[-1]
    weights = _weights(embed_dim, bias, seed, x.dtype)
    mha = _pytorch_reference(embed_dim, bias, weights, x.dtype)
    x_cpu, mask_cpu = _on_cpu(x, mask)
    masks = _mha_masks(mask_cpu, *x.shape[:2])
    expected_out, expected_w = mha(x_cpu, x_cpu, x_cpu, need_weights=True, **masks)

    def rerun(impl):
        module = _build(impl, embed_dim, bias, weights, x.dtype, x.device)
        return module(x.clone(), _clone(mask))

    result = attempt(rerun, cls, MODULE_MISTAKES, f"x {tuple(x.shape)}, mask {_shape(mask)}")
    if not (isinstance(result, tuple) and len(result) == 2):
        raise CheckFailed("forward must return a pair (output, weights).")
    return result, (expected_out, expected_w), rerun


def _compare_module(cls, x, mask, reveal, bias=True, seed=100, what=""):
    (out, w), (expected_out, expected_w), rerun = _run_module(cls, x, mask, bias, seed)
    expect_device("Your output", out, x.device)
    atol, rtol = TOLERANCE[x.dtype]
    for i, name, yours, expected in (
        (0, "output", out, expected_out),
        (1, "weights", w, expected_w),
    ):
        expect_close(
            f"{name} ({what})", yours, expected.detach(), atol=atol, rtol=rtol, reveal=reveal,
            rerun=lambda impl, i=i: rerun(impl)[i], mistakes=MODULE_MISTAKES,
        )  # fmt: skip


def _module_structure(cls, reveal):
    _build(cls, 8, True, _weights(8, True, 0, torch.float32), torch.float32)


def _module_shapes(cls, reveal):
    x = randn(2, 5, 8, seed=101)
    (out, w), _, _ = _run_module(cls, x, None, True, 100)
    expect_shape("output for x of shape (2, 5, 8)", out, (2, 5, 8), x.dtype)
    expect_shape("weights for x of shape (2, 5, 8)", w, (2, 5, 5), x.dtype)


def _module_matches_pytorch(cls, reveal):
    _compare_module(cls, randn(2, 5, 8, seed=102), None, reveal, what="no mask")


def _module_causal(cls, reveal):
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    _compare_module(cls, randn(3, 6, 8, seed=103), causal, reveal, what="causal mask (6, 6)")


def _module_no_bias(cls, reveal):
    _build(cls, 6, False, _weights(6, False, 0, torch.float32), torch.float32)
    _compare_module(cls, randn(2, 4, 6, seed=104), None, reveal, bias=False, what="bias=False")


def _module_padding(cls, reveal):
    padding = torch.ones(3, 1, 7, dtype=torch.bool)
    padding[1, :, 5:] = False
    padding[2, :, 3:] = False
    _compare_module(cls, randn(3, 7, 16, seed=105), padding, reveal, what="padding mask (3, 1, 7)")


def _module_float64(cls, reveal):
    x = randn(2, 5, 12, seed=106, dtype=torch.float64)
    _compare_module(cls, x, _random_mask((2, 5, 5), seed=107), reveal, what="float64")


def _module_gradients(cls, reveal):
    x = randn(2, 5, 8, seed=108, dtype=torch.float64)
    weights = _weights(8, True, 100, x.dtype)
    module = _build(cls, 8, True, weights, x.dtype)
    mha = _pytorch_reference(8, True, weights, x.dtype)
    g = randn(2, 5, 8, seed=109, dtype=x.dtype)
    (module(x)[0] * g).sum().backward()
    (mha(x, x, x)[0] * g).sum().backward()
    expected_w = mha.in_proj_weight.grad.chunk(3)
    for name, e in zip(PROJECTIONS, expected_w, strict=True):
        grad = getattr(module, name).weight.grad
        if grad is None:
            raise CheckFailed(f"No gradient reached {name}.weight.", SDPA_MISTAKE["drops_gradient"])
        expect_close(f"gradient of {name}.weight", grad, e, atol=1e-9, rtol=1e-7, reveal=reveal)


def _module_on_device(device):
    def run(cls, reveal):
        if device != "meta":
            mask = _random_mask((2, 5, 5), seed=111)
            return _compare_module(cls, randn(2, 5, 8, seed=110).to(device), mask.to(device),
                                   reveal, what=f"on {device}")  # fmt: skip
        weights = _weights(8, True, 100, torch.float32)
        x = torch.empty(2, 5, 8, device="meta")
        for mask in (None, torch.ones(5, 5, dtype=torch.bool, device="meta")):

            def rerun(impl, mask=mask):
                return _build(impl, 8, True, weights, torch.float32).to("meta")(x, mask)

            context = f"on the meta device, mask {_shape(mask)}"
            out, w = attempt(on_meta(rerun), cls, MODULE_MISTAKES, context)
            expect_on_meta("output", out, (2, 5, 8))
            expect_on_meta("weights", w, (2, 5, 5))

    return run


SELF_ATTENTION = Exercise(
    "self_attention",
    (
        Case("has q_proj, k_proj, v_proj as nn.Linear(E, E)", "visible", _module_structure),
        Case("output and weight shapes", "visible", _module_shapes),
        Case("agrees with nn.MultiheadAttention (one head)", "visible", _module_matches_pytorch),
        Case("a causal mask", "visible", _module_causal),
        Case("bias=False", "hidden", _module_no_bias),
        Case("a padding mask of shape (B, 1, L)", "hidden", _module_padding),
        Case("float64 module and input", "hidden", _module_float64),
        Case("gradients equal PyTorch's", "hidden", _module_gradients),
        Case(
            "creates nothing on the CPU (meta device)", "hidden", _module_on_device("meta"), "meta"
        ),
        Case("runs on CUDA", "hidden", _module_on_device("cuda"), "cuda"),
    ),
    MODULE_MISTAKES,
    reference=model.SelfAttention,
)

check_scaled_dot_product_attention = SCALED_DOT_PRODUCT_ATTENTION.check
check_self_attention = SELF_ATTENTION.check
