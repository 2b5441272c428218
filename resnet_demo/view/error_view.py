"""Pictures and words of a scan over a labelled set: the clickable confusion matrix, a gallery, a summary.

The confusion matrix is drawn with PIL at a size that depends only on the classes, so a click on it maps
back to a cell without keeping the picture: :func:`confusion_cell` turns the pixel Gradio reports for a
``select`` event into (true, predicted), or the class of a row or column label clicked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from ..core.studies.errorscan import Scan
from ..core.studies.labelled import LabelledSet
from .render import chart_font, draw_text, text_mask

__all__ = [
    "ConfusionLayout",
    "caption",
    "confusion_cell",
    "confusion_image",
    "confusion_layout",
    "gallery_items",
    "labelled_summary",
    "scan_summary",
    "set_image",
]

RIGHT_RGB = (26, 152, 80)  # the diagonal: images predicted right
WRONG_RGB = (215, 48, 39)  # off the diagonal: images predicted wrong
EMPTY_DIAGONAL = (232, 245, 233)  # a diagonal cell with no image right still reads as the diagonal
GRID_LINE = (224, 224, 224)
MAX_LABEL = 14  # characters of a class name shown beside the matrix
_PAD = 10


@dataclass(frozen=True)
class ConfusionLayout:
    """Where the matrix of ``k`` classes sits in its picture: cell (t, p) spans
    ``[left + p·cell, left + (p+1)·cell) × [top + t·cell, top + (t+1)·cell)``."""

    k: int
    cell: int
    left: int
    top: int
    width: int
    height: int
    font: int  # label size in pixels; 0 when the cells are too small for labels

    def cell_at(self, x: float, y: float) -> tuple[int | None, int | None] | None:
        """(true, predicted) of the cell under pixel (x, y); (true, None) on a row label, (None, predicted) on a
        column label; ``None`` anywhere else."""
        col = (x - self.left) // self.cell
        row = (y - self.top) // self.cell
        in_cols, in_rows = 0 <= col < self.k, 0 <= row < self.k
        if in_cols and in_rows:
            return int(row), int(col)
        if in_rows and 0 <= x < self.left:
            return int(row), None
        if in_cols and 0 <= y < self.top:
            return None, int(col)
        return None


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL else name[: MAX_LABEL - 1] + "…"


@lru_cache(maxsize=32)
def _layout(classes: tuple[str, ...]) -> ConfusionLayout:
    k = len(classes)
    cell = max(2, min(40, 520 // max(k, 1)))
    font = min(11, cell - 2) if cell >= 10 else 0
    label = max((chart_font(font).getlength(_short(c)) for c in classes), default=0) if font else 0
    left = _PAD + int(label) + 8 + 40  # names, then room for the "true" axis title
    top = 40 + int(label) + 8  # two lines of title, then the column names written upwards
    width = max(left + k * cell + 60, 420)  # the accuracy column on the right
    height = top + k * cell + 34
    return ConfusionLayout(k, cell, left, top, width, height, font)


def confusion_layout(classes: Sequence[str]) -> ConfusionLayout:
    """The layout :func:`confusion_image` uses for these classes (the same for every scan over them)."""
    return _layout(tuple(classes))


def confusion_cell(classes: Sequence[str], x: float, y: float) -> tuple[int | None, int | None] | None:
    """What a click at pixel (x, y) of the confusion picture of ``classes`` selects: (true, predicted), or one
    of them on a label (see :meth:`ConfusionLayout.cell_at`); ``None`` elsewhere."""
    return confusion_layout(classes).cell_at(x, y)


def _shade(rgb: tuple[int, int, int], share: float) -> tuple[int, int, int]:
    """White mixed with ``rgb``: a cell's colour for the share of its row it holds (any count > 0 stays visible)."""
    t = 0.15 + 0.85 * share
    return tuple(round(255 + (c - 255) * t) for c in rgb)


