"""Checks for chapter 6: `TransformerBlock`, `TransformerEncoder`, and a trained sorting model.

References: PyTorch's `nn.TransformerEncoderLayer` and `nn.TransformerEncoder` (batch first,
ReLU, dropout 0) with every weight copied into the learner's modules. The training exercise
is judged on held-out sequences that the check draws itself.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import model
from ..data import sorting_batch
from .core import (
    Case,
    CheckFailed,
    Exercise,
    LibraryCalls,
    Mistake,
    attempt,
    devices_mixed_up,
    expect_close,
    expect_device,
    expect_on_meta,
    expect_shape,
    first_step_on_meta,
    forked_rng,
    load_linears,
    on_meta,
    randn,
    seeded,
)

# Two sublayers and two norms of float32 arithmetic on O(1) values stay far below 1e-5.
TOLERANCE = {torch.float32: (1e-5, 0.0), torch.float64: (1e-10, 0.0)}
E, H, F_HIDDEN = 16, 4, 32  # the block size most cases use


# ---------------------------------------------------------------------------------------
# The catalogue: the block as learners get it wrong. `_CataloguedBlock` is correct.


class _CataloguedBlock(nn.Module):
    def __init__(self, embed_dim, num_heads, ff_hidden_dim, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.attention = model.MultiHeadAttention(embed_dim, num_heads, dropout)
        self.norm1 = model.LayerNorm(embed_dim)
        self.norm2 = model.LayerNorm(embed_dim)
        self.ff = model.FeedForward(embed_dim, ff_hidden_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def attend(self, x, mask):
        return self.dropout(self.attention(x, x, x, mask)[0])

    def feed(self, x):
        return self.dropout(self.ff(x))

    def norms(self):
        return self.norm1, self.norm2

    def forward(self, x, mask=None):
        norm1, norm2 = self.norms()
        if self.norm_first:
            x = x + self.attend(norm1(x), mask)
            return x + self.feed(norm2(x))
        x = norm1(x + self.attend(x, mask))
        return norm2(x + self.feed(x))


class _SkipFromBlockInput(_CataloguedBlock):
    def forward(self, x, mask=None):
        if self.norm_first:
            h = x + self.attend(self.norm1(x), mask)
            return x + self.feed(self.norm2(h))
        h = self.norm1(x + self.attend(x, mask))
        return self.norm2(x + self.feed(h))


class _NormsSwapped(_CataloguedBlock):
    def norms(self):
        return self.norm2, self.norm1


class _MaskIgnored(_CataloguedBlock):
    def attend(self, x, mask):
        return super().attend(x, None)


class _DropoutInEval(_CataloguedBlock):
    def feed(self, x):
        return F.dropout(self.ff(x), self.dropout.p, training=True)


class _NormFirstIgnored(_CataloguedBlock):
    def forward(self, x, mask=None):
        x = self.norm1(x + self.attend(x, mask))
        return self.norm2(x + self.feed(x))


class _NormInsideResidual(_CataloguedBlock):
    def forward(self, x, mask=None):
        if self.norm_first:
            return super().forward(x, mask)
        x = x + self.norm1(self.attend(x, mask))
        return x + self.norm2(self.feed(x))


class _SequenceFirstTrap(_CataloguedBlock):
    """The article's block: nn.MultiheadAttention without batch_first, fed (B, L, E)."""

    def __init__(self, embed_dim, num_heads, ff_hidden_dim, dropout=0.1, norm_first=False):
        super().__init__(embed_dim, num_heads, ff_hidden_dim, dropout, norm_first)
        self.attention = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout)

    def attend(self, x, mask):
        return self.dropout(self.attention(x, x, x)[0])


