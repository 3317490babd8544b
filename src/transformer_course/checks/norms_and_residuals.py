"""Checks for chapter 5: `LayerNorm`, `RMSNorm` and `Residual`.

References: PyTorch's own normalizations in float64, `F.layer_norm` (what `nn.LayerNorm` runs)
and `F.rms_norm` (what `nn.RMSNorm` runs), given the values copied into the learner's weight and
bias, for outputs and gradients. `Residual` is compared with the closed forms
norm(x + dropout(sublayer(x))) and x + dropout(sublayer(norm(x))) built from them around a fixed,
seeded sublayer.
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
    attempt,
    describe,
    expect_close,
    expect_device,
    expect_on_meta,
    expect_shape,
    on_meta,
    randn,
)

# (atol, rtol) per dtype. A normalized output is O(1) (times weight, plus bias); float32 rounding
# of the mean, the variance and the division leaves errors of a few 1e-7 (every correct variant
# measures at most 1e-6), while each catalogued mistake is off by 1e-4 or more where it is named.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}
GRAD_TOLERANCE = (1e-9, 1e-7)  # float64 gradients agree with PyTorch's to about 1e-14


def offset_atol(offset: float) -> float:
    """Absolute tolerance for float32 rows around `offset`, with a spread of about 1.

    float32 rounds the mean of values near c to a relative few 1e-8, an absolute error that
    x - mean carries, divided by the std and times the weight, into the output: correct variants
    measure up to 2.1e-7·|c| (2.1e-4 at c = 1000), and 2e-6·|c| leaves a margin of 10.
    E[x²] - E[x]² subtracts two numbers near c², each rounded to a relative 6e-8: at c = 1000
    its output is off by 0.27 or more, over 100 times this tolerance.
    """
    return 1e-5 + 2e-6 * abs(offset)


def _as_tuple(shape):
    return (shape,) if isinstance(shape, int) else tuple(shape)


def reference_layer_norm(x, shape, params, eps):
    """nn.LayerNorm's output in float64; params = (weight, bias), or None for no affine."""
    weight, bias = (None, None) if params is None else (p.double() for p in params)
    return F.layer_norm(x.double().cpu(), _as_tuple(shape), weight, bias, eps)


def reference_rms_norm(x, weight, eps):
    """nn.RMSNorm's output in float64 (its closed form before torch 2.4, which added it)."""
    x, weight = x.double().cpu(), weight.double()
    if not hasattr(F, "rms_norm"):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def _turn(base, **knobs):
    """A catalogued wrong implementation: `base` with some of its knobs turned."""
    return type(base.__name__.removeprefix("_Catalogued"), (base,), knobs)


# ---------------------------------------------------------------------------------------
# The LayerNorm catalogue. `_CataloguedLayerNorm` is correct with its default knobs.


class _CataloguedLayerNorm(nn.Module):
    axes = "normalized"  # or "batch" (dim 0), "sequence" (dim 1), "last" (dim -1)
    variance = "biased"  # or "unbiased" (divided by n - 1), "naive" (E[x²] - E[x]²)
    params, affine = "flag", "after"  # or "never" and "always"; "none", "swapped", "before"
    eps_in_sqrt, detached, in_place, ones_on_cpu, library = True, False, False, False, False

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.shape, self.eps = _as_tuple(normalized_shape), eps
        if {"flag": elementwise_affine, "never": False, "always": True}[self.params]:
            self.weight = nn.Parameter(torch.ones(self.shape))
            self.bias = nn.Parameter(torch.zeros(self.shape))
        else:
            self.weight = self.bias = None

    def forward(self, x):
        if self.library:
            return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        normalized = tuple(range(-len(self.shape), 0))
        dims = {"normalized": normalized, "batch": (0,), "sequence": (1,), "last": (-1,)}[self.axes]
        s = x.detach() if self.detached else x
        mean = s.mean(dims, keepdim=True)
        if self.variance == "naive":
            var = (s * s).mean(dims, keepdim=True) - mean * mean
        else:
            var = s.var(dims, keepdim=True, correction=int(self.variance == "unbiased"))
        std = torch.sqrt(var + self.eps) if self.eps_in_sqrt else torch.sqrt(var) + self.eps
        y = x.sub_(mean).div_(std) if self.in_place else (x - mean) / std
        w, b = self.weight, self.bias
        if w is None and self.ones_on_cpu:
            w, b = torch.ones(self.shape), torch.zeros(self.shape)
        if w is None or self.affine == "none":
            return y
        if self.affine == "swapped":
            return y * b + w
        return (y + b) * w if self.affine == "before" else y * w + b


def _layer_norm(**knobs):
    return _turn(_CataloguedLayerNorm, **knobs)


