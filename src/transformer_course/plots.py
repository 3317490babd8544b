"""Plotting helpers for the course pages: attention weights and masks as pictures, and the
transformer block as a diagram.

Each picture helper draws on the Axes it is given (or on a new figure) and returns that Axes,
so a page can lay several pictures side by side with `plt.subplots` and call `plt.show()`
once. The diagram fills a figure of its own and returns the Figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyBboxPatch

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


# The block's boxes: label, colour (the paper's figure: attention orange, feed-forward blue,
# norms yellow) and height. The chapter in each label is where the course builds that part.
BLOCK_PARTS = {
    "norm": ("LayerNorm (ch. 5)", "#f6e7a1", 0.7),
    "attn": ("Multi-head attention (ch. 2)", "#f7c99b", 0.9),
    "drop": ("Dropout (ch. 5)", "#e8e8e8", 0.6),
    "ff": ("Feed-forward (ch. 4)", "#b9d4ee", 1.2),
}


def _arrow(ax: Axes, start, end) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color="black"))


def transformer_block_diagram(norm_first: bool = True) -> Figure:
    """Draw one encoder block bottom to top, in the order `model.TransformerBlock` computes it.

    Pre-norm (`norm_first=True`, what chapter 6's sorting model uses) normalizes each
    sublayer's input and adds the sublayer's output to the unnormalized x; post-norm (the
    paper's) normalizes each residual sum. Both keep the shape (B, L, E), so blocks stack.
    """
    steps = []
    for sublayer in ("attn", "ff"):
        # "fork" is where the residual leaves the main path; "add" is where it comes back.
        norm = ["norm"] if norm_first else []
        steps += ["fork", *norm, sublayer, "drop", "add"] + ([] if norm_first else ["norm"])
    fig, ax = plt.subplots(figsize=(5, 7))
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.94)  # the drawing is the figure
    ax.set(xlim=(0, 10), ylim=(0, 13.1), aspect="equal")  # equal, so circles stay round
    ax.axis("off")
    cx, half, skip_x, radius = 4.6, 2.9, 8.5, 0.3
    ax.text(cx, 0.45, "input x   (B, L, E)", ha="center", va="center")
    y = 0.75  # top of the last thing drawn; each step starts above it
    for step in steps:
        if step == "fork":
            ax.plot([cx, cx, skip_x], [y, y + 0.3, y + 0.3], color="black", lw=1.2)
            y = fork = y + 0.3
            ax.add_patch(Circle((cx, y), 0.07, color="black"))
        elif step == "add":
            centre = y + 0.55 + radius
            _arrow(ax, (cx, y), (cx, centre - radius))
            ax.add_patch(Circle((cx, centre), radius, fc="white", ec="black", lw=1.2))
            ax.text(cx, centre, "+", ha="center", va="center", fontsize=14)
            ax.plot([skip_x, skip_x], [fork, centre], color="black", lw=1.2)
            _arrow(ax, (skip_x, centre), (cx + radius, centre))
            ax.text(skip_x + 0.2, (fork + centre) / 2, "residual (ch. 5)", rotation=90,
                    ha="left", va="center", fontsize=8)  # fmt: skip
            y = centre + radius
        else:
            label, colour, height = BLOCK_PARTS[step]
            # Attention reads one tensor three times: queries, keys and values are all x.
            gap = 1.0 if step == "attn" else 0.5
            bottom = y + gap
            if step == "attn":
                for dx, name in ((-1.6, "Q"), (0.0, "K"), (1.6, "V")):
                    _arrow(ax, (cx, y), (cx + dx, bottom))
                    ax.text(cx + dx * 0.6 + (-0.2 if dx < 0 else 0.2), y + gap * 0.55, name,
                            ha="right" if dx < 0 else "left", va="center", fontsize=8)  # fmt: skip
            else:
                _arrow(ax, (cx, y), (cx, bottom))
            box = FancyBboxPatch((cx - half, bottom), 2 * half, height, fc=colour, ec="black",
                                 boxstyle="round,pad=0,rounding_size=0.15")  # fmt: skip
            ax.add_patch(box)
            centre = bottom + height / 2
            if step == "ff":
                ax.text(cx, centre - 0.25, "Linear E→F → activation → Linear F→E",
                        ha="center", va="center", fontsize=7.5)  # fmt: skip
                centre += 0.2
            ax.text(cx, centre, label, ha="center", va="center", fontsize=9.5)
            y = bottom + height
    _arrow(ax, (cx, y), (cx, y + 0.6))
    ax.text(cx, y + 0.9, "output   (B, L, E)", ha="center", va="center")
    placement = "pre-norm (norm_first=True)" if norm_first else "post-norm (norm_first=False)"
    ax.set_title(f"Transformer block: {placement}")
    return fig