def _cells(img: Image.Image, d, confusion: np.ndarray, lay: ConfusionLayout) -> None:
    rows = confusion.sum(axis=1)
    for t in range(lay.k):
        for p in range(lay.k):
            count = int(confusion[t, p])
            x, y = lay.left + p * lay.cell, lay.top + t * lay.cell
            share = count / rows[t] if rows[t] else 0.0
            if count:
                fill = _shade(RIGHT_RGB if t == p else WRONG_RGB, share)
            else:
                fill = EMPTY_DIAGONAL if t == p else (255, 255, 255)
            d.rectangle([x, y, x + lay.cell - 1, y + lay.cell - 1], fill=fill,
                        outline=RIGHT_RGB if t == p else GRID_LINE if lay.cell >= 6 else None)
            if count and lay.cell >= 18:
                ink = "white" if 0.15 + 0.85 * share > 0.55 else "#222222"
                draw_text(img, (x + lay.cell / 2, y + lay.cell / 2), str(count), ink, min(11, lay.cell // 2), "mm")


def _upright(img: Image.Image, xy: tuple[int, int], text: str, size: int, *, middle: bool = False) -> None:
    """``text`` written upwards, centred on column ``xy[0]``, starting at row ``xy[1]`` (or centred on it)."""
    mask = text_mask(text, size, "lt")[0].rotate(90, expand=True)
    top = xy[1] - (mask.size[1] // 2 if middle else mask.size[1])
    img.paste("#222222", (xy[0] - mask.size[0] // 2, top), mask)


def _labels(img: Image.Image, classes: Sequence[str], acc: Sequence[float], lay: ConfusionLayout) -> None:
    edge = lay.left + lay.k * lay.cell
    if lay.font:
        for i, name in enumerate(classes):
            mid = i * lay.cell + lay.cell / 2
            draw_text(img, (lay.left - 6, lay.top + mid), _short(name), "#222222", lay.font, "rm")
            _upright(img, (round(lay.left + mid), lay.top - 6), _short(name), lay.font)
            if acc[i] == acc[i]:  # not NaN: the class has images
                draw_text(img, (edge + 8, lay.top + mid), f"{acc[i]:.0%}", "#222222", lay.font, "lm")
    draw_text(img, (edge + 8, lay.top - 6), "right", "#444444", 10, "ls")
    _upright(img, (_PAD + 8, lay.top + lay.k * lay.cell // 2), "true class", 11, middle=True)
    draw_text(img, (lay.left + lay.k * lay.cell / 2, lay.top + lay.k * lay.cell + 8), "predicted class", "#444444", 11,
          "mt")


def confusion_image(scan: Scan, *, title: str | None = None) -> Image.Image:
    """The confusion matrix: rows the true class, columns the predicted one, each cell's count written in it;
    the diagonal (right) in green, errors in red, darker for a larger share of the row; each class's accuracy
    on the right. Cells are 40 px for up to 13 classes and shrink with more (numbers from 18 px, names from 10)."""
    from PIL import ImageDraw

    lay = confusion_layout(scan.classes)
    img = Image.new("RGB", (lay.width, lay.height), "white")
    d = ImageDraw.Draw(img)
    _cells(img, d, scan.confusion.numpy(), lay)
    _labels(img, scan.classes, scan.per_class_accuracy.tolist(), lay)
    head = title or f"Confusion matrix: {scan.name}, {scan.n} images, {scan.accuracy:.1%} right"
    draw_text(img, (_PAD, 16), head, "#111111", 12, "ls")
    draw_text(img, (_PAD, 32), "Click a cell to see its images, a class name for its row or column.", "#555555", 10,
          "ls")
    return img


# --- the gallery -----------------------------------------------------------------------------------------------


def set_image(images: torch.Tensor, index: int) -> Image.Image:
    """Image ``index`` of a (N, C, H, W) uint8 set as a PIL image at its own size (for the main view)."""
    arr = images[index].cpu().numpy()
    return Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")


def caption(scan: Scan, index: int) -> str:
    """``"cat → dog 87%"`` (true → predicted, the prediction's confidence); ``"cat ✓ 99%"`` when right."""
    t, p = int(scan.labels[index]), int(scan.predicted[index])
    conf = f"{float(scan.confidence[index]):.0%}"
    return f"{scan.classes[t]} ✓ {conf}" if t == p else f"{scan.classes[t]} → {scan.classes[p]} {conf}"


def gallery_items(
    images: torch.Tensor, scan: Scan, indices: Sequence[int], *, size: int = 96, limit: int = 120
) -> list[tuple[Image.Image, str]]:
    """(picture, caption) for Gradio's ``Gallery``: the first ``limit`` of ``indices``, each image enlarged
    with nearest neighbour by a whole factor (pixels stay square and sharp) to about ``size`` pixels."""
    items = []
    for i in list(indices)[:limit]:
        img = set_image(images, i)
        rep = max(1, size // max(img.size))
        items.append((img.resize((img.size[0] * rep, img.size[1] * rep), Image.NEAREST), caption(scan, i)))
    return items


# --- words -----------------------------------------------------------------------------------------------------


def scan_summary(scan: Scan, *, worst: int = 3, confused: int = 3) -> str:
    """A few lines of Markdown: accuracy and n, the hardest classes (the ``worst`` with the lowest accuracy, if
    below 100%), the most confused pairs."""
    right = int(scan.correct.sum())
    lines = [f"**{scan.accuracy:.1%}** right ({right} of {scan.n} images of {scan.name})."]
    hard = [h for h in scan.worst_classes(worst) if h[1] < 1.0]
    if hard:
        parts = [f"{scan.classes[c]} {a:.0%} ({round(a * n)}/{n})" for c, a, n in hard]
        lines.append("Hardest classes: " + ", ".join(parts) + ".")
    pairs = scan.most_confused(confused)
    if pairs:
        parts = [f"{scan.classes[t]} → {scan.classes[p]} ({n})" for t, p, n in pairs]
        lines.append("Most confused (true → predicted): " + ", ".join(parts) + ".")
    else:
        lines.append("No image is predicted wrong.")
    return "  \n".join(lines)


def labelled_summary(data: LabelledSet) -> str:
    """What was read from a user's set and what was left out, in one or two sentences."""
    counts = torch.bincount(data.labels, minlength=len(data.classes))
    present = int((counts > 0).sum())
    text = f"Read {len(data.files)} images of {present} of the model's {len(data.classes)} classes from {data.name}."
    if data.skipped:
        left = ", ".join(f"{n} {reason}" for reason, n in sorted(data.skipped.items(), key=lambda kv: -kv[1]))
        text += f" Skipped {sum(data.skipped.values())} file(s): {left}."
    if data.problems:
        text += " Unreadable: " + "; ".join(data.problems) + "."
    return text
