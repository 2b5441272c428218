"""What one channel responds to, as pictures: its data-set exemplars, its feature visualisations, its map on
the user's image.

- :func:`exemplar_grid`: the evaluation images that excite the channel most, cropped around where it peaks
  and enlarged with nearest neighbour (pixels stay pixels), each with the channel's mean activation on it
  and the image's class; for F(x) a second row with the most negative ones (the branch also removes);
- :func:`featurevis_panel`: optimised images side by side (F(x) and y of the same channel, say), each
  with the activation it reached and that of its starting noise;
- :func:`channel_map`: the chosen channel's map over the image the model saw, next to the map enlarged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..core.explorer import Analysis
from ..core.studies.evalsets import EvalSet
from ..core.studies.exemplars import ChannelExemplars, Exemplar
from ..core.studies.featurevis import FeatureVis
from ..core.weights.cards import ModelCard
from .render import PART_LABELS, colour_lut, draw_text, input_image, overlay, text_mask

__all__ = ["channel_map", "exemplar_grid", "featurevis_panel", "part_name"]

INK, MUTED, BACKGROUND = "#222222", "#666666", "white"
FONT_PX = 12
TITLE_H = 24  # pixels of a picture's title line
CAPTION_H = 30  # two lines of caption under a tile
GAP = 6

_SHORT = dict(zip(PART_LABELS, ("x", "F(x)", "y"), strict=True))  # as titles and captions write each part


def part_name(part: str) -> str:
    """``x``, ``F(x)`` or ``y``: how a part is written in titles and captions."""
    if part not in PART_LABELS:
        raise ValueError(f"part must be one of {list(PART_LABELS)}, got {part!r}")
    return _SHORT[part]


def _rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr).convert("RGB")


def _enlarged(img: Image.Image, size: int) -> Image.Image:
    """Enlarged by a whole factor with nearest neighbour, to ``size`` pixels or a little less."""
    rep = max(1, size // max(img.size))
    return img.resize((img.size[0] * rep, img.size[1] * rep), Image.NEAREST)


def _slot(tiles: Sequence[Image.Image], captions: Sequence[tuple[str, str]]) -> int:
    """Width of a tile's slot: the widest tile or caption line."""
    lines = [text_mask(line, FONT_PX, "mt")[0].size[0] + 4 for pair in captions for line in pair]
    return max([max(t.size) for t in tiles] + lines)