BLOCK_MISTAKES = (
    Mistake(
        "skip_from_block_input",
        "the feed-forward's residual adds the block's input x instead of the attention "
        "sublayer's output: each skip connection goes around its own sublayer.",
        _SkipFromBlockInput,
    ),
    Mistake(
        "norms_swapped",
        "norm1 and norm2 are used the other way round: norm1 belongs to the attention "
        "sublayer, norm2 to the feed-forward one.",
        _NormsSwapped,
    ),
    Mistake(
        "mask_lets_padding_through",
        "the mask does not reach the attention, so padded keys are attended to.",
        _MaskIgnored,
    ),
    Mistake(
        "dropout_in_eval",
        "dropout is applied in eval mode; use nn.Dropout (self.dropout) so that eval mode "
        "is deterministic.",
        _DropoutInEval,
    ),
    Mistake(
        "norm_first_ignored",
        "norm_first=True still gives a post-norm block; pre-norm is "
        "x + dropout(sublayer(norm(x))).",
        _NormFirstIgnored,
    ),
    Mistake(
        "norm_inside_residual",
        "post-norm normalizes the sum, norm(x + sublayer(x)), not the sublayer's output alone.",
        _NormInsideResidual,
    ),
    Mistake(
        "sequence_first_trap",
        "attention is nn.MultiheadAttention without batch_first=True: fed (B, L, E), it attends "
        "across the batch. Use your chapter 2 MultiHeadAttention, which is batch first.",
        _SequenceFirstTrap,
    ),
)
BLOCK_MISTAKE = {m.id: m for m in BLOCK_MISTAKES}


# ---------------------------------------------------------------------------------------
# Weights: one seeded nn.TransformerEncoderLayer, copied into the learner's block.


def _reference_layer(e, h, f, norm_first, dtype, seed):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(e, h, f, dropout=0.0, activation="relu",
                                       batch_first=True, norm_first=norm_first)  # fmt: skip
    with torch.no_grad():  # norms away from (1, 0), so that swapping them shows
        for norm in (layer.norm1, layer.norm2):
            norm.weight.normal_(1.0, 0.5)
            norm.bias.normal_(0.0, 0.5)
    return layer.to(dtype)


def _copy_norm(name, norm, ref):
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)):
        raise CheckFailed(f"{name} should be your chapter 5 LayerNorm, with weight and bias.")
    if weight.shape != ref.weight.shape:
        raise CheckFailed(f"{name}.weight has shape {tuple(weight.shape)}, expected "
                          f"{tuple(ref.weight.shape)}.")  # fmt: skip
    with torch.no_grad():
        weight.copy_(ref.weight)
        bias.copy_(ref.bias)


def _load_block(block, ref):
    """Copy a TransformerEncoderLayer's weights into the learner's block, checking its parts."""
    attention = getattr(block, "attention", None)
    if isinstance(attention, nn.MultiheadAttention):
        raise CheckFailed(
            "block.attention is nn.MultiheadAttention; the block is built from your parts.",
            BLOCK_MISTAKE["sequence_first_trap"],
        )
    if attention is None or not isinstance(getattr(block, "ff", None), nn.Module):
        raise CheckFailed("The block needs attributes attention, norm1, norm2, ff and dropout.")
    q, k, v = ref.self_attn.in_proj_weight.chunk(3)
    bq, bk, bv = ref.self_attn.in_proj_bias.chunk(3)
    out = (ref.self_attn.out_proj.weight, ref.self_attn.out_proj.bias)
    load_linears(attention, {"q_proj": (q, bq), "k_proj": (k, bk), "v_proj": (v, bv),
                             "out_proj": out})  # fmt: skip
    load_linears(block.ff, {"linear1": (ref.linear1.weight, ref.linear1.bias),
                            "linear2": (ref.linear2.weight, ref.linear2.bias)})  # fmt: skip
    _copy_norm("norm1", getattr(block, "norm1", None), ref.norm1)
    _copy_norm("norm2", getattr(block, "norm2", None), ref.norm2)


def _pytorch_masks(mask, b, h, length):
    """Ours (True = may attend) as PyTorch's keyword arguments (True = may not)."""
    if mask is None:
        return {}
    if mask.shape == (b, 1, 1, length):
        return {"src_key_padding_mask": ~mask[:, 0, 0, :]}
    return {"src_mask": ~mask.expand(b, h, length, length).reshape(b * h, length, length)}


