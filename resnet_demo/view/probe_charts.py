"""The linear-probe chart: per block, how well a linear probe reads the class beside how well the head does.

Drawn with PIL at twice the size and downsampled, like :func:`resnet_demo.view.render.residual_chart`.
The figures come from a model card's ``studies["probes"]`` (written by ``python -m
resnet_demo.training.probes``); the current image's readings from
:func:`resnet_demo.core.probes.probe_readings`.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from ..core.probes import ProbeReading
from .render import STAGE_COLOURS, draw_text

__all__ = ["probe_chart", "probe_summary"]

HEAD_COLOUR = "#8c8c8c"
IMAGE_COLOUR = "#111111"


def probe_summary(study: dict) -> str:
    """One sentence on where the class becomes linearly readable and where the head can read it."""
    rows = study.get("blocks") or []
    if not rows:
        return "No linear probes have been measured for this model."
    best = max(r["probe_acc"] for r in rows)
    first = next(r for r in rows if r["probe_acc"] >= best - 0.01)
    heads = [r for r in rows if r.get("head_acc") is not None]
    text = (f"A linear probe reads the class at {rows[0]['probe_acc']:.0%} from {rows[0]['name']}'s pooled output "
            f"and within a point of its best ({best:.0%}) from {first['name']} on.")
    if heads:
        usable = next((r for r in heads if r["head_acc"] >= r["probe_acc"] - 0.01), None)
        text += (f" The network's own head, which fits only blocks {heads[0]['name']}–{heads[-1]['name']}, "
                 + (f"reads it as well as the probe from {usable['name']} on." if usable is not None else
                    "reads it worse than the probe at every block it fits."))
    return text


def probe_chart(
    study: dict,
    *,
    readings: Sequence[ProbeReading] | None = None,
    title: str = "Where the class becomes linearly readable",
    width: int | None = None,
    height: int = 300,
) -> Image.Image:
    """Bars per block: the probe's test accuracy (stage colour) and the head's on the same block (grey,
    "n/a" where the block is not as wide as the head); a dashed line at chance. With ``readings``, black
    dots: the probability each block's probe gives this image's predicted class.

    Raises:
        ValueError: ``study`` has no blocks.
    """
    from PIL import ImageDraw

    rows = study.get("blocks") or []
    if not rows:
        raise ValueError("the probe study has no blocks to draw")
    n, k = len(rows), 2  # k: supersampling
    width = width or max(640, 64 * n + 130)
    W, H = width * k, height * k
    x0, x1, y0, y1 = 56 * k, W - 24 * k, 50 * k, H - 44 * k
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    frame = (x0, x1, y0, y1, (x1 - x0) / n)
    classes = study.get("num_classes")
    _axes(img, d, frame, k, chance=1 / classes if classes else None)
    for i, r in enumerate(rows):
        _bars(img, d, frame, k, i, r)
    if readings:
        _image_dots(d, frame, k, [next((g.p_final for g in readings if g.name == r["name"]), None) for r in rows])
    d.rectangle([x0, y0, x1, y1], outline="#888888", width=k)
    draw_text(img, (x0, y0 - 28 * k), title, "#111111", 12 * k, "ls")
    legend = "test accuracy of a linear probe (colour) and of the network's head (grey) · - - chance"
    draw_text(img, (x0, y0 - 10 * k), legend, "#444444", 11 * k, "ls")
    if readings:
        draw_text(img, (x1, y0 - 28 * k), "●— this image: probe's p(predicted class)", "#444444", 11 * k, "rs")
    return img.reduce(k)


def _y(frame: tuple, v: float) -> float:
    _, _, y0, y1, _ = frame
    return y1 - max(0.0, min(1.0, v)) * (y1 - y0)


def _axes(img: Image.Image, d, frame: tuple, k: int, *, chance: float | None) -> None:
    """Accuracy grid lines every 20%, and the chance level dashed (when the number of classes is known)."""
    x0, x1, _, _, _ = frame
    for tick in range(0, 101, 20):
        y = _y(frame, tick / 100)
        d.line([(x0, y), (x1, y)], fill="#e6e6e6", width=k)
        draw_text(img, (x0 - 6 * k, y), f"{tick}%", "#333333", 11 * k, "rm")
    if chance is None:
        return
    y, step = _y(frame, chance), 8 * k
    for x in range(int(x0), int(x1), 2 * step):
        d.line([(x, y), (min(x + step, x1), y)], fill="#777777", width=k)


def _bars(img: Image.Image, d, frame: tuple, k: int, i: int, row: dict) -> None:
    """Block ``i``'s probe bar, the head's bar (or "n/a"), their values in percent, and the block's name."""
    x0, _, _, y1, slot = frame
    cx = x0 + slot * (i + 0.5)
    small = (10 if slot > 52 * k else 8) * k
    colour = STAGE_COLOURS[(int(row.get("stage", 1)) - 1) % len(STAGE_COLOURS)]
    probe, head = row["probe_acc"], row.get("head_acc")
    left, right = (cx - slot * 0.36, cx - slot * 0.02), (cx + slot * 0.02, cx + slot * 0.36)
    _bar(img, d, frame, k, left, probe, colour, small)
    if head is None:
        draw_text(img, ((right[0] + right[1]) / 2, y1 - 3 * k), "n/a", "#777777", small, "mb")
    else:
        _bar(img, d, frame, k, right, head, HEAD_COLOUR, small)
    draw_text(img, (cx, y1 + 8 * k), row["name"], "#222222", small + k, "mt")


def _bar(img: Image.Image, d, frame: tuple, k: int, span: tuple[float, float], value: float, colour: str,
         size: int) -> None:
    """One bar from the floor to ``value``, its value in percent written inside its top (above a short bar)."""
    top, mid = _y(frame, value), (span[0] + span[1]) / 2
    d.rectangle([span[0], top, span[1], frame[3]], fill=colour)
    inside = frame[3] - top > 3 * size
    draw_text(img, (mid, top + 3 * k if inside else top - 2 * k), f"{value * 100:.0f}",
              "white" if inside else "#222222", size, "mt" if inside else "mb")


def _image_dots(d, frame: tuple, k: int, probs: list[float | None]) -> None:
    """This image's probe probability of its predicted class per block: dots joined where consecutive."""
    x0, _, _, _, slot = frame
    points = [None if p is None else (x0 + slot * (i + 0.5), _y(frame, p)) for i, p in enumerate(probs)]
    for a, b in zip(points, points[1:]):
        if a is not None and b is not None:
            d.line([a, b], fill=IMAGE_COLOUR, width=2 * k)
    for p in points:
        if p is not None:
            d.ellipse([p[0] - 3 * k, p[1] - 3 * k, p[0] + 3 * k, p[1] + 3 * k], fill=IMAGE_COLOUR)
