"""Checks for chapter 4: `FeedForward`, the position-wise feed-forward network.

Reference: PyTorch's own, the feed-forward half of `nn.TransformerEncoderLayer(E, 1, H,
dropout=0.0, activation=...)`, i.e. `linear2(dropout(activation(linear1(x))))` with the
learner's `linear1` and `linear2` weights copied in, for outputs and gradients. In training
mode the learner's dropout mask is read back from the output (see `_training`), so every
correct dropout passes, whatever random numbers it draws.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import model
from .core import (
    Case,
    CheckFailed,
    Exercise,
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

# (atol, rtol). Outputs are O(1) sums of at most 64 products: correct float32 variants, whatever
# their order of summation, stay within 2e-6 of PyTorch (measured in the tests), while the
# closest catalogued mistake, GELU's tanh approximation, is off by 1e-4 or more in every case.
TOLERANCE = {torch.float32: (1e-5, 0.0), torch.float64: (1e-10, 0.0)}
ACTIVATIONS = ("relu", "gelu")


# ---------------------------------------------------------------------------------------
# The catalogue: the feed-forward network as learners get it wrong. `_CataloguedFeedForward`
# is correct; each mistake is a subclass of it that replaces one step.


class _CataloguedFeedForward(nn.Module):
    functions = {"relu": F.relu, "gelu": F.gelu}

    def __init__(self, embed_dim, hidden_dim, dropout=0.0, activation="relu"):
        super().__init__()
        self.check_activation(activation)
        self.kind, self.p = activation, dropout
        self.linear1, self.linear2 = self.layers(embed_dim, hidden_dim)

    def check_activation(self, activation):
        if activation not in self.functions:
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")

    def layers(self, e, h):
        return nn.Linear(e, h), nn.Linear(h, e)

    def activation(self, h):
        return self.functions[self.kind](h)

    def dropout(self, h):
        return F.dropout(h, self.p, self.training)

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


def _with(**steps):
    """The correct module with some of its steps replaced: one catalogued mistake."""
    return type("FeedForward", (_CataloguedFeedForward,), steps)


class _CpuMask(_CataloguedFeedForward):
    def dropout(self, h):
        keep = torch.rand(h.shape) >= self.p  # made on the CPU, whatever h's device
        return h * keep / (1 - self.p) if self.training else h


class _Assumes3d(_CataloguedFeedForward):
    def forward(self, x):
        b, length, e = x.shape
        return super().forward(x.reshape(b * length, e)).view(b, length, e)


class _Detached(_CataloguedFeedForward):
    def forward(self, x):
        h = F.linear(x, self.linear1.weight.detach(), self.linear1.bias.detach())
        h = self.dropout(self.activation(h))
        return F.linear(h, self.linear2.weight.detach(), self.linear2.bias.detach())


MISTAKES = (
    Mistake(
        "no_activation",
        "there is no activation between the layers, so linear2(linear1(x)) is one linear map "
        "in disguise: it can learn nothing a single nn.Linear could not. Apply the activation to "
        "linear1's output.",
        _with(activation=lambda self, h: h),
    ),
    Mistake(
        "activation_after_linear2",
        "the activation is applied to linear2's output instead of linear1's. It belongs in the "
        "middle, on the hidden vector: linear2(activation(linear1(x))).",
        _with(forward=lambda self, x: self.activation(self.linear2(self.dropout(self.linear1(x))))),
    ),
    Mistake(
        "activation_on_output_too",
        "the activation is applied twice: in the middle, which is right, and again on linear2's "
        "output, which clips it. Return linear2's output as it is: it joins a residual sum and "
        "must be free to take any value.",
        _with(forward=lambda self, x: self.activation(_CataloguedFeedForward.forward(self, x))),
    ),
    Mistake(
        "activation_ignored",
        "the activation argument is ignored: activation='gelu' still gives ReLU. Choose the "
        "function from the argument.",
        _with(functions={"relu": F.relu, "gelu": F.relu}),
    ),
    Mistake(
        "gelu_tanh_approximation",
        "'gelu' uses GELU's tanh approximation (approximate='tanh', or 0.5·x·(1 + tanh(√(2/π)·"
        "(x + 0.044715·x³)))). The exercise asks for the exact GELU, x·Φ(x) = 0.5·x·(1 + "
        "erf(x/√2)), the default of F.gelu and nn.GELU; the two differ by up to 5e-4.",
        _with(functions={"relu": F.relu, "gelu": partial(F.gelu, approximate="tanh")}),
    ),
    Mistake(
        "no_activation_check",
        "an unknown activation does not raise a ValueError in __init__, so a typo such as 'gleu' "
        "silently builds some other network. Raise a ValueError that names the choices.",
        _with(check_activation=lambda self, activation: None),
    ),
    Mistake(
        "dims_swapped",
        "the layers' sizes are swapped. nn.Linear takes (in_features, out_features): linear1 "
        "goes up, nn.Linear(embed_dim, hidden_dim), and linear2 back down, "
        "nn.Linear(hidden_dim, embed_dim).",
        _with(layers=lambda self, e, h: (nn.Linear(h, e), nn.Linear(e, h))),
    ),
    Mistake(
        "no_bias",
        "the layers have no bias (bias=False); the paper's max(0, xW₁ + b₁)W₂ + b₂ and "
        "nn.TransformerEncoderLayer have a bias in both.",
        _with(layers=lambda self, e, h: (nn.Linear(e, h, bias=False), nn.Linear(h, e, bias=False))),
    ),
    Mistake(
        "dropout_in_eval",
        "dropout still drops in eval mode: F.dropout(h, p) defaults to training=True. Use an "
        "nn.Dropout module, or pass training=self.training.",
        _with(dropout=lambda self, h: F.dropout(h, self.p, training=True)),
    ),
    Mistake(
        "dropout_ignored",
        "the dropout argument is not used: nothing is dropped in training mode.",
        _with(dropout=lambda self, h: h),
    ),
    Mistake(
        "dropout_before_activation",
        "dropout is applied to linear1's output, before the activation; apply it after: "
        "linear2(dropout(activation(linear1(x)))). With ReLU the two orders happen to agree, "
        "with GELU they do not.",
        _with(forward=lambda self, x: self.linear2(self.activation(self.dropout(self.linear1(x))))),
    ),
    Mistake(
        "dropout_after_linear2",
        "dropout is applied to linear2's output; here it belongs on the hidden vector, between "
        "the activation and linear2. (Dropout on the sublayer's output is the residual "
        "connection's, in chapter 5.)",
        _with(forward=lambda self, x: self.dropout(self.linear2(self.activation(self.linear1(x))))),
    ),
    Mistake(
        "dropout_twice",
        "dropout is applied twice: on the hidden vector, which is right, and again on linear2's "
        "output. nn.TransformerEncoderLayer's second dropout belongs to the residual connection "
        "(chapter 5); FeedForward ends with linear2.",
        _with(forward=lambda self, x: self.dropout(_CataloguedFeedForward.forward(self, x))),
    ),
    Mistake(
        "dropout_not_scaled",
        "the kept values are not divided by 1 - p, so in training the next layer sees values "
        "(1 - p) times smaller on average than in eval. Scale them by 1 / (1 - p), as "
        "nn.Dropout does.",
        _with(dropout=lambda self, h: h * (torch.rand_like(h) >= self.p) if self.training else h),
    ),
    Mistake(
        "cpu_tensor",
        "a tensor (a dropout mask?) is created without device=..., so it lives on the CPU and the "
        "module fails on a GPU. Use torch.rand_like(h), or nn.Dropout.",
        _CpuMask,
    ),
    Mistake(
        "assumes_3d_input",
        "the code assumes x is (B, L, E), unpacking or reshaping with three sizes. The network "
        "acts on the last dimension only, so x may have any number of leading dimensions, and "
        "nn.Linear already handles them: apply it to x as it is.",
        _Assumes3d,
    ),
    Mistake(
        "detached",
        "the computation is cut off from autograd (.data, .detach() or torch.no_grad()), so no "
        "gradient reaches the layers' weights and they would never be trained.",
        _Detached,
    ),
)
MISTAKE = {m.id: m for m in MISTAKES}


# ---------------------------------------------------------------------------------------
# The learner's module against nn.TransformerEncoderLayer's feed-forward layers.


def _weights(e, h, seed, dtype=torch.float32):
    """linear1's pre-activations come out about N(0, 2), so many lie near ±2.7, where the
    exact GELU and its tanh approximation differ most; the outputs are O(1)."""
    return {
        "linear1": (randn(h, e, seed=seed, dtype=dtype, scale=e**-0.5),
                    randn(h, seed=seed + 1, dtype=dtype)),
        "linear2": (randn(e, h, seed=seed + 2, dtype=dtype, scale=h**-0.5),
                    randn(e, seed=seed + 3, dtype=dtype, scale=0.5)),
    }  # fmt: skip


def _check_layers(module, e, h):
    """Name the structural mistakes that load_linears would only describe."""
    for name, n_in, n_out in (("linear1", e, h), ("linear2", h, e)):
        layer = getattr(module, name, None)
        if not isinstance(layer, nn.Linear):
            continue  # load_linears says what is missing
        if (layer.in_features, layer.out_features) == (n_out, n_in) != (n_in, n_out):
            raise CheckFailed(f"For embed_dim={e}, hidden_dim={h}: {name} is nn.Linear("
                              f"{n_out}, {n_in}), expected nn.Linear({n_in}, {n_out}).",
                              MISTAKE["dims_swapped"])  # fmt: skip
        if layer.bias is None:
            raise CheckFailed(f"{name} has no bias.", MISTAKE["no_bias"])


def _build(cls, e, h, weights, dtype=torch.float32, device="cpu", dropout=0.0, activation=None):
    """cls(e, h, ...) with the weights copied in, in eval mode; activation=None: the default."""
    kwargs = {} if activation is None else {"activation": activation}
    module = cls(e, h, dropout=dropout, **kwargs)
    _check_layers(module, e, h)
    module = module.to(dtype)
    load_linears(module, weights)
    return module.to(device).eval()


def _pytorch(e, h, activation, weights, dtype=torch.float32):
    layer = nn.TransformerEncoderLayer(e, 1, h, dropout=0.0, activation=activation)
    load_linears(layer.to(dtype), weights)
    return layer.eval()


def _reference(layer, x):
    """The feed-forward half of nn.TransformerEncoderLayer (its _ff_block without dropout2)."""
    return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))


def _run(cls, x, h, activation=None, seed=400):
    """The learner's output, PyTorch's, and the rerun that diagnosis needs."""
    e, dtype = x.shape[-1], x.dtype
    weights = _weights(e, h, seed, dtype)
    expected = _reference(_pytorch(e, h, activation or "relu", weights, dtype), x.cpu()).detach()

    def rerun(impl):
        return _build(impl, e, h, weights, dtype, x.device, activation=activation)(x.clone())

    context = f"x {tuple(x.shape)}, embed_dim={e}, hidden_dim={h}, {activation or 'relu'}"
    yours = attempt(rerun, cls, MISTAKES, context)
    expect_device("Your output", yours, x.device)
    return yours, expected, rerun


def _compare(cls, x, h, reveal, what, activation=None):
    yours, expected, rerun = _run(cls, x, h, activation)
    atol, rtol = TOLERANCE[x.dtype]
    expect_close(what, yours, expected, atol=atol, rtol=rtol, reveal=reveal, rerun=rerun,
                 mistakes=MISTAKES)  # fmt: skip


def _structure(cls, reveal):
    _build(cls, 8, 32, _weights(8, 32, 0))


def _shape(cls, reveal):
    yours, _, _ = _run(cls, randn(2, 5, 8, seed=401), 32)
    expect_shape("output for x of shape (2, 5, 8), hidden_dim 32", yours, (2, 5, 8), torch.float32)


def _relu(cls, reveal):
    _compare(cls, randn(2, 5, 8, seed=402), 32, reveal, "default activation (ReLU), x (2, 5, 8)")


def _gelu(cls, reveal):
    _compare(cls, randn(2, 5, 8, seed=403), 32, reveal, "activation='gelu', x (2, 5, 8)", "gelu")


# x's shape and hidden_dim: 0 to 3 leading dimensions, hidden_dim above, at and below embed_dim.
SHAPES = [((8,), 32), ((5, 8), 32), ((3, 7, 16), 4), ((2, 6, 12), 12), ((2, 3, 4, 6), 24),
          ((1, 1, 4), 1)]  # fmt: skip


def _many_shapes(cls, reveal, dtype=torch.float32):
    for i, (shape, h) in enumerate(SHAPES):
        x = randn(*shape, seed=410 + i, dtype=dtype)
        for activation in ACTIVATIONS:
            what = f"x {shape}, embed_dim {shape[-1]}, hidden_dim {h}, {activation}, {dtype}"
            _compare(cls, x, h, reveal, what, activation)


def _positions_independent(cls, reveal):
    """The same network at every position: permuting positions permutes the output, and a
    position alone gives what it gives inside the sequence."""
    x = randn(3, 7, 16, seed=420)
    module = _build(cls, 16, 64, _weights(16, 64, 420), activation="gelu")
    out = module(x).detach()
    perm = torch.randperm(7, generator=seeded(421))
    for what, yours, expected in (
        (f"output for x[:, {perm.tolist()}] against output[:, same]", module(x[:, perm]),
         out[:, perm]),
        ("output for x[:, 3:4] alone against output[:, 3:4]", module(x[:, 3:4]), out[:, 3:4]),
    ):  # fmt: skip
        expect_close(what, yours, expected, atol=1e-5, rtol=0, reveal=reveal)


def _unknown_activation(cls, reveal):
    for name in ("tanh", "swish"):
        expect_value_error(lambda name=name: cls(8, 32, activation=name),
                           f"FeedForward(8, 32, activation={name!r})",
                           MISTAKE["no_activation_check"])  # fmt: skip


def _eval_is_deterministic(cls, reveal):
    """In eval mode, dropout=0.5 must change nothing: compare with the same module at 0.0."""
    x = randn(4, 10, 16, seed=430)
    weights = _weights(16, 64, 430)
    no_dropout = _build(cls, 16, 64, weights, activation="gelu")(x)
    module = _build(cls, 16, 64, weights, dropout=0.5, activation="gelu")
    for out in (module(x), module(x)):
        if not torch.equal(out, no_dropout):
            raise CheckFailed("In eval mode, dropout=0.5 changed the output (or two calls "
                              "differ).", MISTAKE["dropout_in_eval"])  # fmt: skip


def _training(cls, reveal, device="cpu"):
    """dropout=0.5 in training mode, with GELU (with ReLU, dropout before it is no mistake).
    linear2's first H rows are the identity, with zero bias, so the first H output features are
    the hidden vector after dropout, whatever random numbers the learner's dropout drew: each
    entry 0 or gelu(linear1(x)) / (1 - p), and the output PyTorch's layers on that mask. A fixed
    seed gives the catalogue the same masks, so that a mistake in dropout's place is named."""
    e, h, x = 16, 8, randn(4, 10, 16, seed=440)
    weights = _weights(e, h, 440)
    weights["linear2"][0][:h], weights["linear2"][1][:h] = torch.eye(h), 0.0
    layer = _pytorch(e, h, "gelu", weights)
    hidden = layer.activation(layer.linear1(x)).detach()  # (4, 10, H) before dropout

    def rerun(impl):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = _build(impl, e, h, weights, device=device, dropout=0.5, activation="gelu")
            return module.train()(x.to(device))

    out = attempt(rerun, cls, MISTAKES, f"x (4, 10, 16), training mode, dropout=0.5 on {device}")
    expect_device("Your output", out, device)
    expect_shape("output in training mode", out, (4, 10, 16), torch.float32)
    z = out.detach().cpu()[..., :h]  # linear2's input, as read from the output
    zero, unscaled = z.abs() < 1e-5, (z - hidden).abs() < 1e-5
    if (zero | unscaled).all() and zero.any() and unscaled.any():
        raise CheckFailed("In training mode, the hidden values your dropout keeps are "
                          "unchanged; they should be multiplied by 1 / (1 - p) = 2.",
                          MISTAKE["dropout_not_scaled"])  # fmt: skip
    kept = (z - 2 * hidden).abs() < z.abs()
    expected = layer.linear2(torch.where(kept, 2 * hidden, 0.0)).detach()
    expect_close("training mode, dropout=0.5: linear2(2·gelu(linear1(x)) where your mask keeps "
                 "it, 0 elsewhere)", out, expected, atol=1e-5, rtol=0, reveal=reveal,
                 rerun=rerun, mistakes=MISTAKES)  # fmt: skip
    dropped = 1 - kept.double().mean().item()
    if not 0.3 < dropped < 0.7:
        raise CheckFailed(f"With dropout=0.5, {dropped:.0%} of the hidden values are dropped in "
                          "training mode; expected about half.")  # fmt: skip