def _padding(b, length, seed):
    """A (B, 1, 1, L) mask: each sequence has its own number of real positions, at least 1."""
    lengths = torch.randint(1, length + 1, (b,), generator=seeded(seed))
    lengths[0] = length
    return (torch.arange(length) < lengths[:, None])[:, None, None, :]


def _run_block(cls, x, mask, norm_first, seed=0, dropout=0.0, f=F_HIDDEN, h=H):
    e, dtype = x.shape[-1], x.dtype
    ref = _reference_layer(e, h, f, norm_first, dtype, seed)
    cpu_mask = None if mask is None else mask.cpu()
    expected = ref(x.cpu(), **_pytorch_masks(cpu_mask, x.shape[0], h, x.shape[1]))

    def rerun(impl):
        block = impl(e, h, f, dropout=dropout, norm_first=norm_first).to(dtype)
        _load_block(block, ref)
        return block.to(x.device).eval()(x.clone(), mask)

    what = f"x {tuple(x.shape)}, norm_first={norm_first}"
    yours = attempt(rerun, cls, BLOCK_MISTAKES, what)
    expect_device("Your output", yours, x.device)
    return yours, expected.detach(), rerun


def _compare_block(cls, x, mask, norm_first, reveal, what, **kwargs):
    yours, expected, rerun = _run_block(cls, x, mask, norm_first, **kwargs)
    atol, rtol = TOLERANCE[x.dtype]
    if mask is not None and mask.shape[1:3] == (1, 1):  # PyTorch's padded rows are arbitrary
        keep = mask[:, 0, 0, :, None].cpu()
        yours, expected = yours * keep.to(yours.device), expected * keep
        rerun_masked = lambda impl: rerun(impl) * keep.to(x.device)  # noqa: E731
    else:
        rerun_masked = rerun
    expect_close(f"output ({what})", yours, expected, atol=atol, rtol=rtol, reveal=reveal,
                 rerun=rerun_masked, mistakes=BLOCK_MISTAKES)  # fmt: skip


def _block_structure(cls, reveal):
    block = cls(E, H, F_HIDDEN, dropout=0.1)
    _load_block(block, _reference_layer(E, H, F_HIDDEN, False, torch.float32, 0))
    if not isinstance(getattr(block, "dropout", None), nn.Dropout):
        raise CheckFailed("block.dropout should be an nn.Dropout.")


def _block_shape(cls, reveal):
    x = randn(2, 5, E, seed=600)
    yours, _, _ = _run_block(cls, x, None, False)
    expect_shape("output for x of shape (2, 5, 16)", yours, (2, 5, E), x.dtype)


def _post_norm(cls, reveal):
    _compare_block(cls, randn(2, 6, E, seed=601), None, False, reveal, "post-norm")


def _pre_norm(cls, reveal):
    _compare_block(cls, randn(2, 6, E, seed=602), None, True, reveal, "pre-norm")


def _masks(cls, reveal):
    x = randn(3, 7, E, seed=603)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    for norm_first in (False, True):
        _compare_block(cls, x, _padding(3, 7, 604), norm_first, reveal,
                       f"padding mask (3, 1, 1, 7), norm_first={norm_first}")  # fmt: skip
        _compare_block(cls, x, causal, norm_first, reveal, f"causal mask, norm_first={norm_first}")


