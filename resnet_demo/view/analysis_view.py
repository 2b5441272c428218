"""One analysis drawn for the page: the feature-map grids, the enlarged block, the residual chart and table,
the summary in words; and two analyses of one image side by side (the Compare tab).

Everything here turns an :class:`~resnet_demo.core.explorer.Analysis` into pictures and words; nothing
runs a model. :data:`SCREEN` and :data:`FILES` are the pixel sizes for the page and for the export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..core.explorer import Analysis
from ..core.metrics import METRIC_NAMES
from ..core.studies.bands import describe
from ..core.studies.strangeness import strangeness
from .render import (
    PART_LABELS,
    Strip,
    feature_grid,
    feature_strip,
    grid_codes,
    input_image,
    palette_image,
    rank_channels,
    residual_chart,
    tile_at,
)

__all__ = [
    "FILES",
    "METRIC_COLUMNS",
    "SCREEN",
    "Page",
    "Sizes",
    "block_detail",
    "block_tensor",
    "build_page",
    "compare_text",
    "detail_channel",
    "metrics_table",
    "side_by_side",
    "summarise",
]

METRIC_COLUMNS = ["block", "stage", *METRIC_NAMES]


@dataclass(frozen=True)
class Sizes:
    """Pixel sizes of a page's images: one channel tile (its feature map enlarged by a whole factor), the
    white line between tiles, and the side of the input as the model saw it."""

    grid_cell: int
    detail_cell: int
    pad: int
    input_px: int


# On screen, images are sent at (near) their own resolution and the browser enlarges them with
# ``image-rendering: pixelated`` (app.py's CSS), the nearest-neighbour enlargement PIL would do, so the
# page looks the same for a fraction of the PNG encoding. Files in the export are seen without that CSS.
SCREEN = Sizes(grid_cell=32, detail_cell=16, pad=1, input_px=32)
FILES = Sizes(grid_cell=48, detail_cell=40, pad=2, input_px=160)


@dataclass
class Page:
    """Every output of one analysis, ready for the page's components."""

    analysis: Analysis
    predictions: dict[str, float]
    model_input: Image.Image
    grids: Strip | list[tuple[Image.Image, str]]  # one strip of every block's grid on screen; one image each in files
    chart: Image.Image | None
    table: list[list]
    summary: str
    detail: Image.Image | None = None


def metrics_table(analysis: Analysis, digits: int = 4) -> list[list]:
    return [[m.name, m.stage, *(round(getattr(m, k), digits) for k in METRIC_NAMES)] for m in analysis.metrics]


def block_tensor(analysis: Analysis, block: str, part: str):
    if part not in PART_LABELS:
        raise ValueError(f"part must be one of {list(PART_LABELS)}, got {part!r}")
    for rec in analysis.blocks:
        if rec.name == block:
            return getattr(rec, part)[0]
    raise KeyError(f"unknown block {block!r}; this model's blocks are {[r.name for r in analysis.blocks]}")


def block_detail(
    analysis: Analysis, block: str, part: str = "f", max_channels: int = 256, sizes: Sizes = SCREEN
) -> Image.Image:
    """All channels of one block (up to ``max_channels``), each scaled to its own range, most active first."""
    fmap = block_tensor(analysis, block, part)
    n = min(fmap.shape[0], max_channels)
    return feature_grid(fmap, signed=part == "f", max_channels=n, cell=sizes.detail_cell, pad=sizes.pad,
                        per_channel_scale=True)


def detail_channel(analysis: Analysis, block: str, part: str, x: float, y: float, max_channels: int = 256,
                   sizes: Sizes = SCREEN) -> int | None:
    """The channel whose tile is under pixel (x, y) of :func:`block_detail`'s picture (tiles are in order of
    activity on this image, so the same pixel is another channel on another image)."""
    fmap = block_tensor(analysis, block, part)
    n = min(fmap.shape[0], max_channels)
    tile = tile_at(n, fmap.shape[1], fmap.shape[2], sizes.detail_cell, sizes.pad, x, y)
    return None if tile is None else int(rank_channels(fmap)[tile])