PARAMETERS = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")


def _gradients(cls, reveal):
    x, g = (randn(3, 5, 8, seed=seed, dtype=torch.float64) for seed in (450, 451))  # g: dL/dout
    weights = _weights(8, 32, 450, torch.float64)
    for activation in ACTIVATIONS:
        module = _build(cls, 8, 32, weights, torch.float64, activation=activation)
        layer = _pytorch(8, 32, activation, weights, torch.float64)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        out = module(xs[0])
        if not out.requires_grad:
            raise CheckFailed("Your output does not require grad.", MISTAKE["detached"])
        (out * g).sum().backward()
        (_reference(layer, xs[1]) * g).sum().backward()
        pairs = [("x", xs[0], xs[1])] + [
            (name, module.get_parameter(name), layer.get_parameter(name)) for name in PARAMETERS
        ]
        for name, yours, theirs in pairs:
            if yours.grad is None:
                raise CheckFailed(f"No gradient reached {name} ({activation}).",
                                  None if name == "x" else MISTAKE["detached"])  # fmt: skip
            expect_close(f"gradient of {name}, {activation}", yours.grad, theirs.grad,
                         atol=1e-9, rtol=1e-7, reveal=reveal)  # fmt: skip


def _on_device(device):
    def run(cls, reveal):
        if device != "meta":
            _compare(cls, randn(2, 5, 8, seed=460).to(device), 32, reveal, f"on {device}", "gelu")
            return _training(cls, reveal, device)
        weights, x = _weights(8, 32, 460), torch.empty(2, 5, 8, device="meta")

        def call(impl):
            module = _build(impl, 8, 32, weights, dropout=0.5, activation="gelu").to("meta")
            return module(x), module.train()(x)

        context = "module and x on the meta device, eval then training mode with dropout=0.5"
        for out in attempt(on_meta(call), cls, MISTAKES, context):
            expect_on_meta("output", out, (2, 5, 8))

    return run


FEED_FORWARD = Exercise(
    "feed_forward",
    (
        Case("has linear1 = nn.Linear(E, H) and linear2 = nn.Linear(H, E)", "visible", _structure),
        Case("output shape", "visible", _shape),
        Case("agrees with PyTorch (ReLU)", "visible", _relu),
        Case("agrees with PyTorch (exact GELU)", "visible", _gelu),
        Case("0 to 3 leading dimensions; hidden_dim above, at and below E", "hidden", _many_shapes),
        Case("float64 in, float64 out", "hidden", partial(_many_shapes, dtype=torch.float64)),
        Case("positions are independent", "hidden", _positions_independent),
        Case("ValueError for an unknown activation", "hidden", _unknown_activation),
        Case("eval mode is deterministic", "hidden", _eval_is_deterministic),
        Case("training mode drops hidden values after the activation", "hidden", _training),
        Case("gradients equal PyTorch's", "hidden", _gradients),
        Case("creates nothing on the CPU (meta device)", "hidden", _on_device("meta"), "meta"),
        Case("runs on CUDA", "hidden", _on_device("cuda"), "cuda"),
    ),
    MISTAKES,
    reference=model.FeedForward,
)

check_feed_forward = FEED_FORWARD.check