def _padding_is_invisible(cls, reveal):
    """Changing what sits at padded positions changes nothing at real positions."""
    x = randn(3, 7, E, seed=605)
    mask = _padding(3, 7, 606)
    noise = randn(3, 7, E, seed=607) * ~mask[:, 0, 0, :, None]

    def change(impl):
        block = impl(E, H, F_HIDDEN, dropout=0.0, norm_first=True)
        _load_block(block, _reference_layer(E, H, F_HIDDEN, True, torch.float32, 0))
        block.eval()
        return (block(x + noise, mask) - block(x, mask)) * mask[:, 0, 0, :, None]

    expect_close("change at real positions when only padded positions change",
                 attempt(change, cls, BLOCK_MISTAKES), torch.zeros(3, 7, E), atol=1e-6, rtol=0,
                 reveal=reveal, rerun=change, mistakes=BLOCK_MISTAKES)  # fmt: skip


def _shapes_and_dtypes(cls, reveal):
    for i, (b, length, e, h, f) in enumerate(
        [(1, 1, 8, 2, 16), (4, 9, 24, 3, 48), (2, 5, 12, 12, 8)]
    ):
        for dtype in (torch.float32, torch.float64):
            x = randn(b, length, e, seed=610 + i, dtype=dtype)
            for norm_first in (False, True):
                what = f"B {b}, L {length}, E {e}, H {h}, F {f}, {dtype}, norm_first={norm_first}"
                _compare_block(cls, x, None, norm_first, reveal, what, f=f, h=h)


def _eval_is_deterministic(cls, reveal):
    x = randn(2, 6, E, seed=620)
    for norm_first in (False, True):
        no_dropout, _, _ = _run_block(cls, x, None, norm_first)
        with_dropout, _, _ = _run_block(cls, x, None, norm_first, dropout=0.3)
        if not torch.equal(no_dropout, with_dropout):
            raise CheckFailed("In eval mode, dropout=0.3 changed the output.",
                              BLOCK_MISTAKE["dropout_in_eval"])  # fmt: skip


def _gradients(cls, reveal):
    x = randn(2, 5, E, seed=630, dtype=torch.float64)
    ref = _reference_layer(E, H, F_HIDDEN, True, torch.float64, 0)
    block = cls(E, H, F_HIDDEN, dropout=0.0, norm_first=True).to(torch.float64)
    _load_block(block, ref)
    g = randn(2, 5, E, seed=631, dtype=torch.float64)
    (block(x) * g).sum().backward()
    (ref(x) * g).sum().backward()
    pairs = [("ff.linear1.weight", block.ff.linear1.weight, ref.linear1.weight),
             ("norm1.weight", block.norm1.weight, ref.norm1.weight),
             ("attention.out_proj.weight", block.attention.out_proj.weight,
              ref.self_attn.out_proj.weight)]  # fmt: skip
    for name, yours, theirs in pairs:
        if yours.grad is None:
            raise CheckFailed(f"No gradient reached {name}.")
        expect_close(f"gradient of {name}", yours.grad, theirs.grad, atol=1e-9, rtol=1e-7,
                     reveal=reveal)  # fmt: skip


def _no_library_call(cls, reveal):
    block = cls(E, H, F_HIDDEN, dropout=0.0)
    forbidden = (F.multi_head_attention_forward, F.scaled_dot_product_attention, F.layer_norm)
    with LibraryCalls(*forbidden) as calls:
        block(randn(2, 4, E, seed=640))
    if calls.called:
        raise CheckFailed(f"Your block calls {calls.called[0]}; build it from your own parts.",
                          BLOCK_MISTAKE["sequence_first_trap"]
                          if "multi_head" in calls.called[0] else None)  # fmt: skip


def _block_on_device(device):
    def run(cls, reveal):
        x, mask = randn(2, 5, E, seed=650), _padding(2, 5, 651)
        if device != "meta":
            return _compare_block(cls, x.to(device), mask.to(device), True, reveal,
                                  f"on {device}")  # fmt: skip
        ref = _reference_layer(E, H, F_HIDDEN, True, torch.float32, 0)

        def call(impl):
            block = impl(E, H, F_HIDDEN, dropout=0.0, norm_first=True)
            _load_block(block, ref)
            meta_x = torch.empty(2, 5, E, device="meta")
            return block.to("meta")(meta_x, mask.to("meta"))

        out = attempt(on_meta(call), cls, BLOCK_MISTAKES, "block and x on the meta device")
        expect_on_meta("output", out, (2, 5, E))

    return run