LAYER_NORM_MISTAKES = (
    Mistake("unbiased_variance", "the variance is unbiased, divided by n - 1 (x.var() and x.std() "
            "default to it); layer norm divides by n: x.var(dims, correction=0), or "
            "((x - mean)**2).mean(dims).", _layer_norm(variance="unbiased")),
    Mistake("std_plus_eps", "(x - mean) / (x.std() + eps), as in The Annotated Transformer: "
            "x.std() is unbiased and eps is outside the root. nn.LayerNorm computes "
            "(x - mean) / sqrt(var + eps), var biased.",
            _layer_norm(variance="unbiased", eps_in_sqrt=False)),
    Mistake("eps_outside_sqrt", "eps is added to the standard deviation, sqrt(var) + eps; it goes "
            "inside the square root, sqrt(var + eps). The two differ when the variance is small.",
            _layer_norm(eps_in_sqrt=False)),
    Mistake("normalized_over_batch", "the statistics are taken over the batch axis (dim 0), as "
            "batch norm does; layer norm takes them over the last len(normalized_shape) axes, "
            "each sample on its own.", _layer_norm(axes="batch")),
    Mistake("normalized_over_sequence", "the statistics are taken over dim 1, the sequence axis "
            "of (B, L, E); layer norm takes them over the features, the last "
            "len(normalized_shape) axes (dim=-1 for an int).", _layer_norm(axes="sequence")),
    Mistake("last_dim_only", "only the last axis is normalized; a tuple normalized_shape such as "
            "(4, 5) asks for statistics over the last len(normalized_shape) axes together.",
            _layer_norm(axes="last")),
    Mistake("no_affine_parameters", "there is no learnable scale and shift: self.weight = "
            "nn.Parameter(torch.ones(normalized_shape)) and self.bias = "
            "nn.Parameter(torch.zeros(normalized_shape)).", _layer_norm(params="never")),
    Mistake("affine_not_applied", "weight and bias exist, but the output is not scaled and "
            "shifted by them.", _layer_norm(affine="none")),
    Mistake("weight_bias_swapped", "weight and bias are swapped: the output is normalized · "
            "weight + bias.", _layer_norm(affine="swapped")),
    Mistake("bias_before_scale", "the bias is added before the scale, (normalized + bias) · "
            "weight; it comes after: normalized · weight + bias.", _layer_norm(affine="before")),
    Mistake("affine_flag_ignored", "elementwise_affine=False still creates weight and bias; "
            "without them the module has no parameters (set self.weight = self.bias = None).",
            _layer_norm(params="always")),
    Mistake("naive_variance", "the variance is E[x²] - E[x]²: for rows far from 0 (x + 1000) "
            "both terms are near 10⁶ and float32 loses their difference (catastrophic "
            "cancellation). Centre first: ((x - mean)**2).mean(dims), or x.var(dims, "
            "correction=0).", _layer_norm(variance="naive")),
    Mistake("statistics_detached", "the mean or the variance is cut off from autograd "
            "(.detach(), .item(), torch.no_grad()); they depend on x, and the gradient with "
            "respect to x flows through them too.", _layer_norm(detached=True)),
    Mistake("modifies_input", "x is changed in place (x -= mean, x.sub_(...)); compute a new "
            "tensor: the caller still needs x, and a residual connection adds it back.",
            _layer_norm(in_place=True)),
    Mistake("layer_norm_cpu_tensor", "a tensor (ones or zeros standing in for a missing weight "
            "or bias?) is created without device=x.device, so it lives on the CPU and the module "
            "fails on a GPU.", _layer_norm(ones_on_cpu=True)),
    Mistake("calls_layer_norm", "the answer calls PyTorch's layer norm (F.layer_norm, "
            "torch.layer_norm or nn.LayerNorm); the exercise is to compute it yourself.",
            _layer_norm(library=True)),
)  # fmt: skip
LAYER_NORM_MISTAKE = {m.id: m for m in LAYER_NORM_MISTAKES}


# ---------------------------------------------------------------------------------------
# What the three exercises share: building a learner's module with known parameters, and
# running it on seeded inputs.


def _parameters(module, shapes, what, missing=None, extra=None):
    """The module's parameters by name, which must be exactly `shapes` (name -> shape)."""
    found = dict(module.named_parameters())
    absent = [name for name in shapes if name not in found]
    if absent:
        raise CheckFailed(f"{what} has no parameter {absent[0]!r}; its parameters: "
                          f"{sorted(found) or 'none'}.", missing)  # fmt: skip
    more = [name for name in found if name not in shapes]
    if more:
        raise CheckFailed(f"{what} has parameters {more} besides the expected "
                          f"{list(shapes) or 'none'}.", extra)  # fmt: skip
    for name, shape in shapes.items():
        if tuple(found[name].shape) != tuple(shape):
            raise CheckFailed(f"{what}.{name} has shape {tuple(found[name].shape)}, expected "
                              f"{tuple(shape)}.")  # fmt: skip
    return found


def _load(params, values):
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.copy_(value)


def _created(module, expected, what, missing=None, extra=None):
    """A new module's parameters (names, shapes, initial values) and its output's shape."""
    found = _parameters(module, {n: v.shape for n, v in expected.items()}, what, missing, extra)
    for name, value in expected.items():
        expect_close(f"{what}.{name} when created", found[name], value, atol=0, rtol=0,
                     reveal=True)  # fmt: skip
    expect_shape(f"{what}: output for x of shape (2, 5, 8)", module(randn(2, 5, 8, seed=0)),
                 (2, 5, 8), torch.float32)  # fmt: skip