def _captioned_row(tiles: Sequence[Image.Image], captions: Sequence[tuple[str, str]], label: str,
                   label_w: int, slot: int | None = None) -> Image.Image:
    """Tiles in a row, two caption lines under each, ``label`` at the row's left; each in a slot ``slot``
    pixels wide (by default :func:`_slot`'s)."""
    tile = max(max(t.size) for t in tiles)
    slot = slot or _slot(tiles, captions)
    row = Image.new("RGB", (label_w + len(tiles) * (slot + GAP), tile + CAPTION_H), BACKGROUND)
    draw_text(row, (4, tile // 2), label, INK, FONT_PX, "lm")
    for i, (t, (first, second)) in enumerate(zip(tiles, captions)):
        x = label_w + i * (slot + GAP)
        row.paste(t, (x + (slot - t.size[0]) // 2, (tile - t.size[1]) // 2))
        draw_text(row, (x + slot / 2, tile + 2), first, INK, FONT_PX, "mt")
        draw_text(row, (x + slot / 2, tile + 2 + FONT_PX + 2), second, MUTED, FONT_PX - 1, "mt")
    return row


def _stack(title: str, rows: Sequence[Image.Image]) -> Image.Image:
    """A title line over ``rows``, as wide as the widest of them."""
    width = max(max(r.size[0] for r in rows), text_mask(title, FONT_PX + 1, "lm")[0].size[0] + 8)
    out = Image.new("RGB", (width, TITLE_H + sum(r.size[1] + GAP for r in rows)), BACKGROUND)
    draw_text(out, (4, TITLE_H // 2), title, INK, FONT_PX + 1, "lm")
    y = TITLE_H
    for r in rows:
        out.paste(r, (0, y))
        y += r.size[1] + GAP
    return out


def _exemplar_tiles(ex: ChannelExemplars, evalset: EvalSet, negative: bool, cell: int):
    """The crops, enlarged, and their captions (value; class and index in the set)."""
    chosen: Sequence[Exemplar] = ex.bottom if negative else ex.top
    tiles = [_enlarged(_rgb(c), cell) for c in ex.crops(evalset.images, negative=negative)]
    captions = [(f"{e.value:.2f}", f"{evalset.classes[int(evalset.labels[e.index])]} #{e.index}") for e in chosen]
    return tiles, captions


def exemplar_grid(ex: ChannelExemplars, evalset: EvalSet, *, cell: int = 64) -> Image.Image:
    """The channel's exemplars: the evaluation images whose mean activation of the channel is largest, each
    cropped around the channel's peak (its effective receptive field), enlarged to about ``cell`` pixels,
    with the value and the image's class and index; for F(x) the most negative ones in a second row.

    Args:
        ex: one channel's exemplars (:meth:`~resnet_demo.core.studies.exemplars.Exemplars.channel`).
        evalset: the evaluation set they index (its images, labels and class names).
    """
    if ex.evalset != evalset.name:
        raise ValueError(f"these exemplars index {ex.evalset!r}, not {evalset.name!r}")
    parts = [("highest", *_exemplar_tiles(ex, evalset, False, cell))]
    if ex.bottom:
        parts.append(("lowest", *_exemplar_tiles(ex, evalset, True, cell)))
    slot = max(_slot(tiles, captions) for _, tiles, captions in parts)
    rows = [_captioned_row(tiles, captions, label, 64, slot) for label, tiles, captions in parts]
    title = (f"{ex.block} {part_name(ex.part)}, channel {ex.channel}: its mean activation on {len(ex.top)} images "
             f"of {ex.evalset} (mean over the set {ex.mean:.2f})")
    return _stack(title, rows)


def featurevis_panel(items: Sequence[FeatureVis], *, size: int = 128, title: str | None = None) -> Image.Image:
    """Optimised images side by side, enlarged with nearest neighbour to about ``size`` pixels, each captioned
    with its part and the channel's mean activation reached (and that of the starting noise).

    For F(x) and y of one channel: ``featurevis_panel([vis_f, vis_y])``.
    """
    if not items:
        raise ValueError("no feature visualisation to show")
    tiles = [_enlarged(_rgb(v.image), size) for v in items]
    captions = [(f"{v.block} {part_name(v.part)} ch {v.channel}: {v.activation:.2f}",
                 f"from noise {v.start_activation:.2f}") for v in items]
    if title is None:
        first = items[0]
        if all((v.block, v.channel) == (first.block, first.channel) for v in items):
            parts = " and ".join(part_name(v.part) for v in items)
            title = f"{first.block}, channel {first.channel}: images optimised to excite {parts}"
        else:
            title = "Images optimised to excite a channel"
    return _stack(title, [_captioned_row(tiles, captions, "", 4)])


def _map_colours(fmap: np.ndarray, signed: bool) -> tuple[np.ndarray, str]:
    """Values in [0, 1] for the colour map: around 0.5 for signed maps (blue < 0 < red), 0..max otherwise."""
    scale = float(np.abs(fmap).max()) or 1.0
    if signed:
        return fmap / scale * 0.5 + 0.5, "RdBu_r"
    return np.maximum(fmap, 0) / scale, "magma"


def channel_map(analysis: Analysis, block: str, part: str, channel: int, card: ModelCard, *,
                size: int = 160) -> Image.Image:
    """The chosen channel's map for the analysed image: over the image the model saw (left) and enlarged on
    its own (right), with its mean and its peak.

    Raises:
        ValueError: an unknown block or part, or a channel out of range.
    """
    record = next((r for r in analysis.blocks if r.name == block), None)
    if record is None:
        raise ValueError(f"unknown block {block!r}; the analysis has {[r.name for r in analysis.blocks]}")
    part_name(part)
    t: torch.Tensor = getattr(record, part)[0]
    if not 0 <= channel < t.shape[0]:
        raise ValueError(f"{part} of block {block} has {t.shape[0]} channels (0 to {t.shape[0] - 1}); got {channel}")
    fmap = t[channel].detach().float().cpu().numpy()  # (H, W)
    values, cmap = _map_colours(fmap, part == "f")
    base = input_image(analysis.input, card, size)
    left = overlay(values, base, alpha=0.6, cmap=cmap)
    levels = (np.clip(values, 0, 1) * 255 + 0.5).astype(np.uint8)
    right = Image.fromarray(colour_lut(cmap)[levels]).resize(left.size, Image.NEAREST)
    r, c = np.unravel_index(int(np.argmax(fmap)), fmap.shape)
    captions = [("your image", f"{block} {part_name(part)} ch {channel} over it"),
                (f"mean {fmap.mean():.2f}, max {fmap.max():.2f}", f"peak at row {r}, column {c} of {fmap.shape[0]}")]
    row = _captioned_row([left, right], captions, "", 4)
    return _stack(f"{block} {part_name(part)}, channel {channel} on this image", [row])
