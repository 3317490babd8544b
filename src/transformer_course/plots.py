"""Plotting helpers for the course pages: attention weights and masks as pictures.

Each helper draws on the Axes it is given (or on a new figure) and returns that Axes, so a
page can lay several pictures side by side with `plt.subplots` and call `plt.show()` once.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap

# Masks: light grey where a query may not look, blue where it may (True).
MASK_COLORS = ListedColormap(["#e8e8e8", "#3b75af"])


def _as_matrix(x) -> np.ndarray:
    """A 2-D NumPy array from a tensor (any device, with or without grad) or an array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    while x.ndim > 2 and x.shape[0] == 1:  # drop leading batch dims of size 1
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {x.shape}")
    return x


def _label_axes(ax: Axes, shape, queries, keys) -> None:
    n_queries, n_keys = shape
    ax.set_xticks(range(n_keys))
    ax.set_yticks(range(n_queries))
    if keys is not None:
        ax.set_xticklabels(keys, rotation=45, ha="right", rotation_mode="anchor")
    if queries is not None:
        ax.set_yticklabels(queries)
    ax.set_xlabel("key")
    ax.set_ylabel("query")


def attention_heatmap(
    weights,
    queries: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    annotate: bool = False,
) -> Axes:
    """Draw attention weights of shape (Lq, Lk) as a heatmap: row i is what query i looks at.

    `queries` and `keys` label the rows and columns (tokens, say); `annotate=True` writes
    each weight in its cell, which is readable up to about 8 x 8. The colour scale starts
    at 0 so that equal colours mean equal weights across pictures.
    """
    w = _as_matrix(weights)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3.5))
    image = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-6))
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    _label_axes(ax, w.shape, queries, keys)
    if annotate:
        threshold = w.max() / 2
        for (i, j), value in np.ndenumerate(w):
            color = "black" if value > threshold else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def mask_picture(mask, ax: Axes | None = None, title: str | None = None, labels=None) -> Axes:
    """Draw a boolean mask of shape (Lq, Lk): blue cells are True ("may attend"), grey False.

    A mask that broadcasts, such as a padding mask of shape (1, Lk), is drawn as it is
    given; expand it first (`mask.expand(L, L)`) to see the full (Lq, Lk) picture.
    `labels`, if given, names the positions along both axes.
    """
    m = _as_matrix(mask).astype(bool)
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(m, cmap=MASK_COLORS, vmin=0, vmax=1)
    # Thin white lines between cells make single positions easy to count.
    ax.set_xticks(np.arange(m.shape[1] + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(m.shape[0] + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    _label_axes(ax, m.shape, labels, labels)
    if title:
        ax.set_title(title)
    return ax