TRANSFORMER_BLOCK = Exercise(
    "transformer_block",
    (
        Case("has attention, norm1, norm2, ff and dropout", "visible", _block_structure),
        Case("output shape", "visible", _block_shape),
        Case("post-norm agrees with nn.TransformerEncoderLayer", "visible", _post_norm),
        Case("pre-norm agrees with nn.TransformerEncoderLayer", "visible", _pre_norm),
        Case("does not call PyTorch's attention or layer norm", "visible", _no_library_call),
        Case("padding and causal masks", "hidden", _masks),
        Case("padded positions never change real outputs", "hidden", _padding_is_invisible),
        Case("many shapes, float32 and float64", "hidden", _shapes_and_dtypes),
        Case("eval mode is deterministic", "hidden", _eval_is_deterministic),
        Case("gradients equal PyTorch's", "hidden", _gradients),
        Case(
            "creates nothing on the CPU (meta device)", "hidden", _block_on_device("meta"), "meta"
        ),
        Case("runs on CUDA", "hidden", _block_on_device("cuda"), "cuda"),
    ),
    BLOCK_MISTAKES,
    reference=model.TransformerBlock,
)
check_transformer_block = TRANSFORMER_BLOCK.check


# ---------------------------------------------------------------------------------------
# TransformerEncoder against nn.TransformerEncoder, layer by layer.


class _CataloguedEncoder(nn.Module):
    def __init__(self, num_layers, embed_dim, num_heads, ff_hidden_dim, dropout=0.1,
                 norm_first=False):  # fmt: skip
        super().__init__()
        self.layers = self.stack(num_layers, embed_dim, num_heads, ff_hidden_dim, dropout,
                                 norm_first)  # fmt: skip
        self.norm = model.LayerNorm(embed_dim) if norm_first else None

    def stack(self, n, *args):
        return nn.ModuleList(_CataloguedBlock(*args) for _ in range(n))

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x if self.norm is None else self.norm(x)


class _OneBlockRepeated(_CataloguedEncoder):
    def stack(self, n, *args):
        return nn.ModuleList([_CataloguedBlock(*args)] * n)


class _NoFinalNorm(_CataloguedEncoder):
    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x


class _FinalNormAlways(_CataloguedEncoder):
    def __init__(self, num_layers, embed_dim, *args, **kwargs):
        super().__init__(num_layers, embed_dim, *args, **kwargs)
        self.norm = model.LayerNorm(embed_dim)


class _MaskNotPassedOn(_CataloguedEncoder):
    def forward(self, x, mask=None):
        return super().forward(x, None)


ENCODER_MISTAKES = (
    Mistake(
        "one_block_repeated",
        "the same block object is repeated ([block] * n), so all layers share one set of "
        "weights; build a new TransformerBlock for each layer.",
        _OneBlockRepeated,
    ),
    Mistake(
        "no_final_norm",
        "a pre-norm stack needs one more LayerNorm after the last block (self.norm): its "
        "residual stream is never normalized otherwise.",
        _NoFinalNorm,
    ),
    Mistake(
        "final_norm_in_post_norm",
        "a post-norm stack already ends with a norm; the extra final LayerNorm is only for "
        "norm_first=True.",
        _FinalNormAlways,
    ),
    Mistake("mask_not_passed_on", "the mask is not passed to the blocks.", _MaskNotPassedOn),
)