def summarise(analysis: Analysis) -> str:
    top = analysis.predictions[0]
    metrics = analysis.metrics
    busiest = max(metrics, key=lambda m: m.ratio)
    quietest = min(metrics, key=lambda m: m.ratio)
    against = [m.name for m in metrics if m.cosine < -0.2]
    lines = [
        f"**{analysis.card.name}** predicts **{top.label}** ({top.prob:.1%}).",
    ]
    odd = strangeness(metrics, analysis.logits, analysis.card)
    if odd is not None and odd.strange:
        lines.append(f"⚠ {odd.message}")
    lines += [
        f"Block **{busiest.name}** changes its input most (‖F‖/‖s‖ = {busiest.ratio:.2f}); "
        f"**{quietest.name}** least ({quietest.ratio:.2f}).",
    ]
    if against:
        lines.append(f"Branches that mostly cancel their input (cosine < −0.2): {', '.join(against)}.")
    if analysis.card.reference_bands:
        lines += describe(metrics, analysis.card.reference_bands, outside=10)[:3]
    if not analysis.card.trained:
        lines.append("These weights are **untrained**: the predictions are noise.")
    return "  \n".join(lines)


def build_page(
    analysis: Analysis,
    *,
    part: str = "f",
    detail_block: str | None = None,
    max_channels: int = 16,
    chart: bool = True,
    sizes: Sizes = SCREEN,
) -> Page:
    """Render one analysis: top-k, the input as the model saw it, a grid per block, chart and table.

    ``chart=False`` leaves the residual chart out (``None``): the page draws it only while its tab is open.
    """
    captions = [f"{m.name} · {m.ratio:.2f}" for m in analysis.metrics]  # metrics follow the records, in order
    # F(x)'s channels are ranked by mean |F|, which the metrics hold already (channel_f); x and y are ranked here.
    ranked = [np.argsort(-m.channel_f, kind="stable")[:max_channels] if part == "f" else None for m in analysis.metrics]
    codes = [grid_codes(getattr(rec, part)[0], signed=part == "f", channels=order, max_channels=max_channels,
                        cell=sizes.grid_cell, pad=sizes.pad) for rec, order in zip(analysis.blocks, ranked)]
    cmap = "RdBu_r" if part == "f" else "magma"
    if sizes == SCREEN:
        grids = feature_strip(codes, captions, cmap, stages=[m.stage for m in analysis.metrics])
    else:
        grids = [(palette_image(c, cmap), caption) for c, caption in zip(codes, captions)]
    return Page(
        analysis=analysis,
        predictions={p.label: p.prob for p in analysis.predictions},
        model_input=input_image(analysis.input, analysis.card, size=sizes.input_px),
        grids=grids,
        chart=residual_chart(analysis.metrics, bands=analysis.card.reference_bands or None) if chart else None,
        table=metrics_table(analysis),
        summary=summarise(analysis),
        detail=block_detail(analysis, detail_block, part, sizes=sizes) if detail_block else None,
    )



def side_by_side(images: list[Image.Image], gap: int = 12) -> Image.Image:
    """Images next to each other on white, top-aligned."""
    out = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)),
                    "white")
    x = 0
    for img in images:
        out.paste(img.convert("RGB"), (x, 0))
        x += img.width + gap
    return out


def compare_text(a: Analysis, b: Analysis) -> str:
    """What differs between the two analyses of one image, in words."""
    ta, tb = a.predictions[0], b.predictions[0]
    agree = "agree" if ta.label == tb.label else "disagree"
    lines = [f"A (**{a.card.name}**) predicts **{ta.label}** ({ta.prob:.1%}); B (**{b.card.name}**) predicts "
             f"**{tb.label}** ({tb.prob:.1%}): they {agree}."]
    pairs = list(zip(a.metrics, b.metrics))
    if pairs:
        i, (ma, mb) = max(enumerate(pairs), key=lambda p: abs(math.log(max(p[1][0].ratio, 1e-9))
                                                               - math.log(max(p[1][1].ratio, 1e-9))))
        lines.append(f"Blocks paired by depth: the largest difference in ‖F‖/‖s‖ is at depth {i + 1} "
                     f"({ma.name}: {ma.ratio:.2f} in A, {mb.name}: {mb.ratio:.2f} in B).")
    if len(a.metrics) != len(b.metrics):
        lines.append(f"A has {len(a.metrics)} blocks, B {len(b.metrics)}: the chart pairs them by position.")
    return "  \n".join(lines)