def _run(cls, mistakes, build, x, given):
    """The learner's module, build(cls), on x: (output, rerun). Each run starts the random
    generator at seed 0, so that a catalogued mistake draws the dropout masks the learner's did."""

    def rerun(impl):
        module = build(impl).to(x.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return module(x.clone())

    out = attempt(rerun, cls, mistakes, given)
    expect_device("Your output", out, x.device)
    return out, rerun


def _expect_close(what, yours, expected, reveal, rerun, mistakes, atol=None):
    atol, rtol = TOLERANCE[expected.dtype] if atol is None else (atol, 0.0)
    expect_close(what, yours, expected, atol=atol, rtol=rtol, reveal=reveal, rerun=rerun,
                 mistakes=mistakes)  # fmt: skip


def _compare(cls, mistakes, build, x, expected, what, reveal, atol=None):
    out, rerun = _run(cls, mistakes, build, x, f"x {tuple(x.shape)}, {x.dtype}")
    _expect_close(what, out, expected.to(x.dtype), reveal, rerun, mistakes, atol)


def _gradients(cls, mistakes, build, reference, x, params, names, what, reveal):
    """The gradients of sum(output · g) with respect to x and to the learner's parameters
    `names`, against those of reference(x, *params); all in float64."""
    g = randn(*x.shape, seed=1, dtype=x.dtype)

    def grads(impl):
        module, leaf = build(impl), x.clone().requires_grad_()
        (module(leaf) * g).sum().backward()
        found = dict(module.named_parameters())
        return [leaf.grad] + [found[name].grad for name in names]

    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    (reference(*leaves) * g).sum().backward()
    yours = attempt(grads, cls, mistakes, what)
    for i, name in enumerate(("x", *names)):
        if yours[i] is None:
            raise CheckFailed(f"{what}: no gradient reached {name}.")
        expect_close(f"{what}: gradient with respect to {name}", yours[i], leaves[i].grad,
                     atol=GRAD_TOLERANCE[0], rtol=GRAD_TOLERANCE[1], reveal=reveal,
                     rerun=lambda impl, i=i: grads(impl)[i], mistakes=mistakes)  # fmt: skip


def _no_library_call(module, x, functions, mistake):
    with LibraryCalls(*[f for f in functions if f is not None]) as calls:
        module(x)
    if calls.called:
        raise CheckFailed(f"Your module calls {calls.called[0]}.", mistake)


def _on_meta(cls, mistakes, build, shape, what):
    """build(cls), moved to the meta device, on an x of `shape` there: no tensor on the CPU."""
    x = torch.empty(shape, device="meta")
    call = on_meta(lambda impl: build(impl).to("meta")(x))
    out = attempt(call, cls, mistakes, f"{what}, x {tuple(shape)}, on the meta device")
    expect_on_meta("output", out, shape)


# ---------------------------------------------------------------------------------------
# LayerNorm against F.layer_norm with the same weight and bias.


def _ln_params(shape, seed, dtype=torch.float32):
    """A weight around 1 and a bias around 0, random, so that a misplaced scale or shift shows."""
    shape = _as_tuple(shape)
    return (1 + randn(*shape, seed=seed, dtype=dtype, scale=0.5),
            randn(*shape, seed=seed + 1, dtype=dtype, scale=0.5))  # fmt: skip


def _layer_norm_of(shape, params, eps=None, dtype=torch.float32):
    """build(cls): cls(shape[, eps]) with params = (weight, bias) copied in, or with
    elementwise_affine=False when params is None; its parameters checked first."""
    kwargs = {} if eps is None else {"eps": eps}
    if params is None:
        kwargs["elementwise_affine"] = False
    what = "LayerNorm(" + ", ".join([repr(shape)] + [f"{k}={v}" for k, v in kwargs.items()]) + ")"
    shapes = {} if params is None else {"weight": _as_tuple(shape), "bias": _as_tuple(shape)}

    def build(cls):
        module = cls(shape, **kwargs).to(dtype)
        found = _parameters(module, shapes, what, LAYER_NORM_MISTAKE["no_affine_parameters"],
                            LAYER_NORM_MISTAKE["affine_flag_ignored"])  # fmt: skip
        _load(found.values(), params or ())
        return module

    return build


def _compare_layer_norm(cls, x, reveal, what, shape=None, params=(), eps=None, expected=None,
                        atol=None):  # fmt: skip
    """The learner's LayerNorm on x against F.layer_norm's float64 output. params=() draws a
    random weight and bias; None means elementwise_affine=False."""
    shape = x.shape[-1] if shape is None else shape
    params = _ln_params(shape, 7, x.dtype) if params == () else params
    if expected is None:
        expected = reference_layer_norm(x, shape, params, 1e-5 if eps is None else eps)
    build = _layer_norm_of(shape, params, eps, x.dtype)
    _compare(cls, LAYER_NORM_MISTAKES, build, x, expected, what, reveal, atol)


def _ln_structure(cls, reveal):
    _created(cls(8), {"weight": torch.ones(8), "bias": torch.zeros(8)}, "LayerNorm(8)",
             LAYER_NORM_MISTAKE["no_affine_parameters"])  # fmt: skip


def _ln_by_hand(cls, reveal):
    # mean 2.5, biased variance (1.5² + 0.5² + 0.5² + 1.5²) / 4 = 1.25. With eps = 0.75 the output
    # is (x - 2.5) / sqrt(2) ≈ [-1.0607, -0.3536, 0.3536, 1.0607]; with the default eps = 1e-5,
    # (x - 2.5) / sqrt(1.25 + 1e-5) ≈ [-1.3416, -0.4472, 0.4472, 1.3416].
    x, default = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), (torch.ones(4), torch.zeros(4))
    for eps, variance in ((0.75, 2.0), (None, 1.25 + 1e-5)):
        what = "LayerNorm(4" + ("" if eps is None else f", eps={eps}") + ") on [[1, 2, 3, 4]]"
        _compare_layer_norm(cls, x, True, what, 4, default, eps, (x - 2.5) / math.sqrt(variance))


def _ln_agrees(cls, reveal):
    x = randn(2, 5, 8, seed=100)
    _compare_layer_norm(cls, x, reveal, "x (2, 5, 8), random weight and bias, vs nn.LayerNorm")


