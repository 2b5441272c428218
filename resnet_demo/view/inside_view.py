"""Inside one residual block, as one picture and a few words for a learner (from :class:`~..core.inside.Inside`).

- :func:`inside_figure`: one image, top to bottom: the block's real layers as a diagram (the branch F on
  top, the shortcut below, joined at the sum; each layer with its shape and parameter count); the map
  after every step for the chosen channel, in a row (F(x), s(x), F(x)+s(x) and y on one colour scale,
  since they add up; each earlier step on its own); the last convolution's input channels ranked by how
  much they feed the channel, as bars; and where y comes from, ``|F| / (|F| + |s|)`` per position.
  :meth:`InsideFigure.position_at` says which position of the block's output map a click landed on;
- :func:`step_words`, :func:`sentence`, :func:`words_markdown`: what each step does, and one sentence on
  this image ("In res4, channel 12 of y comes 80% from the shortcut: this block leaves it almost as it was");
- :func:`unit_text`: one position's sum in numbers (F, s, F + s, y).

Drawn with PIL and the colour tables of :mod:`.render`: a few milliseconds, no matplotlib figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..core.inside import Inside, Layer, Step, unit
from .render import chart_font, colour_lut, draw_text

__all__ = ["InsideFigure", "inside_figure", "sentence", "step_words", "unit_text", "words_markdown"]

INK, MUTED, RULE = "#222222", "#666666", "#999999"
PATH_COLOURS = {"F": "#DD8452", "shortcut": "#8172B3", "out": "#55A868"}  # box outlines: branch, shortcut, after
FONT_PX, SMALL_PX = 12, 10
MARGIN, GAP = 12, 10
BOX_W, BOX_H = 118, 58
SIGNED, SHARE = "RdBu_r", "PuOr_r"  # step maps (blue < 0 < red); the F-share map (purple: s, orange: F)
TOP_CHANNELS = 10


@dataclass(frozen=True)
class InsideFigure:
    """The picture, and where the block's output-space maps lie in it (for clicks): ``boxes`` maps a step's
    label (and ``"F share"``) to its (left, top, right, bottom) pixels; ``grid`` is the map's (rows, cols)."""

    image: Image.Image
    boxes: dict[str, tuple[int, int, int, int]]
    grid: tuple[int, int]

    def position_at(self, x: float, y: float) -> tuple[int, int] | None:
        """The (row, col) of the block's output map under pixel (x, y), on any of its maps; ``None`` elsewhere."""
        rows, cols = self.grid
        for left, top, right, bottom in self.boxes.values():
            if left <= x < right and top <= y < bottom:
                return (min(rows - 1, int((y - top) * rows / (bottom - top))),
                        min(cols - 1, int((x - left) * cols / (right - left))))
        return None


# --- the picture ---------------------------------------------------------------------------------------------


