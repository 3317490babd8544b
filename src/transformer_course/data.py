"""Data for the course's experiments, made on the spot or shipped with a package: nothing is
downloaded."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reversal_batch(batch_size, length=8, vocab_size=10, generator=None, device=None):
    """(inputs, targets), each (batch_size, length): random digits and the same digits reversed.

    Position i of the output must copy position length - 1 - i of the input: a task no
    position-wise layer can do alone, and one attention solves with a single pattern.
    """
    inputs = torch.randint(vocab_size, (batch_size, length), generator=generator)
    return inputs.to(device), inputs.flip(-1).to(device)


def sorting_batch(batch_size, length=8, vocab_size=10, generator=None, device=None):
    """(inputs, targets), each (batch_size, length): random digits and the same digits sorted.

    Output position i holds the i-th smallest digit: each position has to compare its digit
    with every other one, which is what attention does.
    """
    inputs = torch.randint(vocab_size, (batch_size, length), generator=generator)
    return inputs.to(device), inputs.sort(dim=-1).values.to(device)


def digits(test_size=360, seed=0):
    """scikit-learn's 1,797 handwritten digits (8×8, grey; shipped with scikit-learn, never
    downloaded), split once: ((train_images, train_labels), (test_images, test_labels)).

    Images are (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64. The split is stratified
    by digit and made by NumPy's legacy generator, so it is the same on every machine.
    """
    from sklearn.datasets import load_digits  # only chapter 7 needs scikit-learn
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train, test = train_test_split(
        range(len(data.target)), test_size=test_size, stratify=data.target, random_state=seed
    )
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(data.target)
    return (images[train], labels[train]), (images[test], labels[test])


def augment(images, degrees=10.0, scale=0.1, shift=0.1):
    """Each image of (B, C, H, W) turned by up to ±degrees, scaled by up to ±scale and moved
    by up to ±shift of its half-width, at random (bilinear, zeros outside): the same digit,
    written a little differently, so a model cannot memorize the exact pixels."""

    def uniform():  # one number per image, in [-1, 1)
        return 2 * torch.rand(images.shape[0], device=images.device) - 1

    angle = uniform() * math.radians(degrees)
    zoom = 1 + uniform() * scale
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    dx, dy = uniform() * shift, uniform() * shift
    theta = torch.stack(
        [torch.stack([cos, -sin, dx], -1), torch.stack([sin, cos, dy], -1)], 1
    )  # (B, 2, 3): where each output pixel samples the input
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)  # (B, C, H, W)
