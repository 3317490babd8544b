"""Reference components of the course, one per exercise, in the order the chapters build them.

Later chapters' pages import earlier components from here, and a learner can swap in their
own. The course's tests run every component through its exercise's checks. A graded answer
that imports from this module instead of implementing the exercise earns nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .data import augment, sorting_batch


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


# Chapter 4: position-wise feed-forward network

ACTIVATIONS = {"relu": nn.functional.relu, "gelu": nn.functional.gelu}


class FeedForward(nn.Module):
    """The same two-layer MLP at every position: linear2(dropout(activation(linear1(x))))."""

    def __init__(self, embed_dim, hidden_dim, dropout=0.0, activation="relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.linear1 = nn.Linear(embed_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, embed_dim)
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))  # (..., E)


# Chapter 5: layer normalization and residual connections


class LayerNorm(nn.Module):
    """Normalize over the last len(normalized_shape) dimensions, then scale and shift."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        dims = tuple(range(-len(self.normalized_shape), 0))
        centred = x - x.mean(dims, keepdim=True)
        var = centred.pow(2).mean(dims, keepdim=True)  # biased, as nn.LayerNorm
        y = centred * torch.rsqrt(var + self.eps)  # Tensor.var is several times slower on CPU
        return y if self.weight is None else y * self.weight + self.bias


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight over the last dimension: LayerNorm without centring."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Residual(nn.Module):
    """A sublayer with its skip connection: post-norm norm(x + dropout(sublayer(x))), or
    pre-norm x + dropout(sublayer(norm(x)))."""

    def __init__(self, sublayer, dim, dropout=0.0, norm_first=False):
        super().__init__()
        self.sublayer, self.norm_first = sublayer, norm_first
        self.norm = LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        if self.norm_first:
            return x + self.dropout(self.sublayer(self.norm(x)))
        return self.norm(x + self.dropout(self.sublayer(x)))


# Chapter 6: the transformer block


class TransformerBlock(nn.Module):
    """Attention then feed-forward, each with dropout, a residual and a LayerNorm: post-norm as
    in the original paper, or pre-norm (norm_first=True) as in GPT-2 and later."""

    def __init__(self, embed_dim, num_heads, ff_hidden_dim, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.attention = MultiHeadAttention(embed_dim, num_heads, dropout)
        self.norm1 = LayerNorm(embed_dim)
        self.norm2 = LayerNorm(embed_dim)
        self.ff = FeedForward(embed_dim, ff_hidden_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def attend(self, x, mask=None):
        return self.dropout(self.attention(x, x, x, mask)[0])

    def forward(self, x, mask=None):
        if self.norm_first:
            x = x + self.attend(self.norm1(x), mask)
            return x + self.dropout(self.ff(self.norm2(x)))
        x = self.norm1(x + self.attend(x, mask))
        return self.norm2(x + self.dropout(self.ff(x)))  # (B, L, E)


class TransformerEncoder(nn.Module):
    """num_layers blocks; pre-norm stacks end with one more LayerNorm, as in GPT-2."""

    def __init__(
        self, num_layers, embed_dim, num_heads, ff_hidden_dim, dropout=0.1, norm_first=False
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, ff_hidden_dim, dropout, norm_first)
            for _ in range(num_layers)
        )
        self.norm = LayerNorm(embed_dim) if norm_first else None

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x if self.norm is None else self.norm(x)


class SortingModel(nn.Module):
    """Digits in, logits of the same digits sorted out: token embeddings, learned positions,
    a pre-norm encoder and a linear head at every position."""

    def __init__(self, vocab_size=10, max_len=8, embed_dim=64, num_heads=4, ff_hidden_dim=128,
                 num_layers=2):  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.positions = LearnedPositionalEmbedding(max_len, embed_dim)
        self.encoder = TransformerEncoder(
            num_layers, embed_dim, num_heads, ff_hidden_dim, dropout=0.0, norm_first=True
        )
        self.head = nn.Linear(embed_dim, vocab_size)

    def forward(self, tokens):
        x = self.positions(self.embed(tokens))  # (B, L, E)
        return self.head(self.encoder(x))  # (B, L, vocab_size)


def train_sorting_model(model, num_steps, batch_size=128, lr=3e-3):
    """AdamW with a one-cycle learning rate on fresh sorting_batch batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=num_steps, pct_start=0.1
    )
    device = next(model.parameters()).device
    model.train()
    for _ in range(num_steps):
        tokens, targets = sorting_batch(batch_size, device=device)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model


# Chapter 7: the Vision Transformer


def patchify(images, patch_size):
    """(B, C, H, W) -> (B, N, C·p·p) with p = patch_size and N = (H/p)·(W/p): the patches in
    row-major order, each flattened in (channel, row, col) order, as F.unfold lays them out."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size={p}")
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C·p·p)


class PatchEmbedding(nn.Module):
    """Cut (B, C, H, W) images into patches and map each one linearly to E: (B, N, E)."""

    def __init__(self, image_size, patch_size, in_channels, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Linear(in_channels * patch_size**2, embed_dim)

    def forward(self, images):
        return self.proj(patchify(images, self.patch_size))  # (B, N, E)


class VisionTransformer(nn.Module):
    """Patches, a class token, learned positions, pre-norm blocks, a final norm and a linear
    head on the class token (pool="cls") or on the mean of the patches (pool="mean")."""

    def __init__(self, image_size, patch_size, in_channels, num_classes, embed_dim, depth,
                 num_heads, mlp_dim, dropout=0.0, pool="cls"):  # fmt: skip
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f'pool must be "cls" or "mean", got {pool!r}')
        self.pool = pool
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, embed_dim)
        num_tokens = self.patch_embed.num_patches
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            num_tokens += 1
        else:
            self.register_parameter("cls_token", None)  # mean pooling needs no class token
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, num_tokens, embed_dim))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, mlp_dim, dropout, norm_first=True)
            for _ in range(depth)
        )
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, images):
        x = self.patch_embed(images)  # (B, N, E)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, E)
        x = self.dropout(x + self.pos_embedding)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))  # (B, num_classes)


# The fused AdamW step trains the chapter 7 model ~10 % faster on a CPU, where torch has it
# since 2.4; the package allows torch 2.2 so that Colab keeps the torch it ships with.
FUSED_ADAMW = torch.torch_version.TorchVersion(torch.__version__) >= (2, 4)


def train_vision_transformer(model, images, labels, num_epochs, batch_size=128, lr=3e-3,
                             augmented=True, on_epoch=None):  # fmt: skip
    """num_epochs shuffled passes over (images, labels), each image slightly turned, scaled
    and moved if augmented, with AdamW and a one-cycle learning rate; on_epoch(epoch,
    mean_loss), if given, is called after each pass. Trains any image classifier."""
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    steps_per_epoch = -(-len(images) // batch_size)  # ceil: the last batch may be smaller
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, fused=FUSED_ADAMW)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=num_epochs * steps_per_epoch, pct_start=0.1
    )
    for epoch in range(num_epochs):
        model.train()
        order = torch.randperm(len(images), device=device)
        total = 0.0
        for batch in order.split(batch_size):
            inputs = augment(images[batch]) if augmented else images[batch]
            loss = nn.functional.cross_entropy(model(inputs), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        if on_epoch is not None:
            on_epoch(epoch, total / len(images))
    return model