def inside_figure(inside: Inside, *, cell: int = 88) -> InsideFigure:
    """One image of ``inside``: the layer diagram, the step maps, the ranked contributions, the F-share map."""
    f_layers = [la for la in inside.layers if la.path in ("F", "out")]
    width = max(2 * MARGIN + len(f_layers) * (BOX_W + GAP) + 40, 2 * MARGIN + _columns(inside, cell)[-1], 760)
    diagram_h = 2 * BOX_H + 3 * GAP + 16
    steps_h = cell + 3 * (FONT_PX + 6)
    bottom_h = max(TOP_CHANNELS * 16 + 40, cell * 2 + 40)
    relu_lines = _relu_lines(inside)
    height = MARGIN + 24 + diagram_h + steps_h + bottom_h + len(relu_lines) * (SMALL_PX + 5) + MARGIN
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    title = (f"Inside {inside.block} ({inside.family} {inside.block_type}, {inside.shortcut} shortcut) · channel "
             f"{inside.channel} of {inside.channels} · {inside.params:,} parameters")
    draw_text(img, (MARGIN, MARGIN), title, INK, FONT_PX + 2, "lt")
    top = MARGIN + 24
    _diagram(img, d, inside, top)
    top += diagram_h
    boxes = _step_row(img, d, inside, top, cell)
    top += steps_h
    _contribution_bars(img, d, inside, (MARGIN, top, width // 2 - GAP))
    boxes["F share"] = _share_map(img, inside, (width // 2 + GAP, top), 2 * cell)
    for i, line in enumerate(relu_lines):
        draw_text(img, (MARGIN, top + bottom_h + i * (SMALL_PX + 5)), line, MUTED, SMALL_PX + 1, "lt")
    return InsideFigure(img, boxes, tuple(inside.y.shape))


def _short_name(name: str) -> str:
    """A layer's name inside its block: ``conv1``, ``bn``; ``downsample.0`` keeps its parent (a bare index says
    nothing)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _short_kind(layer: Layer) -> str:
    if layer.type == "Conv2d":
        return layer.kind.split(",")[0] + (" /2" if "stride 2" in layer.kind else "")
    return {"BatchNorm2d": "batch norm", "ReLU": "ReLU"}.get(layer.type, layer.type)


def _box(img: Image.Image, d: ImageDraw.ImageDraw, xy: tuple[int, int], layer: Layer) -> None:
    x, y = xy
    d.rounded_rectangle([x, y, x + BOX_W, y + BOX_H], radius=6, outline=PATH_COLOURS[layer.path], width=2)
    shape = "×".join(str(v) for v in layer.out_shape)
    lines = [((layer.label or _short_name(layer.name)) + (f" ({layer.call})" if layer.call > 1 else ""), INK, FONT_PX),
             (_short_kind(layer), MUTED, SMALL_PX), (f"→ {shape}", MUTED, SMALL_PX),
             (f"{layer.params:,} params" if layer.params else "no parameters", MUTED, SMALL_PX)]
    for i, (text, colour, size) in enumerate(lines):
        draw_text(img, (x + BOX_W / 2, y + 4 + i * 13), text, colour, size, "mt")


def _diagram(img: Image.Image, d: ImageDraw.ImageDraw, inside: Inside, top: int) -> None:
    """The branch's layers in a row, the shortcut's below, the sum, then what follows it (the final ReLU)."""
    branch = [la for la in inside.layers if la.path == "F"]
    after = [la for la in inside.layers if la.path == "out"]
    short = [la for la in inside.layers if la.path == "shortcut"]
    x0, mid = MARGIN + 34, top + BOX_H / 2
    draw_text(img, (MARGIN, mid), "x", INK, FONT_PX + 2, "lm")
    x = x0
    for la in branch:
        d.line([(x - GAP, mid), (x, mid)], fill=RULE, width=2)
        _box(img, d, (x, top), la)
        x += BOX_W + GAP
    plus_x = x + 12
    d.line([(x - GAP, mid), (plus_x - 9, mid)], fill=RULE, width=2)
    d.ellipse([plus_x - 9, mid - 9, plus_x + 9, mid + 9], outline=INK, width=2)
    draw_text(img, (plus_x, mid), "+", INK, FONT_PX + 2, "mm")
    low = top + BOX_H + 2 * GAP
    low_mid = low + BOX_H / 2
    d.line([(MARGIN + 16, mid + 8), (MARGIN + 16, low_mid), (x0 - GAP, low_mid)], fill=RULE, width=2)
    if short:
        sx = x0
        for la in short:
            _box(img, d, (sx, low), la)
            sx += BOX_W + GAP
        d.line([(sx - GAP, low_mid), (plus_x, low_mid), (plus_x, mid + 9)], fill=RULE, width=2)
        label = "s(x): projection shortcut"
    else:
        d.line([(x0 - GAP, low_mid), (plus_x, low_mid), (plus_x, mid + 9)], fill=RULE, width=2)
        label = "s(x) = x: identity shortcut (no layer, no parameter)"
    draw_text(img, (x0, low_mid + (BOX_H / 2 + 4 if short else 4)), label, PATH_COLOURS["shortcut"], SMALL_PX + 1,
              "lt")
    draw_text(img, (x0, top - 2), "F(x): the residual branch", PATH_COLOURS["F"], SMALL_PX + 1, "lb")
    tail = " → ".join(_short_kind(la) for la in after) or "y"
    draw_text(img, (plus_x + 14, mid - 4), f"→ {tail} → y", INK, FONT_PX, "lb")


def _map_image(m: np.ndarray, scale: float, size: int, cmap: str = SIGNED, *, signed: bool = True) -> Image.Image:
    """A map as colours, enlarged a whole number of times (nearest neighbour: pixels stay pixels) to at most
    ``size`` on its long side; ``scale`` maps to the colour map's ends."""
    scale = scale if scale > 0 else 1.0
    level = (m / scale * 127.5 + 127.5) if signed else (m / scale * 255)
    rgb = colour_lut(cmap)[np.clip(np.rint(level), 0, 255).astype(np.uint8)]
    rep = max(1, size // max(m.shape))
    return Image.fromarray(np.repeat(np.repeat(rgb, rep, axis=0), rep, axis=1))


def _step_caption(inside: Inside, step: Step) -> str:
    if step.label == inside.f_step.label:
        return f"{step.label} = F(x)"
    return step.label


def _step_texts(inside: Inside, step: Step, scale: float) -> tuple[str, str, str]:
    """A step's caption above its map and the two lines below it."""
    where = f"ch {step.channel}" if step.space == "out" else f"ch {step.channel} of {step.space}"
    return _step_caption(inside, step), where, f"±{scale:.3g}" + (" shared" if step.comparable else "")


def _columns(inside: Inside, cell: int) -> list[int]:
    """The left edge of every step's column, then the right edge of the last: each as wide as its map or its
    longest caption (transformers' layer names are long)."""
    font, small = chart_font(FONT_PX - 1), chart_font(SMALL_PX)
    edges = [MARGIN]
    for step in inside.steps:
        top, *below = _step_texts(inside, step, 0.0)
        width = max(cell, font.getlength(top), *(small.getlength(t) for t in below))
        edges.append(edges[-1] + int(width + 0.5) + GAP)
    return edges


def _step_row(img: Image.Image, d: ImageDraw.ImageDraw, inside: Inside, top: int, cell: int) -> dict:
    """Every step's map for its channel; the ones that add up to y on one scale. Returns their boxes."""
    boxes = {}
    for x, step in zip(_columns(inside, cell), inside.steps):
        scale = inside.scale if step.comparable else float(np.abs(step.map).max())
        tile = _map_image(step.map, scale, cell)
        y = top + FONT_PX + 6
        img.paste(tile, (x, y))
        d.rectangle([x - 1, y - 1, x + tile.width, y + tile.height], outline=INK if step.comparable else RULE)
        caption, where, scale_text = _step_texts(inside, step, scale)
        draw_text(img, (x, top), caption, INK, FONT_PX - 1, "lt")
        draw_text(img, (x, y + cell + 3), where, MUTED, SMALL_PX, "lt")
        draw_text(img, (x, y + cell + 15), scale_text, MUTED, SMALL_PX, "lt")
        if step.space == "out" and step.path != "F" or step is inside.f_step:
            boxes[step.label] = (x, y, x + tile.width, y + tile.height)
    return boxes


def _label_of(inside: Inside, name: str) -> str:
    """A layer's short label, from its path in the block."""
    return next((la.label for la in inside.layers if la.name == name and la.label), _short_name(name))


def _contribution_bars(img: Image.Image, d: ImageDraw.ImageDraw, inside: Inside, frame: tuple) -> None:
    """The last conv's input channels that feed the chosen channel most: share of the total, coloured by sign."""
    x0, top, x1 = frame
    draw_text(img, (x0, top), f"What feeds {_label_of(inside, inside.last_conv)}'s channel {inside.channel} "
              f"(its input channels, ranked)", INK, FONT_PX, "lt")
    label_w, row = 64, 16
    scale = max((c.share for c in inside.contributions[:TOP_CHANNELS]), default=1.0) or 1.0
    for i, c in enumerate(inside.contributions[:TOP_CHANNELS]):
        y = top + 22 + i * row
        draw_text(img, (x0, y + row / 2), f"ch {c.channel}", MUTED, SMALL_PX, "lm")
        length = (x1 - x0 - label_w - 50) * c.share / scale
        colour = "#C44E52" if c.total >= 0 else "#4C72B0"
        d.rectangle([x0 + label_w, y + 2, x0 + label_w + length, y + row - 3], fill=colour)
        draw_text(img, (x0 + label_w + length + 4, y + row / 2), f"{100 * c.share:.0f}%", MUTED, SMALL_PX, "lm")
    draw_text(img, (x0, top + 26 + TOP_CHANNELS * row), "red: raises it overall · blue: lowers it · "
              f"bias {inside.bias:+.3g}", MUTED, SMALL_PX, "lt")


def _share_map(img: Image.Image, inside: Inside, xy: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    x, top = xy
    draw_text(img, (x, top), "Where y comes from: |F| / (|F| + |s|)", INK, FONT_PX, "lt")
    tile = _map_image(inside.f_share, 1.0, size, SHARE, signed=False)
    y = top + 22
    img.paste(tile, (x, y))
    draw_text(img, (x + tile.width + 8, y), "orange: from the branch F", "#B35806", SMALL_PX, "lt")
    draw_text(img, (x + tile.width + 8, y + 14), "purple: from the shortcut s", "#542788", SMALL_PX, "lt")
    draw_text(img, (x + tile.width + 8, y + 28), "click a position for its sum", MUTED, SMALL_PX, "lt")
    return (x, y, x + tile.width, y + tile.height)


def _relu_lines(inside: Inside) -> list[str]:
    """What each ReLU removed, one line each."""
    lines = []
    for r in inside.relus:
        where = "after the sum" if r.path == "out" else f"in F ({_label_of(inside, r.layer)})"
        lines.append(f"ReLU {where} removed {100 * r.removed:.0f}% of channel {r.channel}'s magnitude "
                     f"({100 * r.zeroed:.0f}% of its positions zeroed); all channels: {100 * r.removed_all:.0f}% "
                     f"({100 * r.zeroed_all:.0f}% of units)")
    return lines


# --- the words --------------------------------------------------------------------------------------------


def _layer_of(inside: Inside, step: Step) -> Layer | None:
    return next((la for la in inside.layers if la.name == step.layer), None)


def _conv_words(layer: Layer) -> str:
    k = layer.kind.split(",")[0].removeprefix("conv ")
    halves = " and halves the resolution" if "stride 2" in layer.kind else ""
    return (f"a {k} convolution: each output value is a weighted sum of all {layer.in_shape[0]} input "
            f"channels over a {k} neighbourhood{halves}, giving {layer.out_shape[0]} channels")


def step_words(inside: Inside) -> list[str]:
    """One line per step, in order: what the step does, for a learner."""
    words = []
    for step in inside.steps:
        layer = _layer_of(inside, step)
        if step.label == "x":
            text = (f"the block's input; channel {step.channel} is the one that, followed through the convolutions, "
                    f"feeds output channel {inside.channel} most")
        elif layer is not None and layer.type == "Conv2d":
            text = _conv_words(layer)
        elif layer is not None and layer.type == "BatchNorm2d":
            text = ("batch norm: each channel is shifted and scaled by the statistics learnt in training"
                    + (": its output is F(x), what the block adds" if step is inside.f_step else ""))
        elif layer is not None and layer.type == "ReLU":
            text = "ReLU: negative values become zero, positive ones pass unchanged"
        elif step.label == "s(x)":
            text = ("the identity shortcut: x itself, carried past the branch unchanged"
                    if inside.shortcut == "identity" else
                    "the projection shortcut: a 1×1 convolution and batch norm reshape x to y's channels and size")
        elif step.label == "F(x)+s(x)":
            text = "the sum: what the branch adds, plus what the shortcut keeps"
        else:
            text = "y = ReLU(F(x) + s(x)): the block's output; negative sums become zero"
        channel = "" if step.space == "out" else f" (shown: channel {step.channel} of {step.space})"
        words.append(f"{_step_caption(inside, step)}{channel}: {text}.")
    return words


def sentence(inside: Inside) -> str:
    """One sentence on this image: how much of the chosen channel of y comes from the shortcut or the branch.

    The share is :attr:`Inside.shortcut_share`: sum |s| / (sum |F| + sum |s|) over the positions y keeps.
    """
    head = f"In {inside.block}, channel {inside.channel} of y"
    share = inside.shortcut_share
    if share is None:
        return f"{head} is zero everywhere on this image: the ReLU after the sum removed all of it."
    p = round(100 * share)
    if p >= 50:
        rest = "this block leaves it almost as it was" if p >= 75 else "the block adjusts what came in"
        return f"{head} comes {p}% from the shortcut: {rest}."
    rest = "this block rewrites it" if p <= 25 else "the branch changes it more than the shortcut keeps it"
    return f"{head} comes {100 - p}% from the branch F(x): {rest}."


def words_markdown(inside: Inside) -> str:
    """The sentence, then what each step does, as Markdown for the page."""
    return "\n".join([f"**{sentence(inside)}**", "", *(f"- {w}" for w in step_words(inside))])


def unit_text(inside: Inside, row: int, col: int) -> str:
    """One position's sum in numbers, e.g. ``(3, 5): F = 0.42, s = 1.10, F + s = 1.52, y = 1.52 (28% from F)``.

    Raises:
        IndexError: the position is outside the block's output map.
    """
    u = unit(inside, row, col)
    cut = " (cut by the ReLU)" if u.pre < 0 else ""
    return (f"{inside.block}, channel {u.channel}, position ({u.row}, {u.col}): F = {u.f:.4g}, s = {u.s:.4g}, "
            f"F + s = {u.pre:.4g}, y = {u.y:.4g}{cut}; {100 * u.f_share:.0f}% from F")