def _ln_no_library_call(cls, reveal):
    module = _layer_norm_of(8, _ln_params(8, 7))(cls)
    functions = (F.layer_norm, torch.layer_norm, torch.native_layer_norm)
    _no_library_call(
        module, randn(2, 3, 8, seed=101), functions, LAYER_NORM_MISTAKE["calls_layer_norm"]
    )


# (x's shape, normalized_shape): 1-D to 4-D x, normalized over 1 to 3 axes, axes of size 1
LN_SHAPES = (((3, 8), 8), ((2, 5, 8), 8), ((2, 3, 4, 5), (4, 5)), ((2, 3, 4, 5), [3, 4, 5]),
             ((1, 7, 6), 6), ((6,), 6), ((4, 1, 3), (1, 3)))  # fmt: skip


def _ln_shapes(cls, reveal, dtype=torch.float32):
    for i, (x_shape, shape) in enumerate(LN_SHAPES):
        x = randn(*x_shape, seed=110 + i, dtype=dtype, scale=2.0) + 0.5
        what = f"x {x_shape}, normalized_shape={shape}, {dtype}"
        _compare_layer_norm(cls, x, reveal, what, shape)


def _ln_no_affine(cls, reveal):
    for i, (x_shape, shape) in enumerate(LN_SHAPES[1:3]):
        x = randn(*x_shape, seed=120 + i)
        _compare_layer_norm(cls, x, reveal, f"elementwise_affine=False, x {x_shape}", shape, None)


def _ln_small_variance(cls, reveal):
    x = randn(3, 4, 8, seed=130, scale=1e-3)  # variances about 1e-6, below eps = 1e-5
    x[0, 0] = 0.25  # a constant row: variance 0, the output is the bias
    _compare_layer_norm(cls, x, reveal, "rows with variance 0 to 1e-6, below eps = 1e-5")


def _ln_large_offset(cls, reveal):
    x = randn(4, 6, 32, seed=131) + 1000.0
    what = "x + 1000 in float32 (rows far from 0)"
    _compare_layer_norm(cls, x, reveal, what, atol=offset_atol(1000.0))


def _ln_gradients(cls, reveal):
    x = randn(3, 4, 5, seed=140, dtype=torch.float64)
    params = _ln_params((4, 5), 142, torch.float64)
    _gradients(cls, LAYER_NORM_MISTAKES, _layer_norm_of((4, 5), params, dtype=x.dtype),
               lambda x, *p: reference_layer_norm(x, (4, 5), p, 1e-5), x, params,
               ("weight", "bias"), "x (3, 4, 5), normalized_shape=(4, 5)", reveal)  # fmt: skip


def _ln_per_sample(cls, reveal):
    x, build = randn(4, 3, 8, seed=150), _layer_norm_of(8, _ln_params(8, 151))

    def alone_minus_in_batch(impl):
        module = build(impl)
        return module(x[:1].clone()) - module(x.clone())[:1]

    yours = attempt(alone_minus_in_batch, cls, LAYER_NORM_MISTAKES, "x (4, 3, 8) and x[:1]")
    _expect_close("LayerNorm(x[:1]) - LayerNorm(x)[:1], sample 0 alone minus sample 0 in a batch "
                  "of 4", yours, torch.zeros(1, 3, 8), reveal, alone_minus_in_batch,
                  LAYER_NORM_MISTAKES)  # fmt: skip


def _ln_input_unchanged(cls, reveal):
    x = randn(2, 3, 8, seed=160)
    with torch.no_grad():
        _layer_norm_of(8, _ln_params(8, 7))(cls)(x)
    if not torch.equal(x, randn(2, 3, 8, seed=160)):
        raise CheckFailed("Your LayerNorm changed its input x.",
                          LAYER_NORM_MISTAKE["modifies_input"])  # fmt: skip


def _ln_on_device(device):
    def run(cls, reveal):
        if device == "meta":
            for shape, affine in ((8, True), (8, False), ((4, 5), True)):
                build = _layer_norm_of(shape, _ln_params(shape, 7) if affine else None)
                what = f"LayerNorm({shape}, elementwise_affine={affine})"
                _on_meta(cls, LAYER_NORM_MISTAKES, build, (2, 3, *_as_tuple(shape)), what)
            return
        x = randn(2, 5, 8, seed=170).to(device)
        _compare_layer_norm(cls, x, reveal, f"on {device}")
        _compare_layer_norm(cls, x, reveal, f"on {device}, elementwise_affine=False", params=None)

    return run


