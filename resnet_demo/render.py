"""Pictures of an analysis: feature-map grids (numpy/PIL), the input as the model saw it, the residual chart.

Feature maps are drawn with lookup tables into one image per block, not as matplotlib subplots: a grid
of 16 channels costs well under a millisecond. Charts use matplotlib's object API (no pyplot state),
so concurrent requests do not share a figure.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from .analysis import BlockMetrics
from .checkpoints import ModelCard

__all__ = ["VIEWS", "feature_grid", "figure_to_image", "input_image", "rank_channels", "residual_chart"]

# Which tensor of a block to show; F(x) is signed, x and y are post-ReLU (non-negative).
VIEWS = {"x": "block input x", "f": "residual branch F(x)", "y": "block output y"}
STAGE_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")


@lru_cache(maxsize=None)
def _lut(name: str) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)  # (256, 3)


def rank_channels(fmap: torch.Tensor) -> np.ndarray:
    """Channel indices of a (C, H, W) map, most active (largest mean |value|) first."""
    return fmap.abs().mean(dim=(1, 2)).argsort(descending=True).cpu().numpy()


def feature_grid(
    fmap: torch.Tensor,
    *,
    signed: bool = False,
    channels: Sequence[int] | None = None,
    max_channels: int = 16,
    cell: int = 48,
    pad: int = 2,
    per_channel_scale: bool = False,
) -> Image.Image:
    """Tile channels of a (C, H, W) feature map into one RGB image.

    Args:
        fmap: one image's feature map.
        signed: colour around zero (blue < 0 < red, ``RdBu_r``) instead of 0..max (``magma``).
        channels: which channels, in order; the ``max_channels`` most active by default.
        cell: size in pixels of one channel tile (nearest-neighbour upscaling keeps pixels honest).
        per_channel_scale: scale each tile to its own maximum (shows faint channels' patterns)
            instead of one scale for the whole grid (shows which channels are strong).
    """
    fmap = fmap.detach().float().cpu()
    if fmap.ndim != 3:
        raise ValueError(f"feature_grid expects (C, H, W), got {tuple(fmap.shape)}")
    idx = np.asarray(channels if channels is not None else rank_channels(fmap)[:max_channels], dtype=np.int64)
    maps = fmap[torch.from_numpy(idx)].numpy()  # (n, H, W)
    n, h, w = maps.shape
    reduce_axes = (1, 2) if per_channel_scale else None
    scale = np.abs(maps).max(axis=reduce_axes, keepdims=per_channel_scale)
    scale = np.where(scale > 0, scale, 1.0)
    if signed:
        levels = (maps / scale * 127.5 + 127.5).clip(0, 255)
    else:
        levels = (np.maximum(maps, 0) / scale * 255.0).clip(0, 255)
    rgb = _lut("RdBu_r" if signed else "magma")[levels.astype(np.uint8)]  # (n, H, W, 3)
    rep = max(1, cell // max(h, w))
    rgb = rgb.repeat(rep, axis=1).repeat(rep, axis=2)
    th, tw = h * rep, w * rep
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (th + pad), pad + c * (tw + pad)
        canvas[y0 : y0 + th, x0 : x0 + tw] = rgb[i]
    return Image.fromarray(canvas)


def input_image(tensor: torch.Tensor, card: ModelCard, size: int = 160) -> Image.Image:
    """The normalised (1, C, H, W) model input turned back into pixels, enlarged with nearest neighbour."""
    t = tensor.detach().float().cpu()[0]
    c = t.shape[0]
    mean = torch.tensor(card.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(card.std, dtype=torch.float32).view(-1, 1, 1)
    t = (t * std[:c] + mean[:c]).clamp(0, 1)
    arr = (t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    if card.colour_mode == "gray" or c == 1:
        arr = arr[:, :, 0]
    img = Image.fromarray(arr)
    rep = max(1, size // max(img.size))
    return img.resize((img.size[0] * rep, img.size[1] * rep), Image.NEAREST)


def residual_chart(
    metrics: list[BlockMetrics],
    *,
    bands: dict | None = None,
    title: str = "How much each block changes its input",
):
    """Bar chart of ``ratio`` = ||F(x)|| / ||s(x)|| per block, with ``cosine`` on a second axis.

    ``bands`` (from the model card's ``reference_bands``) draws the 5-95 and 25-75 percentile ranges
    of the test split behind the bars, so an unusual block stands out.
    """
    from matplotlib.figure import Figure

    names = [m.name for m in metrics]
    xs = np.arange(len(metrics))
    fig = Figure(figsize=(max(6.0, 0.45 * len(metrics) + 2), 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if bands and "ratio" in bands:
        ref = bands["ratio"]
        for i, name in enumerate(names):
            if name in ref:
                p = ref[name]
                ax.add_patch(_band(i, p["p5"], p["p95"], "#dddddd"))
                ax.add_patch(_band(i, p["p25"], p["p75"], "#bbbbbb"))
                ax.plot([i - 0.4, i + 0.4], [p["p50"]] * 2, color="#777777", lw=1)
    colours = [STAGE_COLOURS[(m.stage - 1) % len(STAGE_COLOURS)] for m in metrics]
    ax.bar(xs, [m.ratio for m in metrics], width=0.55, color=colours, zorder=3)
    ax.set_ylabel("‖F(x)‖ / ‖s(x)‖")
    ax.set_xticks(xs, names, rotation=45 if len(names) > 12 else 0, ha="right" if len(names) > 12 else "center")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(xs, [m.cosine for m in metrics], "k.-", lw=1, label="cosine(F, s)", zorder=4)
    ax2.axhline(0, color="k", lw=0.5, ls=":")
    ax2.set_ylim(-1, 1)
    ax2.set_ylabel("cosine(F(x), s(x))")
    ax2.legend(loc="upper right", fontsize=8, frameon=False)
    return fig


def _band(i: int, lo: float, hi: float, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((i - 0.4, lo), 0.8, max(hi - lo, 1e-9), color=colour, zorder=1, lw=0)


def figure_to_image(fig) -> Image.Image:
    """Render a matplotlib Figure to a PIL image with the Agg backend (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
