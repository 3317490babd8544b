"""The block diagram draws the parts in the order TransformerBlock.forward applies them."""

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from transformer_course.plots import transformer_block_diagram


@pytest.fixture
def draw():
    figures = []

    def draw(norm_first):
        figures.append(transformer_block_diagram(norm_first))
        return figures[-1]

    yield draw
    for fig in figures:
        plt.close(fig)


def heights(fig, prefix):
    """The y of every text on the figure that starts with prefix, bottom to top."""
    ys = [t.get_position()[1] for t in fig.axes[0].texts if t.get_text().startswith(prefix)]
    return sorted(ys)


@pytest.mark.parametrize("norm_first", [True, False])
def test_returns_a_figure_with_the_placement_in_its_title(draw, norm_first):
    fig = draw(norm_first)
    assert isinstance(fig, Figure)
    title = fig.axes[0].get_title()
    assert ("pre-norm" if norm_first else "post-norm") in title


def spine(fig):
    """The heights of the input, the attention, the feed-forward and the output."""
    return [heights(fig, p)[0] for p in ("input", "Multi-head attention", "Feed-forward", "output")]


def test_pre_norm_order_bottom_to_top(draw):
    fig = draw(True)
    x, attention, ff, out = spine(fig)
    norm1, norm2 = heights(fig, "LayerNorm (ch. 5)")
    assert x < norm1 < attention < norm2 < ff < out
    drop1, drop2 = heights(fig, "Dropout")
    assert attention < drop1 < norm2 and ff < drop2 < out


def test_post_norm_puts_each_norm_after_its_sublayer(draw):
    fig = draw(False)
    x, attention, ff, out = spine(fig)
    norm1, norm2 = heights(fig, "LayerNorm")
    assert x < attention < norm1 < ff < norm2 < out


def test_attention_reads_q_k_v_and_each_sublayer_has_a_residual(draw):
    fig = draw(True)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert [t for t in texts if t in ("Q", "K", "V")] == ["Q", "K", "V"]
    assert texts.count("+") == 2 and texts.count("residual (ch. 5)") == 2


@pytest.mark.parametrize("norm_first", [True, False])
def test_renders_to_png(draw, norm_first, tmp_path):
    path = tmp_path / "block.png"
    draw(norm_first).savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