LAYER_NORM = Exercise(
    "layer_norm",
    (
        Case("weight (ones) and bias (zeros) of shape normalized_shape", "visible", _ln_structure),
        Case("the hand-checkable example [1, 2, 3, 4]", "visible", _ln_by_hand),
        Case("agrees with nn.LayerNorm", "visible", _ln_agrees),
        Case("does not call PyTorch's layer norm", "visible", _ln_no_library_call),
        Case("1-D to 4-D inputs, tuple normalized_shape", "hidden", _ln_shapes),
        Case("float64 in, float64 out", "hidden",
             lambda cls, reveal: _ln_shapes(cls, reveal, torch.float64)),
        Case("elementwise_affine=False", "hidden", _ln_no_affine),
        Case("eps matters: variance 0 and tiny variances", "hidden", _ln_small_variance),
        Case("rows far from 0 (x + 1000) in float32", "hidden", _ln_large_offset),
        Case("gradients equal PyTorch's", "hidden", _ln_gradients),
        Case("each sample is normalized on its own", "hidden", _ln_per_sample),
        Case("x is not modified", "hidden", _ln_input_unchanged),
        Case("creates nothing on the CPU (meta device)", "hidden", _ln_on_device("meta"), "meta"),
        Case("runs on CUDA", "hidden", _ln_on_device("cuda"), "cuda"),
    ),
    LAYER_NORM_MISTAKES,
    reference=model.LayerNorm,
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# RMSNorm against F.rms_norm. `_CataloguedRMSNorm` is correct with its default knobs.


class _CataloguedRMSNorm(nn.Module):
    centred = eps_outside = summed = unweighted = with_bias = library = False
    default_eps = 1e-6

    def __init__(self, dim, eps=None):
        super().__init__()
        self.eps = self.default_eps if eps is None else eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if self.with_bias else None

    def forward(self, x):
        if self.library:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        x = x - x.mean(-1, keepdim=True) if self.centred else x
        ms = x.pow(2).sum(-1, keepdim=True) if self.summed else x.pow(2).mean(-1, keepdim=True)
        y = x / (ms.sqrt() + self.eps if self.eps_outside else torch.sqrt(ms + self.eps))
        y = y if self.unweighted else y * self.weight
        return y if self.bias is None else y + self.bias


def _rms_norm(**knobs):
    return _turn(_CataloguedRMSNorm, **knobs)


RMS_NORM_MISTAKES = (
    Mistake("rms_subtracts_mean", "the mean is subtracted first, which makes it a LayerNorm "
            "without bias. RMSNorm does not centre: x / sqrt(mean(x²) + eps) · weight.",
            _rms_norm(centred=True)),
    Mistake("rms_eps_outside_sqrt", "eps is added to the root mean square, sqrt(mean(x²)) + eps; "
            "it goes inside the root: sqrt(mean(x²) + eps). The two differ for small x.",
            _rms_norm(eps_outside=True)),
    Mistake("rms_sum_not_mean", "x is divided by sqrt(sum(x²)), its length; the root mean square "
            "divides the sum by the dimension: sqrt(mean(x²) + eps).", _rms_norm(summed=True)),
    Mistake("rms_weight_not_applied", "the output is not multiplied by weight.",
            _rms_norm(unweighted=True)),
    Mistake("rms_has_bias", "RMSNorm has a bias; it only scales: weight is its one parameter.",
            _rms_norm(with_bias=True)),
    Mistake("rms_layer_norm_eps", "eps defaults to LayerNorm's 1e-5; RMSNorm's default is 1e-6.",
            _rms_norm(default_eps=1e-5)),
    Mistake("calls_rms_norm", "the answer calls PyTorch's RMSNorm (F.rms_norm or nn.RMSNorm); "
            "the exercise is to compute it yourself.", _rms_norm(library=True)),
)  # fmt: skip
RMS_NORM_MISTAKE = {m.id: m for m in RMS_NORM_MISTAKES}


def _rms_of(dim, weight, eps=None, dtype=torch.float32):
    """build(cls): cls(dim[, eps]) with `weight` copied in, after checking its one parameter."""
    kwargs = {} if eps is None else {"eps": eps}

    def build(cls):
        module = cls(dim, **kwargs).to(dtype)
        found = _parameters(module, {"weight": (dim,)}, f"RMSNorm({dim})",
                            extra=RMS_NORM_MISTAKE["rms_has_bias"])  # fmt: skip
        _load(found.values(), (weight,))
        return module

    return build


def _compare_rms(cls, x, reveal, what, weight=None, eps=None, expected=None):
    dim = x.shape[-1]
    weight = 1 + randn(dim, seed=8, dtype=x.dtype, scale=0.5) if weight is None else weight
    if expected is None:
        expected = reference_rms_norm(x, weight, 1e-6 if eps is None else eps)
    build = _rms_of(dim, weight, eps, x.dtype)
    _compare(cls, RMS_NORM_MISTAKES, build, x, expected, what, reveal)


def _rms_structure(cls, reveal):
    _created(cls(8), {"weight": torch.ones(8)}, "RMSNorm(8)",
             extra=RMS_NORM_MISTAKE["rms_has_bias"])  # fmt: skip


def _rms_by_hand(cls, reveal):
    # mean(x²) = (1 + 4 + 9 + 16) / 4 = 7.5: x / sqrt(7.5 + 1e-6) ≈ [0.3651, 0.7303, 1.0954, 1.4606]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    _compare_rms(cls, x, True, "RMSNorm(4) on [[1, 2, 3, 4]]", torch.ones(4),
                 expected=x / math.sqrt(7.5 + 1e-6))  # fmt: skip


def _rms_agrees(cls, reveal):
    x = randn(2, 5, 8, seed=200)
    _compare_rms(cls, x, reveal, "x (2, 5, 8), random weight, vs nn.RMSNorm(8, eps=1e-6)")


def _rms_no_library_call(cls, reveal):
    module = _rms_of(8, 1 + randn(8, seed=8, scale=0.5))(cls)
    functions = (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None))  # torch >= 2.4
    _no_library_call(
        module, randn(2, 3, 8, seed=201), functions, RMS_NORM_MISTAKE["calls_rms_norm"]
    )


def _rms_shapes(cls, reveal, dtype=torch.float32):
    for i, shape in enumerate(((8,), (3, 16), (2, 3, 4, 6), (1, 9, 1))):
        x = randn(*shape, seed=210 + i, dtype=dtype, scale=2.0) + 0.5
        _compare_rms(cls, x, reveal, f"x {shape}, {dtype}")