def _run_encoder(cls, x, mask, norm_first, num_layers=3, seed=10):
    e, dtype = x.shape[-1], x.dtype
    refs = [
        _reference_layer(e, H, F_HIDDEN, norm_first, dtype, seed + i) for i in range(num_layers)
    ]
    final = nn.LayerNorm(e).to(dtype) if norm_first else None
    if final is not None:
        with torch.no_grad():
            final.weight.normal_(1.0, 0.5, generator=seeded(seed))
            final.bias.normal_(0.0, 0.5, generator=seeded(seed + 1))
    expected, cpu_mask = x.cpu(), None if mask is None else mask.cpu()
    for ref in refs:  # nn.TransformerEncoder does exactly this, without its fast paths
        expected = ref(expected, **_pytorch_masks(cpu_mask, x.shape[0], H, x.shape[1]))
    expected = expected if final is None else final(expected)

    def rerun(impl):
        encoder = impl(num_layers, e, H, F_HIDDEN, dropout=0.0, norm_first=norm_first).to(dtype)
        layers = getattr(encoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) != num_layers:
            raise CheckFailed(f"encoder.layers should be an nn.ModuleList of {num_layers} blocks.")
        for block, ref in zip(layers, refs, strict=True):
            _load_block(block, ref)
        norm = getattr(encoder, "norm", None)
        if final is not None:
            _copy_norm("norm", norm, final)
        return encoder.to(x.device).eval()(x.clone(), mask)

    yours = attempt(rerun, cls, ENCODER_MISTAKES, f"x {tuple(x.shape)}, norm_first={norm_first}")
    expect_device("Your output", yours, x.device)
    return yours, expected.detach(), rerun


def _compare_encoder(cls, x, mask, norm_first, reveal, what):
    yours, expected, rerun = _run_encoder(cls, x, mask, norm_first)
    expect_close(f"output ({what})", yours, expected, atol=1e-5, rtol=0, reveal=reveal,
                 rerun=rerun, mistakes=ENCODER_MISTAKES)  # fmt: skip


def _encoder_post_norm(cls, reveal):
    _compare_encoder(cls, randn(2, 6, E, seed=700), None, False, reveal, "3 post-norm layers")


def _encoder_pre_norm(cls, reveal):
    _compare_encoder(cls, randn(2, 6, E, seed=701), None, True, reveal, "3 pre-norm layers")


def _encoder_masks(cls, reveal):
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for norm_first in (False, True):
        _compare_encoder(cls, randn(2, 6, E, seed=702), causal, norm_first, reveal,
                         f"causal mask, norm_first={norm_first}")  # fmt: skip


def _encoder_on_device(device):
    def run(cls, reveal):
        if device != "meta":
            causal = torch.ones(5, 5, dtype=torch.bool).tril().to(device)
            x = randn(2, 5, E, seed=703).to(device)
            return _compare_encoder(cls, x, causal, True, reveal, f"causal mask, on {device}")

        def call(impl):
            encoder = impl(2, E, H, F_HIDDEN, dropout=0.0, norm_first=True).to("meta")
            return encoder(torch.empty(2, 5, E, device="meta"))

        out = attempt(on_meta(call), cls, ENCODER_MISTAKES, "encoder and x on the meta device")
        expect_on_meta("output", out, (2, 5, E))

    return run


TRANSFORMER_ENCODER = Exercise(
    "transformer_encoder",
    (
        Case("post-norm stack agrees with PyTorch's layers", "visible", _encoder_post_norm),
        Case("pre-norm stack, with its final norm", "visible", _encoder_pre_norm),
        Case("a causal mask reaches every block", "hidden", _encoder_masks),
        Case(
            "creates nothing on the CPU (meta device)", "hidden", _encoder_on_device("meta"), "meta"
        ),
        Case("runs on CUDA", "hidden", _encoder_on_device("cuda"), "cuda"),
    ),
    ENCODER_MISTAKES,
    reference=model.TransformerEncoder,
    also_forbidden=(model.TransformerBlock,),
)
check_transformer_encoder = TRANSFORMER_ENCODER.check


# ---------------------------------------------------------------------------------------
# Training: a sorting model built on the learner's encoder, trained by the learner's loop,
# judged on held-out sequences the check draws itself.

NUM_STEPS = 400  # the training budget: the recipe of the chapter reaches 99.9 % in it
TARGET = 0.97  # exact-sequence accuracy on 2,000 held-out sequences
LENGTH, VOCAB = 8, 10


