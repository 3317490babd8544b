"""The chapter 7 checks, proven both ways: every catalogued mistake fails and is named,
and implementations that differ from the reference but are correct all pass."""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_course import model
from transformer_course.checks import vision_transformer as ch7
from transformer_course.checks.core import CheckFailed

from .proofs import (
    assert_fails_and_is_named,
    assert_hidden_failures_show_no_values,
    assert_meta_case_judges_only_where_the_data_is,
    assert_passes,
)

# ---- correct implementations written differently from the reference -------------------


def _check_divisible(images, p):
    if images.shape[-2] % p or images.shape[-1] % p:
        raise ValueError(f"patch_size={p} does not divide the image size {images.shape[-2:]}")


def patchify_tensor_unfold(images, patch_size):
    """Tensor.unfold twice: sliding windows along the rows, then along the columns."""
    _check_divisible(images, patch_size)
    p = patch_size
    x = images.unfold(2, p, p).unfold(3, p, p)  # (B, C, h, w, p, p)
    return x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (B, N, C·p·p)


def patchify_transpose_then_movedim(images, patch_size):
    """The einops recipe 'b c (h p) (w q) -> b (h w) (c p q)' in another order of moves."""
    _check_divisible(images, patch_size)
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p).transpose(3, 4)  # (B, C, h, w, p, p)
    return x.flatten(2, 3).movedim(1, 2).flatten(2)  # (B, N, C, p, p) -> (B, N, C·p·p)


def patchify_by_slicing(images, patch_size):
    """A loop over the grid, row by row: slow but plain."""
    _check_divisible(images, patch_size)
    p, (H, W) = patch_size, images.shape[-2:]
    squares = [images[:, :, i : i + p, j : j + p].flatten(1)  # (B, C·p·p) each
               for i in range(0, H, p) for j in range(0, W, p)]  # fmt: skip
    return torch.stack(squares, dim=1)


class ConvKernelEmbedding(nn.Module):
    """proj's weight used as a convolution kernel: no patch is ever cut out."""

    def __init__(self, image_size, patch_size, in_channels, embed_dim):
        super().__init__()
        self.p, self.c = patch_size, in_channels
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Linear(in_channels * patch_size * patch_size, embed_dim)

    def forward(self, images):
        kernel = self.proj.weight.view(-1, self.c, self.p, self.p)  # (E, C, p, p)
        out = F.conv2d(images, kernel, self.proj.bias, stride=self.p)  # (B, E, h, w)
        return out.flatten(2).transpose(1, 2)  # (B, N, E)


class EinsumEmbedding(ConvKernelEmbedding):
    """One einsum over the unpermuted grid, with proj's weight seen as (E, C, p, p)."""

    def forward(self, images):
        B, C, H, W = images.shape
        p = self.p
        x = images.reshape(B, C, H // p, p, W // p, p)
        kernel = self.proj.weight.view(-1, C, p, p)  # (E, C, p, p)
        out = torch.einsum("bchpwq,ecpq->bhwe", x, kernel) + self.proj.bias
        return out.flatten(1, 2)  # (B, N, E)


class PaddedTokenViT(nn.Module):
    """The class token placed by F.pad, the blocks folded by functools.reduce, the mean as a
    sum divided by the count; the patch embedding is the convolution above."""

    embedding = ConvKernelEmbedding

    def __init__(self, image_size, patch_size, in_channels, num_classes, embed_dim, depth,
                 num_heads, mlp_dim, dropout=0.0, pool="cls"):  # fmt: skip
        super().__init__()
        self.pool = pool
        self.patch_embed = self.embedding(image_size, patch_size, in_channels, embed_dim)
        n = self.patch_embed.num_patches + (pool == "cls")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool == "cls" else None
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, n, embed_dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [model.TransformerBlock(embed_dim, num_heads, mlp_dim, dropout, norm_first=True)
             for _ in range(depth)]
        )  # fmt: skip
        self.norm = model.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, images):
        x = self.patch_embed(images)  # (B, N, E)
        if self.cls_token is not None:  # a zero row in front, plus the token padded to 1 + N
            x = F.pad(x, (0, 0, 1, 0)) + F.pad(self.cls_token, (0, 0, 0, x.shape[1]))
        x = self.drop(x + self.pos_embedding)
        x = self.norm(functools.reduce(lambda h, block: block(h), self.blocks, x))
        return self.head(x[:, 0] if self.pool == "cls" else x.sum(1) / x.shape[1])


class SplitPositionViT(PaddedTokenViT):
    """The class token's position added before it is prepended, the patches' after; a class
    token is kept (unused) for pool="mean"; the mean by x.mean(-2)."""

    embedding = EinsumEmbedding

    def __init__(self, *args, pool="cls", **kwargs):
        super().__init__(*args, pool=pool, **kwargs)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.head.in_features))

    def forward(self, images):
        x, pos = self.patch_embed(images), self.pos_embedding
        if self.pool == "cls":
            cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], 1, -1)  # (B, 1, E)
            x = torch.cat((cls, x + pos[:, 1:]), dim=1)  # (B, 1 + N, E)
        else:
            x = x + pos
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(-2))


class TinyViT(PaddedTokenViT):
    """The recipe's interface at a fraction of its cost, for the failing training loops: they
    are named from the parameters, the accuracy and the budget, whatever the model's size."""

    def __init__(self, *, embed_dim, depth, num_heads, mlp_dim, **kwargs):
        super().__init__(embed_dim=16, depth=1, num_heads=2, mlp_dim=32, **kwargs)