def _rms_eps(cls, reveal):
    # With eps = 0.5, [1, 2, 3, 4] is divided by sqrt(7.5 + 0.5) = sqrt(8).
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    _compare_rms(cls, x, reveal, "RMSNorm(4, eps=0.5) on [[1, 2, 3, 4]]", torch.ones(4), 0.5,
                 x / math.sqrt(8.0))  # fmt: skip
    x = randn(3, 4, 8, seed=220, scale=1e-3)  # mean(x²) about 1e-6, as large as eps
    x[0, 0] = 0.0
    _compare_rms(cls, x, reveal, "x of size 1e-3 (mean(x²) ≈ eps = 1e-6) and a zero row")


def _rms_gradients(cls, reveal):
    x = randn(3, 4, 8, seed=230, dtype=torch.float64)
    weight = 1 + randn(8, seed=232, dtype=torch.float64, scale=0.5)
    _gradients(cls, RMS_NORM_MISTAKES, _rms_of(8, weight, dtype=x.dtype),
               lambda x, w: reference_rms_norm(x, w, 1e-6), x, (weight,), ("weight",),
               "x (3, 4, 8)", reveal)  # fmt: skip


def _rms_on_device(device):
    def run(cls, reveal):
        if device == "meta":
            return _on_meta(cls, RMS_NORM_MISTAKES, _rms_of(8, torch.ones(8)), (2, 5, 8),
                            "RMSNorm(8)")  # fmt: skip
        _compare_rms(cls, randn(2, 5, 8, seed=240).to(device), reveal, f"on {device}")

    return run


RMS_NORM = Exercise(
    "rms_norm",
    (
        Case("one parameter, weight (ones) of shape (dim,)", "visible", _rms_structure),
        Case("the hand-checkable example [1, 2, 3, 4]", "visible", _rms_by_hand),
        Case("agrees with nn.RMSNorm", "visible", _rms_agrees),
        Case("does not call PyTorch's RMSNorm", "visible", _rms_no_library_call),
        Case("1-D to 4-D inputs", "hidden", _rms_shapes),
        Case("float64 in, float64 out", "hidden",
             lambda cls, reveal: _rms_shapes(cls, reveal, torch.float64)),
        Case("eps: given, and for tiny x", "hidden", _rms_eps),
        Case("gradients equal PyTorch's", "hidden", _rms_gradients),
        Case("creates nothing on the CPU (meta device)", "hidden", _rms_on_device("meta"), "meta"),
        Case("runs on CUDA", "hidden", _rms_on_device("cuda"), "cuda"),
    ),
    RMS_NORM_MISTAKES,
    reference=model.RMSNorm,
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Residual. `_CataloguedResidual` is correct with its default knobs; its norm is a correct
# LayerNorm whose class is named LayerNorm, as the learner's is.


class _CataloguedResidual(nn.Module):
    torch_norm, order, skip = False, "flag", "x"  # order: or "post", "swapped"; skip: "normed"
    post_norm_of, dropout = "sum", "flag"  # or "branch"; or "always", "never", "sum", "cpu_mask"

    def __init__(self, sublayer, dim, dropout=0.0, norm_first=False):
        super().__init__()
        self.sublayer, self.p, self.norm_first = sublayer, dropout, norm_first
        self.norm = nn.LayerNorm(dim) if self.torch_norm else _layer_norm()(dim)

    def drop(self, t):
        if self.dropout == "cpu_mask" and self.training:
            return t * (torch.rand(t.shape) >= self.p).to(t.dtype) / (1 - self.p)
        training = {"always": True, "never": False}.get(self.dropout, self.training)
        return F.dropout(t, self.p, training)

    def forward(self, x):
        pre = {"flag": self.norm_first, "post": False, "swapped": not self.norm_first}[self.order]
        h = self.norm(x) if pre else x
        s = self.sublayer(h) if self.dropout == "sum" else self.drop(self.sublayer(h))
        if not pre and self.post_norm_of == "branch":
            return x + self.norm(s)
        z = s + {"x": x, "normed": h, "none": 0.0}[self.skip]
        z = self.drop(z) if self.dropout == "sum" else z
        return z if pre else self.norm(z)


def _residual(**knobs):
    return _turn(_CataloguedResidual, **knobs)


RESIDUAL_MISTAKES = (
    Mistake("torch_layer_norm", "self.norm is torch's nn.LayerNorm; use your own LayerNorm from "
            "exercise 1.", _residual(torch_norm=True)),
    Mistake("residual_after_norm", "pre-norm adds the sublayer to norm(x), norm(x) + "
            "sublayer(norm(x)); the skip connection carries x itself, x + dropout(sublayer("
            "norm(x))), so x reaches the output unnormalized.", _residual(skip="normed")),
    Mistake("norm_first_ignored", "norm_first=True still gives post-norm, norm(x + dropout("
            "sublayer(x))); pre-norm moves the norm into the branch: x + dropout(sublayer("
            "norm(x))).", _residual(order="post")),
    Mistake("pre_post_swapped", "pre-norm and post-norm are swapped: norm_first=False is "
            "post-norm (the original transformer), norm(x + dropout(sublayer(x))); "
            "norm_first=True is pre-norm.", _residual(order="swapped")),
    Mistake("norm_on_sublayer_output", "post-norm normalizes the sublayer's output, x + "
            "norm(sublayer(x)); it normalizes the sum: norm(x + dropout(sublayer(x))).",
            _residual(post_norm_of="branch")),
    Mistake("skip_connection_missing", "x is not added back: the residual connection is the "
            "x + around the sublayer.", _residual(skip="none")),
    Mistake("residual_dropout_in_eval", "dropout still drops in eval mode: F.dropout(t, p) "
            "defaults to training=True. Use an nn.Dropout module, or pass "
            "training=self.training.", _residual(dropout="always")),
    Mistake("dropout_on_sum", "dropout is applied to the sum x + sublayer(...), which drops "
            "parts of x too; it applies to the sublayer's output only, before the addition.",
            _residual(dropout="sum")),
    Mistake("residual_dropout_ignored", "the dropout argument is not used: in training mode "
            "dropout zeroes each entry of the sublayer's output with probability p and scales "
            "the others by 1 / (1 - p).", _residual(dropout="never")),
    Mistake("residual_cpu_tensor", "a tensor (a dropout mask from torch.rand(shape)?) is "
            "created without device=x.device, so it lives on the CPU and the module fails on a "
            "GPU. Use nn.Dropout, or torch.rand_like.", _residual(dropout="cpu_mask")),
)  # fmt: skip
RESIDUAL_MISTAKE = {m.id: m for m in RESIDUAL_MISTAKES}

ORDER = {False: "post-norm, norm(x + sublayer(x))", True: "pre-norm, x + sublayer(norm(x))"}


def _sublayer(dim, dtype=torch.float32, mlp=False, zero=0):
    """A fixed, seeded sublayer: nn.Linear(dim, dim), or Linear-ReLU-Linear. Its first `zero`
    output features are 0 whatever x, which the training case uses to see through the norm."""
    with torch.random.fork_rng(devices=[]):  # nn.Linear's initialization draws random numbers
        layers = (nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim)) if mlp else (
            nn.Linear(dim, dim),)  # fmt: skip
    sublayer = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for i, p in enumerate(sublayer.parameters()):
            p.copy_(randn(*p.shape, seed=300 + i, scale=p.shape[-1] ** -0.5))
        sublayer[-1].weight[:zero] = 0.0
        sublayer[-1].bias[:zero] = 0.0
    return sublayer