def _sorting_model(cls, reveal):
    tokens = sorting_batch(3, generator=seeded(800))[0]
    logits = attempt(lambda impl: impl()(tokens), cls, SORTING_MODEL_MISTAKES, "tokens (3, 8)")
    expect_shape("logits for tokens of shape (3, 8)", logits, (3, LENGTH, VOCAB), torch.float32)


def _uses_your_encoder(cls, reveal):
    pytorch = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)
    found = [type(m).__name__ for m in cls().modules() if isinstance(m, pytorch)]
    if found:
        raise CheckFailed(f"SortingModel contains PyTorch's {found[0]}; build it on your own "
                          "TransformerEncoder.")  # fmt: skip


def _knows_positions(cls, reveal):
    """Seven equal digits must still give position-dependent logits, or sorting is impossible."""
    torch.manual_seed(0)
    logits = cls()(torch.full((1, LENGTH), 7)).detach()
    if torch.allclose(logits[0, 0], logits[0, 1:], atol=1e-6):
        raise CheckFailed("Every position of 7 7 7 7 7 7 7 7 gets the same logits.",
                          SORTING_MODEL_MISTAKE["no_positions"])  # fmt: skip


def _sorting_model_on_device(device):
    def run(cls, reveal):
        if device != "meta":  # one model, its logits on the CPU and on the device
            tokens = sorting_batch(3, generator=seeded(801))[0]
            torch.manual_seed(0)
            net = attempt(lambda impl: impl().eval(), cls, SORTING_MODEL_MISTAKES)
            with torch.no_grad():
                expected = net(tokens)
                logits = attempt(lambda impl: impl.to(device)(tokens.to(device)), net, (),
                                 f"model and tokens (3, 8) on {device}")  # fmt: skip
            expect_device("Your logits", logits, device)
            return expect_close(f"logits for tokens (3, 8) on {device}", logits, expected,
                                atol=1e-5, rtol=0, reveal=reveal)  # fmt: skip

        def call(impl):
            return impl().to("meta")(torch.zeros(2, LENGTH, dtype=torch.long, device="meta"))

        logits = attempt(on_meta(call), cls, SORTING_MODEL_MISTAKES, "model and tokens on meta")
        expect_on_meta("logits", logits, (2, LENGTH, VOCAB))

    return run


class _NoPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.encoder = _CataloguedEncoder(1, 32, 2, 64, dropout=0.0, norm_first=True)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


SORTING_MODEL_MISTAKES = (
    Mistake(
        "no_positions",
        "the model has no positional encoding: attention alone cannot tell the positions "
        "apart, so equal digits at different positions get equal outputs.",
        _NoPositions,
    ),
)
SORTING_MODEL_MISTAKE = {m.id: m for m in SORTING_MODEL_MISTAKES}

SORTING_MODEL = Exercise(
    "sorting_model",
    (
        Case("maps tokens (B, 8) to logits (B, 8, 10)", "visible", _sorting_model),
        Case("is built on your encoder, not PyTorch's", "visible", _uses_your_encoder),
        Case("knows the positions", "visible", _knows_positions),
        Case(
            "creates nothing on the CPU (meta device)",
            "hidden",
            _sorting_model_on_device("meta"),
            "meta",
        ),
        Case(
            "runs on CUDA, with the CPU's logits",
            "hidden",
            _sorting_model_on_device("cuda"),
            "cuda",
        ),
    ),
    SORTING_MODEL_MISTAKES,
    reference=model.SortingModel,
    also_forbidden=(model.TransformerEncoder, model.TransformerBlock),
)
check_sorting_model = SORTING_MODEL.check


