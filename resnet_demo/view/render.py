"""Pictures of an analysis: feature-map grids (numpy/PIL), the input as the model saw it, the residual chart.

Feature maps are drawn with lookup tables into one image per block, not as matplotlib subplots: a grid
of 16 channels costs well under a millisecond. Charts use matplotlib's object API (no pyplot state),
so concurrent requests do not share a figure.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from os.path import commonprefix
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..core.insight import LesionResult, Readout
from ..core.metrics import BlockMetrics
from ..core.studies.featurevis import SHOWN_PARTS
from ..core.weights.cards import ModelCard

__all__ = [
    "PART_LABELS",
    "chart_font",
    "colour_lut",
    "draw_text",
    "comparison_chart",
    "feature_grid",
    "feature_strip",
    "slot_at",
    "strip_rows",
    "STRIP_ROW",
    "Strip",
    "StripLayout",
    "text_mask",
    "tile_at",
    "grid_codes",
    "figure_to_image",
    "input_image",
    "lesion_sweep_chart",
    "nice_max",
    "overlay",
    "png_data_url",
    "rank_channels",
    "readout_chart",
    "residual_chart",
    "similarity_map",
]

# Which part of a block to show, in words; F(x) is signed, x and y are post-ReLU (non-negative).
PART_LABELS = dict(zip(SHOWN_PARTS, ("block input x", "residual branch F(x)", "block output y"), strict=True))
STAGE_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")


@cache
def colour_lut(name: str) -> np.ndarray:
    """A matplotlib colour map as a (256, 3) uint8 look-up table."""
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)  # (256, 3)


def rank_channels(fmap: torch.Tensor) -> np.ndarray:
    """Channel indices of a (C, H, W) map, most active (largest mean |value|) first."""
    return fmap.abs().mean(dim=(1, 2)).argsort(descending=True).cpu().numpy()


def feature_grid(fmap: torch.Tensor, *, signed: bool = False, **options) -> Image.Image:
    """Tile channels of a (C, H, W) feature map into one palette image (mode ``"P"``).

    ``options`` are :func:`grid_codes`'s. The colour map has :data:`LEVELS` levels, then a grey ramp for
    text and white for the padding: one byte per pixel, which PNG compresses 3 times smaller and 4 times
    faster than RGB (``.convert("RGB")`` for pixels).
    """
    return palette_image(grid_codes(fmap, signed=signed, **options), "RdBu_r" if signed else "magma")


def grid_codes(
    fmap: torch.Tensor,
    *,
    signed: bool = False,
    channels: Sequence[int] | None = None,
    max_channels: int = 16,
    cell: int = 48,
    pad: int = 2,
    per_channel_scale: bool = False,
) -> np.ndarray:
    """Palette indices (H, W) uint8 of channels of a (C, H, W) map tiled: colour-map levels, :data:`WHITE` between.

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
    top = LEVELS - 1  # zero of a signed map is the middle level, exactly
    if signed:
        levels = (maps / scale * (top / 2) + top / 2 + 0.5).clip(0, top)
    else:
        levels = (np.maximum(maps, 0) / scale * top + 0.5).clip(0, top)
    codes = np.empty(n * h * w + 1, dtype=np.uint8)  # palette entry of every pixel, then the padding's
    codes[:-1] = levels.astype(np.uint8).ravel()
    codes[-1] = WHITE
    rep = max(1, cell // max(h, w))
    # One gather builds the canvas, upscaling and padding included: a few times faster than tiling.
    return np.take(codes, _grid_index(n, h, w, rep, pad))


LEVELS = 239  # colour-map levels of a feature grid (palette entries 0..238)
GREYS = 16  # then a ramp from white to dark grey for antialiased text (entries 239..254)
WHITE = 255  # and white, for padding and background


def palette_image(codes: np.ndarray, cmap: str) -> Image.Image:
    """A mode-``"P"`` image of ``codes`` (uint8 palette indices) with ``cmap``'s palette (see :data:`LEVELS`)."""
    img = Image.fromarray(codes, mode="P")
    img.putpalette(_palette(cmap))
    return img


@cache
def _palette(name: str) -> bytes:
    """The colour map sampled at :data:`LEVELS` points, a grey ramp for text, white: a 256-colour PNG palette."""
    import matplotlib

    rgb = (matplotlib.colormaps[name](np.linspace(0, 1, LEVELS))[:, :3] * 255 + 0.5).astype(np.uint8)
    ramp = np.linspace(255, 0x22, GREYS + 1)[1:]  # ink of text: #222222 at full coverage
    greys = np.repeat((ramp + 0.5).astype(np.uint8)[:, None], 3, axis=1)
    return np.concatenate([rgb, greys, np.full((1, 3), 255, dtype=np.uint8)]).tobytes()


@lru_cache(maxsize=2048)
def _text_codes(text: str, size: int) -> np.ndarray:
    """``text`` as palette indices on white: its antialiasing mask mapped onto the grey ramp.

    Cached (read-only arrays): the strip's captions ("res4 · 0.53") come from a few thousand strings,
    and FreeType's rendering was a quarter of the strip's drawing time.
    """
    mask = np.asarray(text_mask(text, size, "lt")[0], dtype=np.float32)
    level = np.rint(mask / 255 * GREYS).astype(np.int16)  # 0 = white ... GREYS = full ink
    codes = np.where(level == 0, WHITE, LEVELS - 1 + level).astype(np.uint8)
    codes.flags.writeable = False
    return codes


STRIP_ROW = 12  # most slots in one row: a strip of more blocks than this is laid out in rows, one stage per row


class StripLayout(NamedTuple):
    """Where a :class:`Strip`'s slots are, in the image's pixels: enough to find the block under a click.

    A tuple of ints, so a session can keep it (``PageState.strip``) without the image. The default, empty
    layout has no slots. A slot is square (its grid, centred) with its caption below; the slots of a row
    have one size, the largest of its grids.
    """

    rows: tuple[tuple[int, int, int, int], ...] = ()  # per row: (y of its top, first block, how many, slot size)
    left: int = 0  # x of every row's first slot: the stage labels are left of it
    gap: int = 8  # pixels between two slots of a row
    caption: int = 20  # height of the caption under a slot

    def index_at(self, x: float, y: float) -> int | None:
        """The block whose slot (grid or caption) holds pixel (x, y), or ``None`` in a gap, a label or outside."""
        for top, first, count, slot in self.rows:
            if top <= y < top + slot + self.caption:
                col, offset = divmod(int(x) - self.left, slot + self.gap)
                return first + col if x >= self.left and offset < slot and col < count else None
        return None


def slot_at(x: float, y: float, layout: tuple) -> int | None:
    """The block under pixel (x, y) of a strip drawn with ``layout`` (a :class:`StripLayout` or its tuple, as a
    session keeps it; an empty tuple has no blocks)."""
    return StripLayout(*layout).index_at(x, y)


@dataclass(frozen=True)
class Strip:
    """Feature grids in one image, each in a square slot, captioned below: one row, or rows by stage."""

    image: Image.Image
    layout: StripLayout

    @property
    def slot(self) -> int:
        """The largest slot's side (every slot's, in a strip of one row)."""
        return max((row[3] for row in self.layout.rows), default=0)

    @property
    def pitch(self) -> int:
        """From one slot's left edge to the next's, in the row of the largest slots."""
        return self.slot + self.layout.gap

    def index_at(self, x: float, y: float) -> int | None:
        """The block under pixel (x, y) of the image, or ``None`` between slots (see :meth:`StripLayout.index_at`)."""
        return self.layout.index_at(x, y)


def stage_runs(stages: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of consecutive blocks of one stage, as (first block, how many), in the blocks' order."""
    runs: list[tuple[int, int]] = []
    for i, stage in enumerate(stages):
        if runs and stages[i - 1] == stage:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def strip_rows(stages: Sequence[int], wrap: int = STRIP_ROW) -> list[tuple[int, int]]:
    """The rows of a strip as (first block, how many): one row if there are at most ``wrap`` blocks, else one
    per run of blocks of the same stage, a run longer than ``wrap`` split into rows of near-equal length
    (36 blocks: three rows of 12)."""
    if len(stages) <= wrap:
        return [(0, len(stages))]
    rows = []
    for start, count in stage_runs(stages):
        per = math.ceil(count / math.ceil(count / wrap))
        rows += [(first, min(per, start + count - first)) for first in range(start, start + count, per)]
    return rows


def feature_strip(
    grids: Sequence[np.ndarray],
    captions: Sequence[str],
    cmap: str,
    *,
    stages: Sequence[int] | None = None,
    gap: int = 8,
    font_px: int = 12,
) -> Strip:
    """One image of ``grids`` (palette indices from :func:`grid_codes`), a caption under each.

    Up to :data:`STRIP_ROW` grids side by side in one row; more (a ResNet-50 has 16 blocks, a ResNet-152 50)
    in rows by ``stages`` (each block's stage, 1-based; all one stage if not given), each row labelled with its
    stage on the left, so a deep model's strip stays about as wide as twelve blocks instead of a few pixels
    a block once the page fits it to its width.

    One image instead of one per block: every image a page sends is one more PNG to encode and, as a
    Gradio image output, a component to postprocess (about 3 ms of server CPU each with Gradio 6's own
    file outputs, measured here; the app now sends its per-analysis images inline, see app.InlineImage).
    """
    stages = list(stages) if stages is not None else [1] * len(grids)
    rows = strip_rows(stages)
    sizes = [max(g.shape) for g in grids]
    slots = [max(sizes[first : first + count]) for first, count in rows] if len(rows) > 1 else [max(sizes)]
    labels = [f"stage {stages[first]}" for first, _ in rows] if len(rows) > 1 else []
    left = max((_text_codes(t, font_px + 2).shape[1] for t in labels), default=-gap) + gap
    layout = _strip_layout(rows, slots, stages, left, gap, font_px + 8)
    width = left + max(count * (slot + gap) for (_, _, count, slot) in layout.rows) - gap
    top, _, _, slot = layout.rows[-1]
    canvas = np.full((top + slot + layout.caption, width), WHITE, dtype=np.uint8)
    for (top, first, count, slot), label in zip(layout.rows, labels or [None]):
        for i in range(first, first + count):
            _put_slot(canvas, left + (i - first) * (slot + gap), top, slot, grids[i], captions[i], font_px)
        if label is not None:
            text = _text_codes(label, font_px + 2)
            y = top + (slot - text.shape[0]) // 2
            canvas[y : y + text.shape[0], : text.shape[1]] = text
    return Strip(palette_image(canvas, cmap), layout)


def _strip_layout(rows: list[tuple[int, int]], slots: list[int], stages: Sequence[int], left: int, gap: int,
                  caption: int) -> StripLayout:
    """Each row's top: ``gap`` between the rows of one stage, twice that where a new stage begins."""
    placed, y = [], 0
    for (first, count), slot in zip(rows, slots):
        if placed:
            y += placed[-1][3] + caption + (2 * gap if stages[first] != stages[first - 1] else gap)
        placed.append((y, first, count, slot))
    return StripLayout(tuple(placed), left, gap, caption)


def _put_slot(canvas: np.ndarray, x: int, y: int, slot: int, grid: np.ndarray, caption: str, font_px: int) -> None:
    """Draw ``grid`` centred in the square slot whose top-left is (x, y) and ``caption`` centred under it."""
    gx, gy = x + (slot - grid.shape[1]) // 2, y + (slot - grid.shape[0]) // 2
    canvas[gy : gy + grid.shape[0], gx : gx + grid.shape[1]] = grid
    text = _text_codes(caption, font_px)[: font_px + 4, :slot]
    tx = x + max(0, (slot - text.shape[1]) // 2)
    canvas[y + slot + 4 : y + slot + 4 + text.shape[0], tx : tx + text.shape[1]] = text


@lru_cache(maxsize=64)
def _grid_index(n: int, h: int, w: int, rep: int, pad: int) -> np.ndarray:
    """For every canvas pixel of a grid of ``n`` (h, w) tiles enlarged ``rep`` times (nearest neighbour)
    with ``pad`` pixels between them, the index of its source pixel in the flattened tiles; ``n*h*w``
    (the padding) elsewhere. Tiles fill a near-square grid row by row."""
    th, tw = h * rep, w * rep
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    index = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad), n * h * w, dtype=np.intp)
    tile = (np.arange(th) // rep)[:, None] * w + (np.arange(tw) // rep)[None, :]
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (th + pad), pad + c * (tw + pad)
        index[y0 : y0 + th, x0 : x0 + tw] = i * h * w + tile
    index.flags.writeable = False
    return index


def tile_at(n: int, h: int, w: int, cell: int, pad: int, x: float, y: float) -> int | None:
    """Which of the ``n`` tiles of a grid drawn by :func:`grid_codes` (tiles of (h, w) maps, ``cell`` and
    ``pad`` as given there) is under pixel (x, y) of the grid's own image; ``None`` on the padding or outside."""
    rep = max(1, cell // max(h, w))
    th, tw = h * rep, w * rep
    cols = math.ceil(math.sqrt(n))
    c, dx = divmod(x - pad, tw + pad)
    r, dy = divmod(y - pad, th + pad)
    if x < pad or y < pad or dx >= tw or dy >= th or c >= cols:
        return None
    i = int(r) * cols + int(c)
    return i if i < n else None


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


def nice_max(value: float) -> tuple[float, float]:
    """A round axis maximum >= value and its tick step (1, 2 or 5 times a power of ten)."""
    value = max(value, 1e-6)
    step = 10 ** math.floor(math.log10(value / 4))
    for mult in (1, 2, 5, 10):
        if value / (step * mult) <= 5:
            step *= mult
            break
    return step * math.ceil(value / step - 1e-9), step


@lru_cache(maxsize=8)
def chart_font(size: int):
    """DejaVu Sans from matplotlib's own files (it has ‖ ● ▲ ▼), else Pillow's default font."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


@lru_cache(maxsize=1024)
def text_mask(text: str, size: int, anchor: str) -> tuple[Image.Image, int, int]:
    """``text`` rendered once as an 8-bit mask, with the offset of its box from the anchor point."""
    from PIL import ImageDraw

    font = chart_font(size)
    left, top, right, bottom = font.getbbox(text, anchor=anchor)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font, anchor=anchor)
    return mask, left, top


def draw_text(img: Image.Image, xy: tuple[float, float], text: str, fill: str, size: int, anchor: str) -> None:
    """Draw ``text`` like ``ImageDraw.text`` but from a cache: a chart's labels repeat from page to page,
    and rasterising glyphs was most of a chart's cost."""
    mask, left, top = text_mask(text, size, anchor)
    img.paste(fill, (round(xy[0]) + left, round(xy[1]) + top), mask)


@dataclass
class _Frame:
    """A chart's plot area at ``k``-times supersampling: ratio on the left axis (0..ymax), cosine on the right."""

    img: Image.Image
    k: int
    x0: float
    x1: float
    y0: float
    y1: float
    ymax: float
    slot: float  # width of one block's column

    def ry(self, v: float) -> float:  # ratio -> pixel row
        return self.y1 - (min(v, self.ymax) / self.ymax) * (self.y1 - self.y0)

    def cy(self, v: float) -> float:  # cosine in [-1, 1] -> pixel row
        return self.y1 - (v + 1) / 2 * (self.y1 - self.y0)

    def cx(self, i: int) -> float:  # centre of block i's column
        return self.x0 + self.slot * (i + 0.5)


def residual_chart(
    metrics: list[BlockMetrics],
    *,
    bands: dict | None = None,
    title: str = "How much each block changes its input",
    width: int | None = None,
    height: int = 300,
) -> Image.Image:
    """Bar chart of ``ratio`` = ||F(x)|| / ||s(x)|| per block, with ``cosine`` on a second axis.

    ``bands`` (a model card's ``reference_bands``) draws the 5-95 and 25-75 percentile ranges of the
    test split behind each bar and its median as a tick; a block beyond the 95th (5th) percentile
    gets a ▲ (▼). Drawn with PIL at twice the size and downsampled: a few milliseconds, where a
    matplotlib figure costs a hundred.
    """
    from PIL import ImageDraw

    n = len(metrics)
    width = width or max(640, _column_px(n, 64) * n + 130)
    k = 2  # supersampling
    W, H = width * k, height * k
    ref = (bands or {}).get("ratio", {})
    finite = [m.ratio for m in metrics if math.isfinite(m.ratio)]
    peak = max(finite + [ref[m.name]["p95"] for m in metrics if m.name in ref] + [1e-3])
    ymax, ystep = nice_max(peak * 1.08)
    x0, x1, y0, y1 = 62 * k, W - 62 * k, 46 * k, H - 44 * k
    fr = _Frame(Image.new("RGB", (W, H), "white"), k, x0, x1, y0, y1, ymax, (x1 - x0) / max(n, 1))
    d = ImageDraw.Draw(fr.img)
    _axes(fr, d, ystep)
    for i, m in enumerate(metrics):
        _block_bar(fr, d, i, m, ref.get(m.name))
    _block_names(fr, metrics)
    _cosine_line(fr, d, [m.cosine for m in metrics])
    d.rectangle([x0, y0, x1, y1], outline="#888888", width=k)
    draw_text(fr.img, (x0, y0 - 24 * k), title, "#111111", 12 * k, "ls")
    legend = "bars: ‖F(x)‖/‖s(x)‖ (left axis)   ●—● cosine(F, s) (right axis)"
    if ref:
        legend += "   grey: test-set 5–95 / 25–75 %"
    draw_text(fr.img, (x0, y0 - 7 * k), legend, "#444444", 11 * k, "ls")
    return fr.img.reduce(k)  # box-filter downsampling: the antialiasing, at a fraction of LANCZOS's cost


def _axes(fr: _Frame, d, ystep: float) -> None:
    """Grid lines and ticks of the ratio axis (left) and the cosine axis (right)."""
    k, tick = fr.k, 0.0
    while tick <= fr.ymax + 1e-9:
        y = fr.ry(tick)
        d.line([(fr.x0, y), (fr.x1, y)], fill="#e6e6e6", width=k)
        draw_text(fr.img, (fr.x0 - 6 * k, y), f"{tick:g}", "#333333", 11 * k, "rm")
        tick += ystep
    for c in (-1, -0.5, 0, 0.5, 1):
        draw_text(fr.img, (fr.x1 + 6 * k, fr.cy(c)), f"{c:g}", "#333333", 11 * k, "lm")


def _block_bar(fr: _Frame, d, i: int, m: BlockMetrics, band: dict | None) -> None:
    """Block ``i``'s reference band (if any), its ratio bar, the band's median, a ▲/▼ when outside, its name."""
    from ..core.studies.bands import percentile_rank

    k, slot, cx = fr.k, fr.slot, fr.cx(i)
    if band is not None:
        d.rectangle([cx - slot * 0.4, fr.ry(band["p95"]), cx + slot * 0.4, fr.ry(band["p5"])], fill="#ececec")
        d.rectangle([cx - slot * 0.4, fr.ry(band["p75"]), cx + slot * 0.4, fr.ry(band["p25"])], fill="#d2d2d2")
    colour = STAGE_COLOURS[(m.stage - 1) % len(STAGE_COLOURS)]
    d.rectangle([cx - slot * 0.27, fr.ry(m.ratio), cx + slot * 0.27, fr.y1], fill=colour)
    if band is not None:  # the test-set median, drawn over the bar so it stays visible
        p50 = fr.ry(band["p50"])
        d.line([(cx - slot * 0.4, p50), (cx + slot * 0.4, p50)], fill="#333333", width=k)
        if math.isfinite(m.ratio):
            rank = percentile_rank(m.ratio, band)
            if rank >= 95 or rank <= 5:
                draw_text(fr.img, (cx, fr.ry(m.ratio) - 3 * k), "▲" if rank >= 95 else "▼", "#b00020", 12 * k, "mb")


def _column_px(n: int, wide: int) -> int:
    """Width of one block's column in a chart of ``n`` blocks: ``wide`` up to :data:`STRIP_ROW` blocks, then
    narrower (26 pixels for a ResNet-152's 50), so a deep model's chart stays within a screen or two."""
    return wide if n <= STRIP_ROW else max(26, min(wide, 768 // n))


def _block_names(fr: _Frame, metrics: list[BlockMetrics]) -> None:
    """Each block's name under its column; with many blocks, :func:`_stage_names` instead."""
    if len(metrics) > STRIP_ROW:
        _stage_names(fr, metrics)
        return
    k = fr.k
    for i, m in enumerate(metrics):
        draw_text(fr.img, (fr.cx(i), fr.y1 + 8 * k), m.name, "#222222", (11 if fr.slot > 52 * k else 9) * k, "mt")


def _stage_names(fr: _Frame, metrics: list[BlockMetrics]) -> None:
    """Under the columns of many blocks: each block's short name (:func:`short_names`), and under each stage's
    run of blocks a bracket with the stage's name, since whole names ("layer3.17") no longer fit a column."""
    from PIL import ImageDraw

    k = fr.k
    y = fr.y1 + 6 * k
    short = short_names([m.name for m in metrics], [m.stage for m in metrics])
    if any(text_mask(t, 9 * k, "mt")[0].width > fr.slot * 0.95 for t in short):
        short = [str(i - first) for first, count in stage_runs([m.stage for m in metrics])
                 for i in range(first, first + count)]
    for i, text in enumerate(short):
        draw_text(fr.img, (fr.cx(i), y), text, "#222222", 9 * k, "mt")
    d = ImageDraw.Draw(fr.img)
    for first, count in stage_runs([m.stage for m in metrics]):
        xa, xb = fr.x0 + fr.slot * first + 2 * k, fr.x0 + fr.slot * (first + count) - 2 * k
        d.line([(xa, y + 11 * k), (xa, y + 14 * k), (xb, y + 14 * k), (xb, y + 11 * k)], fill="#999999", width=k)
        draw_text(fr.img, ((xa + xb) / 2, y + 17 * k), f"stage {metrics[first].stage}", "#222222", 10 * k, "mt")


def short_names(names: Sequence[str], stages: Sequence[int]) -> list[str]:
    """Block names without what the names of their stage's run share, whole trailing numbers kept:
    ``layer3.0 ... layer3.35`` -> ``0 ... 35``, ``res12, res13`` -> ``12, 13``; a name that would be left
    empty stays whole."""
    out = []
    for first, count in stage_runs(stages):
        group = names[first : first + count]
        prefix = commonprefix(list(group)).rstrip("0123456789")
        out += [name[len(prefix):] or name for name in group]
    return out


def _cosine_line(fr: _Frame, d, cosines: list[float]) -> None:
    """The zero line of the cosine axis, then one dot per block joined by a line."""
    k = fr.k
    d.line([(x, fr.cy(0)) for x in (fr.x0, fr.x1)], fill="#999999", width=k)
    points = [(fr.cx(i), fr.cy(max(-1.0, min(1.0, c)))) for i, c in enumerate(cosines)]
    if len(points) > 1:
        d.line(points, fill="black", width=2 * k, joint="curve")
    for x, y in points:
        d.ellipse([x - 3 * k, y - 3 * k, x + 3 * k, y + 3 * k], fill="black")


def figure_to_image(fig) -> Image.Image:
    """Render a matplotlib Figure to a PIL image with the Agg backend (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def png_data_url(image: Image.Image, compress_level: int = 1) -> str:
    """``image`` as a ``data:image/png;base64,...`` URL, for a page that shows it without a second request.

    zlib level 1: the page's palette grids encode twice as fast as at PIL's default 6 (2.4 against
    4.6 ms for the strip of nine blocks) and come out 3-4% larger.
    """
    with io.BytesIO() as out:
        image.save(out, "png", compress_level=compress_level)
        return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def overlay(cam: np.ndarray, base_image: Image.Image, alpha: float = 0.45, cmap: str = "turbo") -> Image.Image:
    """Colour ``cam`` (values in [0, 1]) and blend it over ``base_image`` at the base image's size."""
    base = base_image.convert("RGB")
    heat = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F").resize(base.size, Image.BILINEAR)
    levels = (np.clip(np.asarray(heat), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    coloured = Image.fromarray(colour_lut(cmap)[levels])  # (H, W) -> (H, W, 3)
    return Image.blend(base, coloured, float(alpha))


# --- charts ----------------------------------------------------------------------------------------


def lesion_sweep_chart(
    results: Sequence[LesionResult], *, title: str = "Remove one block's branch at a time"
) -> Image.Image:
    """Bars of KL(intact || lesioned) per block, with the change in the original top-1's probability."""
    from matplotlib.figure import Figure

    names = [", ".join(r.lesioned) for r in results]
    xs = np.arange(len(results))
    fig = Figure(figsize=(max(6.0, 0.45 * len(results) + 2), 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    colours = ["#C44E52" if r.top1_changed else "#4C72B0" for r in results]
    ax.bar(xs, [r.kl for r in results], width=0.55, color=colours, zorder=3)
    ax.set_ylabel("KL(intact ‖ lesioned) [nats]")
    rotate = len(names) > 12
    ax.set_xticks(xs, names, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    orig = results[0].orig_label if results else ""
    ax.set_title(f"{title} (red: top-1 changes)", fontsize=10)
    ax2 = ax.twinx()
    ax2.plot(xs, [r.delta for r in results], "k.-", lw=1, label=f"Δ p({orig})", zorder=4)
    ax2.axhline(0, color="k", lw=0.5, ls=":")
    ax2.set_ylim(-1, 1)
    ax2.set_ylabel(f"Δ p({orig})")
    ax2.legend(loc="upper right", fontsize=8, frameon=False)
    return figure_to_image(fig)


def readout_chart(result: Readout, *, title: str = "The head applied to each block") -> Image.Image:
    """Probability of the final top-1 class per block, with each readout's own top-1 written on top."""
    from matplotlib.figure import Figure

    names = [r.name for r in result]
    xs = np.arange(len(names))
    fig = Figure(figsize=(max(4.0, 0.6 * len(names) + 2), 3.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    colours = ["#55A868" if r.agrees else "#999999" for r in result]
    ax.bar(xs, [r.p_final for r in result], width=0.55, color=colours, zorder=3)
    for i, r in enumerate(result):
        ax.text(i, min(r.p_final, 0.9) + 0.03, r.top1.label, ha="center", fontsize=7, zorder=4)
    if result.settles_at is not None:
        i = names.index(result.settles_at)
        ax.axvline(i - 0.4, color="k", lw=1, ls="--")
    ax.set_xticks(xs, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"p({result.final.label})")
    settles = f"; settles at {result.settles_at}" if result.settles_at else ""
    ax.set_title(f"{title}{settles}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return figure_to_image(fig)


def comparison_chart(
    metrics_a: list[BlockMetrics],
    metrics_b: list[BlockMetrics],
    label_a: str,
    label_b: str,
    *,
    bands_a: dict | None = None,
    height: int = 320,
) -> Image.Image:
    """The residual chart of two models on one chart: in each slot, A's bar (left) and B's (right), by depth.

    Slot i holds the i-th block of each model (blocks are paired by position, not by name: two trainings of
    one architecture line up exactly); cosines are drawn as A's solid and B's dashed line. ``bands_a``, A's
    reference bands, are drawn behind A's bars.
    """
    from PIL import ImageDraw

    n = max(len(metrics_a), len(metrics_b))
    width = max(640, _column_px(n, 72) * n + 130)
    k = 2
    W, H = width * k, height * k
    ref = (bands_a or {}).get("ratio", {})
    finite = [m.ratio for m in (*metrics_a, *metrics_b) if math.isfinite(m.ratio)]
    peak = max(finite + [ref[m.name]["p95"] for m in metrics_a if m.name in ref] + [1e-3])
    ymax, ystep = nice_max(peak * 1.08)
    x0, x1, y0, y1 = 62 * k, W - 62 * k, 52 * k, H - 58 * k
    fr = _Frame(Image.new("RGB", (W, H), "white"), k, x0, x1, y0, y1, ymax, (x1 - x0) / max(n, 1))
    d = ImageDraw.Draw(fr.img)
    _axes(fr, d, ystep)
    colours = ("#4C72B0", "#DD8452")
    for side, metrics in enumerate((metrics_a, metrics_b)):
        for i, m in enumerate(metrics):
            cx = fr.cx(i) + (side - 0.5) * fr.slot * 0.36
            band = ref.get(m.name) if side == 0 else None
            if band is not None:
                d.rectangle([cx - fr.slot * 0.17, fr.ry(band["p95"]), cx + fr.slot * 0.17, fr.ry(band["p5"])],
                            fill="#ececec")
            d.rectangle([cx - fr.slot * 0.15, fr.ry(m.ratio), cx + fr.slot * 0.15, y1], fill=colours[side])
    d.line([(x, fr.cy(0)) for x in (x0, x1)], fill="#999999", width=k)
    for side, metrics in enumerate((metrics_a, metrics_b)):
        _cosines(fr, d, [m.cosine for m in metrics], dashed=side == 1)
    if n > STRIP_ROW:  # by position: the stages and names of the deeper model
        _stage_names(fr, max(metrics_a, metrics_b, key=len))
    for i in range(n if n <= STRIP_ROW else 0):
        names = [m[i].name if i < len(m) else "" for m in (metrics_a, metrics_b)]
        text = names[0] if names[0] == names[1] else " / ".join(x or "–" for x in names)
        draw_text(fr.img, (fr.cx(i), y1 + 8 * k), text, "#222222", (10 if fr.slot > 60 * k else 8) * k, "mt")
    d.rectangle([x0, y0, x1, y1], outline="#888888", width=k)
    draw_text(fr.img, (x0, y0 - 30 * k), f"‖F(x)‖/‖s(x)‖ per block: A = {label_a}, B = {label_b}", "#111111",
              12 * k, "ls")
    legend = "bars: A (blue, left) · B (orange, right)   cosine(F, s): ●— A  ○-- B (right axis)"
    if ref:
        legend += "   grey: A's test-set 5–95 %"
    draw_text(fr.img, (x0, y0 - 12 * k), legend, "#444444", 11 * k, "ls")
    return fr.img.reduce(k)


def _cosines(fr: _Frame, d, cosines: list[float], *, dashed: bool) -> None:
    """One model's cosine per block: dots joined by a line, solid with filled dots or dashed with open ones."""
    k = fr.k
    points = [(fr.cx(i), fr.cy(max(-1.0, min(1.0, c)))) for i, c in enumerate(cosines)]
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        steps = 6 if dashed else 1
        for s in range(0, steps, 2 if dashed else 1):
            f0, f1 = s / steps, (s + 1) / steps
            d.line([(xa + (xb - xa) * f0, ya + (yb - ya) * f0), (xa + (xb - xa) * f1, ya + (yb - ya) * f1)],
                   fill="black", width=2 * k)
    for x, y in points:
        d.ellipse([x - 3 * k, y - 3 * k, x + 3 * k, y + 3 * k], fill="white" if dashed else "black", outline="black",
                  width=k)


def similarity_map(matrix: torch.Tensor, blocks_a: Sequence[str], blocks_b: Sequence[str], label_a: str,
                   label_b: str, *, cell: int = 34) -> Image.Image:
    """CKA between every block of A (rows) and of B (columns): viridis, 0 dark to 1 yellow, values written."""
    from PIL import ImageDraw

    rows, cols = len(blocks_a), len(blocks_b)
    left, top = 90, 70
    W, H = max(left + cols * cell + 20, 470), top + rows * cell + 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lut = colour_lut("viridis")
    values = matrix.double().clamp(0, 1).tolist()
    for i in range(rows):
        for j in range(cols):
            v = values[i][j]
            colour = tuple(int(c) for c in lut[min(255, int(v * 255 + 0.5))])
            x, y = left + j * cell, top + i * cell
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
            draw_text(img, (x + cell / 2, y + cell / 2), f"{v:.2f}", "white" if v < 0.6 else "black", 9, "mm")
        draw_text(img, (left - 6, top + i * cell + cell / 2), blocks_a[i], "#222222", 10, "rm")
    for j in range(cols):
        draw_text(img, (left + j * cell + cell / 2, top + rows * cell + 6), blocks_b[j], "#222222", 9, "mt")
    draw_text(img, (left, 22), f"Linear CKA: rows = blocks of A ({label_a})", "#111111", 12, "ls")
    draw_text(img, (left, 40), f"columns = blocks of B ({label_b}); 1 = the same representation", "#444444", 11, "ls")
    return img