def reference_residual(x, sublayer, params, norm_first, kept=None, p=0.0):
    """The float64 closed form, post-norm LayerNorm(x + d) or pre-norm x + d, with d the
    sublayer's output, or d / (1 - p) where `kept` and 0 elsewhere."""

    def norm(t):
        return reference_layer_norm(t, t.shape[-1], params, 1e-5)

    x = x.double().cpu()
    d = sublayer(norm(x) if norm_first else x)
    d = d if kept is None else torch.where(kept, d / (1 - p), 0.0)
    return x + d if norm_first else norm(x + d)


def _chapter_norm(module, dim):
    """module.norm, which must be the chapter's LayerNorm(dim): a class named LayerNorm (the
    learner's own), not torch.nn.LayerNorm, with weight and bias of shape (dim,)."""
    norm = getattr(module, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        raise CheckFailed("self.norm is torch.nn.LayerNorm.", RESIDUAL_MISTAKE["torch_layer_norm"])
    if not any(c.__name__ == "LayerNorm" for c in type(norm).__mro__):
        raise CheckFailed("self.norm should be your LayerNorm(dim) from exercise 1; found "
                          f"{type(norm).__name__}.")  # fmt: skip
    for name in ("weight", "bias"):
        p = getattr(norm, name, None)
        if not isinstance(p, nn.Parameter) or tuple(p.shape) != (dim,):
            raise CheckFailed(f"self.norm.{name} should be a parameter of shape ({dim},); found "
                              f"{describe(p, False)}.")  # fmt: skip
    return norm


def _residual_of(dim, params, dtype=torch.float32, mlp=False, zero=0, train=False, **kwargs):
    """build(cls): cls(sublayer, dim, **kwargs), with params = (weight, bias) copied into its
    norm, in training mode or not."""

    def build(cls):
        module = cls(_sublayer(dim, dtype, mlp, zero), dim, **kwargs).to(dtype).train(train)
        norm = _chapter_norm(module, dim)
        _load((norm.weight, norm.bias), params)
        return module

    return build


def _run_residual(cls, x, norm_first, mlp=False, zero=0, **kwargs):
    """The learner's Residual on x, its rerun, the norm's parameters and the float64 sublayer."""
    params = _ln_params(x.shape[-1], 9, x.dtype)
    build = _residual_of(x.shape[-1], params, x.dtype, mlp, zero, norm_first=norm_first, **kwargs)
    given = f"x {tuple(x.shape)}, {x.dtype}, norm_first={norm_first}, {kwargs}"
    out, rerun = _run(cls, RESIDUAL_MISTAKES, build, x, given)
    return out, rerun, params, _sublayer(x.shape[-1], torch.float64, mlp, zero)


def _compare_residual(cls, x, reveal, what, norm_first, **kwargs):
    out, rerun, params, sublayer = _run_residual(cls, x, norm_first, **kwargs)
    expected = reference_residual(x, sublayer, params, norm_first).to(x.dtype)
    _expect_close(what, out, expected, reveal, rerun, RESIDUAL_MISTAKES)


def _residual_structure(cls, reveal):
    norm = _chapter_norm(cls(_sublayer(8), 8), 8)
    x, params = randn(2, 5, 8, seed=400), _ln_params(8, 9)
    _load((norm.weight, norm.bias), params)
    _expect_close("self.norm(x), your LayerNorm (if this fails, fix exercise 1 first)", norm(x),
                  reference_layer_norm(x, 8, params, 1e-5).float(), reveal, None, ())  # fmt: skip


def _residual_order(norm_first):
    def run(cls, reveal):
        x = randn(2, 5, 8, seed=401, scale=2.0)
        _compare_residual(cls, x, reveal, f"{ORDER[norm_first]}, x (2, 5, 8)", norm_first)

    return run


def _residual_shapes(cls, reveal, dtype=torch.float32):
    for i, shape in enumerate(((3, 8), (2, 5, 8), (2, 3, 4, 16))):
        x = randn(*shape, seed=410 + i, dtype=dtype, scale=2.0)
        for norm_first in (False, True):
            what = f"{ORDER[norm_first]}, MLP sublayer, x {shape}, {dtype}"
            _compare_residual(cls, x, reveal, what, norm_first, mlp=True)


def _residual_eval(cls, reveal):
    x = randn(2, 5, 8, seed=420)
    for norm_first in (False, True):
        what = f"{ORDER[norm_first]}, eval mode, dropout=0.5"
        _compare_residual(cls, x, reveal, what, norm_first, dropout=0.5)


def _kept(out, x, s, norm_first, params):
    """Which entries of the sublayer's output s your dropout kept, read off your output: d, the
    dropped and scaled s, is 2s where kept (p = 0.5), 0 elsewhere. Pre-norm, d = out - x.
    Post-norm, out = (z - mean) / std · weight + bias with z = x + d; features 0 and 1 of s are
    0, so z = x there, which gives each row's mean and std, hence z, hence d."""
    if norm_first:
        d = out - x
    else:
        u = (out - params[1]) / params[0]  # (z - mean) / std
        std = (x[..., :1] - x[..., 1:2]) / (u[..., :1] - u[..., 1:2])
        d = u * std + (x[..., :1] - u[..., :1] * std) - x
    return (d - 2 * s).abs() < d.abs()


def _residual_training(cls, reveal):
    """Any correct dropout passes, however it draws its mask: the mask is read off the output."""
    x = randn(4, 6, 16, seed=430, dtype=torch.float64)
    for norm_first in (False, True):
        out, rerun, params, sublayer = _run_residual(cls, x, norm_first, zero=2, dropout=0.5,
                                                     train=True)  # fmt: skip
        expect_shape("output in training mode", out, x.shape, x.dtype)
        s = sublayer(reference_layer_norm(x, 16, params, 1e-5) if norm_first else x).detach()
        kept = _kept(out.detach(), x, s, norm_first, params)
        expected = reference_residual(x, sublayer, params, norm_first, kept, 0.5).detach()
        what = f"{ORDER[norm_first]}, training mode, dropout=0.5, on the entries your dropout kept"
        _expect_close(what, out, expected, reveal, rerun, RESIDUAL_MISTAKES)
        share = kept[..., 2:].double().mean().item()
        if not 0.3 < share < 0.7:
            what = f"{ORDER[norm_first]}, training mode, dropout=0.5"
            raise CheckFailed(f"{what}: your dropout kept {share:.0%} of the sublayer's output, "
                              "expected about half.")  # fmt: skip


def _residual_gradients(cls, reveal):
    x, params = randn(2, 5, 8, seed=440, dtype=torch.float64), _ln_params(8, 9, torch.float64)
    sublayer = _sublayer(8, torch.float64, mlp=True)
    for norm_first in (False, True):
        build = _residual_of(8, params, x.dtype, mlp=True, norm_first=norm_first)
        _gradients(cls, RESIDUAL_MISTAKES, build, lambda x, *p, n=norm_first: reference_residual(
                   x, sublayer, p, n), x, params, ("norm.weight", "norm.bias"), ORDER[norm_first],
                   reveal)  # fmt: skip


def _residual_on_device(device):
    def run(cls, reveal):
        for norm_first in (False, True):
            if device != "meta":
                x, what = randn(2, 5, 8, seed=450).to(device), f"{ORDER[norm_first]}, on {device}"
                _compare_residual(cls, x, reveal, what, norm_first, mlp=True)
                continue
            for train in (False, True):
                build = _residual_of(8, _ln_params(8, 9), train=train, dropout=0.5,
                                     norm_first=norm_first)  # fmt: skip
                _on_meta(cls, RESIDUAL_MISTAKES, build, (2, 5, 8), f"Residual(dropout=0.5, "
                         f"norm_first={norm_first}), training={train}")  # fmt: skip

    return run


RESIDUAL = Exercise(
    "residual",
    (
        Case("self.norm is your LayerNorm(dim), and it is right", "visible", _residual_structure),
        Case("post-norm: norm(x + sublayer(x))", "visible", _residual_order(False)),
        Case("pre-norm: x + sublayer(norm(x))", "visible", _residual_order(True)),
        Case("2-D to 4-D inputs, an MLP sublayer, both orders", "hidden", _residual_shapes),
        Case("float64 in, float64 out", "hidden",
             lambda cls, reveal: _residual_shapes(cls, reveal, torch.float64)),
        Case("eval mode: no dropout, even with dropout=0.5", "hidden", _residual_eval),
        Case("training mode: dropout on the sublayer's output only", "hidden",
             _residual_training),
        Case("gradients equal the closed form's", "hidden", _residual_gradients),
        Case("creates nothing on the CPU (meta device)", "hidden", _residual_on_device("meta"),
             "meta"),
        Case("runs on CUDA", "hidden", _residual_on_device("cuda"), "cuda"),
    ),
    RESIDUAL_MISTAKES,
    reference=model.Residual,
)  # fmt: skip

check_layer_norm = LAYER_NORM.check
check_rms_norm = RMS_NORM.check
check_residual = RESIDUAL.check
