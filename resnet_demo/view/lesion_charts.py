"""Pictures of the lesion study over a data set (:mod:`resnet_demo.core.studies.lesions`).

- :func:`class_lesion_map`: blocks × classes, each cell the change in that class's accuracy when the
  block's branch is removed, in points against the intact model (red: worse, blue: better), with the
  intact accuracy as the top row and every number written in its cell.
- :func:`alpha_chart`: accuracy against alpha, the factor of one block's branch, one line per block; the
  intact model (alpha = 1) is marked.

Drawn with PIL like :func:`~resnet_demo.view.render.residual_chart` (a few milliseconds, no figure state).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..core.studies.lesions import NONE, AlphaCurves, ClassLesions
from .render import colour_lut, draw_text, nice_max

__all__ = ["BLOCK_COLOURS", "alpha_chart", "class_lesion_map"]

# One colour per block line (matplotlib's tab10, then darker variants), in forward order.
BLOCK_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#0b3c5d", "#a64b00", "#145214", "#7a1313", "#4b2f6e", "#4a2c25", "#8a3f78", "#3f3f3f", "#6b6b12", "#0b6b75",
)
_INK, _SOFT, _GRID = "#111111", "#444444", "#e6e6e6"


def _points(value: float) -> str:
    """An accuracy change in points as a cell shows it: a signed whole number, ``0`` for none."""
    if not math.isfinite(value):
        return "–"
    rounded = round(value)
    return "0" if rounded == 0 else f"{rounded:+d}".replace("-", "−")


def _percent(value: float) -> str:
    """An accuracy in percent, whole unless that would round a miss up to 100%."""
    if not math.isfinite(value):
        return "–"
    return f"{value:.1f}%" if 99.5 <= value < 100 else f"{value:.0f}%"


def class_lesion_map(
    lesions: ClassLesions,
    *,
    title: str = "Which blocks each class needs",
    cell: tuple[int, int] = (56, 24),
) -> Image.Image:
    """Heat map of per-class accuracy changes with each block lesioned (rows) for each class (columns).

    The top row is the intact model's accuracy per class in percent; the last column is all images together.
    The colour scale is symmetric around 0 and reaches full colour at the largest change (at least 5 points).
    """
    from PIL import ImageDraw

    blocks = [r for r in lesions.rows if r != NONE]
    acc = lesions.accuracy * 100  # (rows, classes)
    overall = lesions.overall * 100
    base = lesions.rows.index(NONE)
    change = np.column_stack([acc - acc[base], overall - overall[base]])  # (rows, classes + 1)
    columns = [*lesions.classes, "all"]
    cw, ch = cell
    left, top = 70, 78
    width = max(left + len(columns) * cw + 16, 420)
    img = Image.new("RGB", (width, top + (len(blocks) + 1) * ch + 40), "white")
    d = ImageDraw.Draw(img)
    for j, name in enumerate(columns):
        draw_text(img, (left + j * cw + cw / 2, top - 6), name, _INK, 10 if len(name) <= 9 else 9, "mb")
    intact = [*acc[base], overall[base]]
    for j, v in enumerate(intact):
        x = left + j * cw
        d.rectangle([x, top, x + cw - 2, top + ch - 2], fill="#eeeeee")
        draw_text(img, (x + cw / 2, top + ch / 2), _percent(v), _INK, 10, "mm")
    draw_text(img, (left - 6, top + ch / 2), "intact", _INK, 10, "rm")
    finite = np.abs(change[np.isfinite(change)])
    vmax = max(5.0, float(finite.max()) if finite.size else 0.0)
    lut = colour_lut("RdBu")
    for i, name in enumerate(blocks):
        row, y = lesions.rows.index(name), top + (i + 1) * ch
        draw_text(img, (left - 6, y + ch / 2), name, _INK, 10, "rm")
        for j, v in enumerate(change[row]):
            x = left + j * cw
            level = 0.0 if not math.isfinite(v) else max(-1.0, min(1.0, v / vmax))
            colour = tuple(int(c) for c in lut[int(round(127.5 + level * 127.5))])
            d.rectangle([x, y, x + cw - 2, y + ch - 2], fill=colour)
            draw_text(img, (x + cw / 2, y + ch / 2), _points(v), "white" if abs(level) > 0.55 else _INK, 10, "mm")
    draw_text(img, (left, 22), title, _INK, 12, "ls")
    draw_text(img, (left, 40), "cells: change in each class's accuracy, points, with the block's branch removed",
          _SOFT, 10, "ls")
    draw_text(img, (left, 55), f"(red: worse, blue: better; full colour at ±{vmax:.0f}); {lesions.n} images", _SOFT, 10,
          "ls")
    return img


def _alpha_axes(img: Image.Image, d, box: tuple[float, float, float, float], alphas: list[float], ymax: float,
                ystep: float, k: int) -> None:
    """Grid and ticks: accuracy in percent on the left, alpha below, the intact alpha = 1 dashed."""
    x0, y0, x1, y1 = box
    lo, hi = min(alphas), max(alphas)
    span = (hi - lo) or 1.0

    def px(a: float) -> float:
        return x0 + (a - lo) / span * (x1 - x0)

    tick = 0.0
    while tick <= ymax + 1e-9:
        y = y1 - tick / ymax * (y1 - y0)
        d.line([(x0, y), (x1, y)], fill=_GRID, width=k)
        draw_text(img, (x0 - 6 * k, y), f"{tick:g}%", "#333333", 11 * k, "rm")
        tick += ystep
    for a in alphas:
        draw_text(img, (px(a), y1 + 6 * k), f"{a:g}", "#333333", 11 * k, "mt")
    draw_text(img, ((x0 + x1) / 2, y1 + 24 * k), "α, the factor of the block's branch F(x)", _SOFT, 11 * k, "mt")
    if lo <= 1 <= hi:
        x = px(1.0)
        for s in range(int(y0), int(y1), 10 * k):
            d.line([(x, s), (x, min(s + 5 * k, y1))], fill="#555555", width=k)
        right = x > x0 + 0.75 * (x1 - x0)  # near the right edge: label to the left of the line
        label_x, anchor = (x - 4 * k, "rt") if right else (x + 4 * k, "lt")
        draw_text(img, (label_x, y0 + 4 * k), "intact (α = 1)", _SOFT, 10 * k, anchor)


def alpha_chart(
    curves: AlphaCurves,
    *,
    title: str = "Accuracy with one block's branch scaled by α",
    width: int = 680,
    height: int = 340,
) -> Image.Image:
    """One line per block: accuracy (percent of the images) against alpha (0 removes the branch, 1 is intact)."""
    from PIL import ImageDraw

    k = 2  # supersampling, for smooth lines
    W, H = width * k, height * k
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    acc = curves.accuracy * 100  # (blocks, alphas)
    ymax, ystep = nice_max(max(float(acc.max()) if acc.size else 0.0, 1.0))
    x0, y0, x1, y1 = 62 * k, 48 * k, W - 110 * k, H - 50 * k
    _alpha_axes(img, d, (x0, y0, x1, y1), curves.alphas, ymax, ystep, k)
    lo, span = min(curves.alphas), (max(curves.alphas) - min(curves.alphas)) or 1.0
    for b, name in enumerate(curves.blocks):
        colour = BLOCK_COLOURS[b % len(BLOCK_COLOURS)]
        points = [(x0 + (a - lo) / span * (x1 - x0), y1 - v / ymax * (y1 - y0)) for a, v in zip(curves.alphas, acc[b])]
        if len(points) > 1:
            d.line(points, fill=colour, width=2 * k, joint="curve")
        for x, y in points:
            d.ellipse([x - 3 * k, y - 3 * k, x + 3 * k, y + 3 * k], fill=colour)
        ly = y0 + b * 17 * k
        d.line([(x1 + 14 * k, ly), (x1 + 34 * k, ly)], fill=colour, width=3 * k)
        draw_text(img, (x1 + 40 * k, ly), name, _INK, 11 * k, "lm")
    d.rectangle([x0, y0, x1, y1], outline="#888888", width=k)
    draw_text(img, (x0, y0 - 26 * k), title, _INK, 12 * k, "ls")
    draw_text(img, (x0, y0 - 9 * k), f"α = 0 removes the branch (the lesion); {curves.n} images", _SOFT, 11 * k, "ls")
    return img.reduce(k)