def train_with_adam_constant_lr(net, images, labels, num_epochs):
    """Also fused, and logging each loss: on meta, only the check's stop at the first step
    lets it through (fused optimizers refuse meta parameters)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    device = net.head.weight.device
    losses = []
    for _ in range(num_epochs):
        net.train()
        for batch in torch.randperm(len(images)).split(64):  # each batch moved on its own
            loss = F.cross_entropy(net(images[batch].to(device)), labels[batch].to(device))
            losses.append(loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


CORRECT = [
    (ch7.PATCHIFY, patchify_tensor_unfold),
    (ch7.PATCHIFY, patchify_transpose_then_movedim),
    (ch7.PATCHIFY, patchify_by_slicing),
    (ch7.PATCH_EMBEDDING, ConvKernelEmbedding),
    (ch7.PATCH_EMBEDDING, EinsumEmbedding),
    (ch7.VISION_TRANSFORMER, PaddedTokenViT),
    (ch7.VISION_TRANSFORMER, SplitPositionViT),
]
CATALOGUE = (
    [(ch7.PATCHIFY, m) for m in ch7.PATCHIFY_MISTAKES]
    + [(ch7.PATCH_EMBEDDING, m) for m in ch7.EMBEDDING_MISTAKES]
    + [(ch7.VISION_TRANSFORMER, m) for m in ch7.VIT_MISTAKES]
)


@pytest.mark.parametrize("exercise, impl", CORRECT, ids=[i.__name__ for _, i in CORRECT])
def test_correct_variants_pass(exercise, impl):
    assert_passes(exercise, impl)


@pytest.mark.parametrize(
    "exercise, mistake", CATALOGUE, ids=[f"{e.id}-{m.id}" for e, m in CATALOGUE]
)
def test_each_catalogued_mistake_fails_and_is_named(exercise, mistake):
    assert_fails_and_is_named(exercise, mistake)


@pytest.mark.parametrize(
    "exercise, mistake",
    [
        (ch7.PATCHIFY, "row_col_channel_order"),
        (ch7.PATCH_EMBEDDING, "column_major_patches"),
        (ch7.VISION_TRANSFORMER, "cls_without_position"),
    ],
    ids=lambda x: getattr(x, "id", x),
)
def test_hidden_failures_show_no_values(exercise, mistake):
    impl = {m.id: m.impl for m in exercise.mistakes}[mistake]
    report = assert_hidden_failures_show_no_values(exercise, impl)
    assert mistake in report.mistakes, str(report)


class EmbeddingOnTheCoursePatchify(ConvKernelEmbedding):
    def forward(self, images):
        return self.proj(model.patchify(images, self.p))


def test_an_answer_that_runs_the_reference_earns_nothing():
    report = ch7.PATCH_EMBEDDING.report(EmbeddingOnTheCoursePatchify)
    assert not report.passed and "uses_reference" in report.mistakes, str(report)


@pytest.mark.slow
def test_another_correct_training_loop_reaches_the_target():
    """Constant-rate Adam, batches of 64 and a model written differently from the course's."""
    report = ch7.TRAIN_VISION_TRANSFORMER.report((train_with_adam_constant_lr, PaddedTokenViT))
    assert report.passed, str(report)


OFF_DEVICE = ch7.TRAIN_MISTAKE["images_off_the_model_device"]  # right on a CPU: meta shows it


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [m for m in ch7.TRAIN_MISTAKES if m is not OFF_DEVICE],
                         ids=lambda m: m.id)  # fmt: skip
def test_each_training_mistake_fails_and_is_named(mistake):
    report = ch7.TRAIN_VISION_TRANSFORMER.report((mistake.impl, TinyViT))
    assert not report.passed and report.mistakes == [mistake.id], str(report)


def test_the_meta_case_names_images_left_on_the_cpu_and_passes_every_other_loop():
    """The reference's AdamW is fused, which meta parameters refuse: it passes too."""
    assert_meta_case_judges_only_where_the_data_is(
        ch7.TRAIN_VISION_TRANSFORMER, OFF_DEVICE, TinyViT, [train_with_adam_constant_lr]
    )


def test_the_cuda_training_case_names_images_left_on_the_cpu_here_on_meta():
    """On meta as on CUDA, PyTorch refuses the CPU images; the case must say why."""
    with pytest.raises(CheckFailed, match="model on meta") as failure:
        ch7._trained(0, device="meta")((OFF_DEVICE.impl, TinyViT), False)
    assert failure.value.mistake is OFF_DEVICE


def test_the_cuda_cases_code_path_runs_here_on_the_cpu():
    ch7._patchify_on("cpu")(patchify_by_slicing, False)
    ch7._embedding_on("cpu")(EinsumEmbedding, False)
    ch7._vit_on("cpu")(PaddedTokenViT, False)
    wrong = [
        (ch7._patchify_on, ch7.PATCHIFY_MISTAKE["column_major_patches"]),
        (ch7._embedding_on, ch7.EMBEDDING_MISTAKE["row_col_channel_order"]),
        (ch7._vit_on, ch7.VIT_MISTAKE["mean_when_cls"]),
    ]
    for on_device, mistake in wrong:
        with pytest.raises(CheckFailed) as failure:
            on_device("cpu")(mistake.impl, False)
        assert failure.value.mistake is mistake, failure.value.message