def _train_and_score(train, model_cls, seed, held_out_seed, device):
    """Train a fresh model on `device` with the learner's loop; its accuracy on held-out
    sequences."""
    with forked_rng(device):
        torch.manual_seed(seed)
        net = model_cls().to(device)
        before = [p.detach().clone() for p in net.parameters()]
        with devices_mixed_up(device, TRAIN_MISTAKE["batches_off_the_model_device"]):
            train(net, NUM_STEPS)
    net.eval()
    tokens, targets = sorting_batch(2000, generator=seeded(held_out_seed))
    with torch.no_grad():
        predictions = net(tokens.to(device)).argmax(-1).cpu()
    unchanged = all(torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    copies = (predictions == tokens).all(-1).float().mean().item()
    return (predictions == targets).all(-1).float().mean().item(), unchanged, copies


def _trained(seed, held_out_seed, device="cpu"):
    def run(impl, reveal):
        train, model_cls = impl
        accuracy, unchanged, copies = _train_and_score(
            train, model_cls, seed, held_out_seed, device
        )
        if accuracy >= TARGET:
            return
        mistake = None
        if unchanged:
            mistake = TRAIN_MISTAKE["no_optimizer_step"]
        elif copies > 0.5:
            mistake = TRAIN_MISTAKE["trained_to_copy"]
        raise CheckFailed(
            f"After {NUM_STEPS} steps of your training loop, with the model on {device}, "
            f"{accuracy:.1%} of 2,000 held-out sequences come out sorted exactly; at least "
            f"{TARGET:.0%} are needed.",
            mistake,
        )

    return run


def _trains_on_meta(impl, reveal):
    train, model_cls = impl
    net = model_cls().to("meta")
    first_step_on_meta(lambda: train(net, 2), TRAIN_MISTAKE["batches_off_the_model_device"])


def _loop(net, num_steps, step=True, to_copy=False, on_model_device=True):
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    device = next(net.parameters()).device if on_model_device else None
    for _ in range(num_steps):
        tokens, targets = sorting_batch(128, device=device)
        opt.zero_grad()
        wanted = tokens if to_copy else targets
        F.cross_entropy(net(tokens).flatten(0, 1), wanted.flatten()).backward()
        if step:
            opt.step()


TRAIN_MISTAKES = (
    Mistake(
        "batches_off_the_model_device",
        "the batches stay on the CPU while the model is on another device (a GPU, or the meta "
        "device, on which the check finds this without a GPU): draw each batch on the model's "
        "device, sorting_batch(batch_size, device=next(model.parameters()).device).",
        functools.partial(_loop, on_model_device=False),
    ),
    Mistake(
        "no_optimizer_step",
        "the parameters never change: call optimizer.step() after loss.backward().",
        functools.partial(_loop, step=False),
    ),
    Mistake(
        "trained_to_copy",
        "the model learned to copy its input: the loss compares the logits with the input "
        "digits instead of the sorted ones (the second tensor of sorting_batch).",
        functools.partial(_loop, to_copy=True),
    ),
)
TRAIN_MISTAKE = {m.id: m for m in TRAIN_MISTAKES}

TRAIN_SORTING_MODEL = Exercise(
    "train_sorting_model",
    (
        Case(
            f"sorts ≥ {TARGET:.0%} of held-out sequences after {NUM_STEPS} steps",
            "visible",
            _trained(seed=0, held_out_seed=900),
        ),
        Case(
            "again, from another initialization, on other held-out sequences",
            "hidden",
            _trained(seed=1, held_out_seed=901),
        ),
        Case("keeps its batches on the model's device (meta)", "hidden", _trains_on_meta, "meta"),
        Case(
            "trains on CUDA",
            "hidden",
            _trained(seed=2, held_out_seed=902, device="cuda"),
            "cuda",
        ),
    ),  # fmt: skip
    TRAIN_MISTAKES,
    reference=(model.train_sorting_model, model.SortingModel),
)


def check_train_sorting_model(train, model_cls, suite="visible"):
    """Trains a fresh model_cls() with train(model, num_steps) and scores it on held-out data."""
    TRAIN_SORTING_MODEL.check((train, model_cls), suite)
