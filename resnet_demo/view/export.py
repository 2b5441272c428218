"""The current analysis as a download: one ZIP holding ``analysis.json`` and the page's images as PNG.

``analysis.json`` (format 1) holds:

- ``tool``: name, package version, export format;
- ``model``: a reference to the model card (name, arch, data set, sha256 of the weights, classes,
  preprocessing, the card's test metrics);
- ``input``: kind (photo / drawing) and the shape the model saw;
- ``logits``, ``predictions`` (top-k: label, index, prob), ``lesioned`` (blocks lesioned in the analysis);
- ``blocks``: every block's metrics (``ratio``, ``cosine``, ``norm_x``, ``norm_f``, ``norm_y``,
  ``active``, ``channel_f`` as a list) and, when the card has reference bands, each metric's percentile
  rank among the reference images;
- ``lesion``, ``lesion_sweep``, ``readout``: the results of :mod:`resnet_demo.core.insight`, when given;
- ``images``: the PNG file names in the archive;
- ``inside``: ``"inside.json"`` when the archive holds the page's "Inside the block" view: that file is
  :meth:`~resnet_demo.core.inside.Inside.to_dict` with every step's map (``maps=True``), for the block and
  channel last opened on this image, and the view's picture is among the PNGs.

Numbers are written with Python's shortest round-trip repr, so reading them back gives the library's
values exactly. JSON has no infinity or NaN: such a value is written as the *string* ``"Infinity"``,
``"-Infinity"`` or ``"NaN"`` (the tokens Python's own json module would emit, quoted so that strict
parsers accept the file); :func:`decode_float` turns them back into floats.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["EXPORT_FORMAT", "analysis_dict", "decode_float", "export_zip", "jsonable"]

EXPORT_FORMAT = 1
TOOL_NAME = "residual-block-explorer"
_NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _float(v: float) -> float | str:
    if math.isfinite(v):
        return v
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def decode_float(v: Any) -> float:
    """A number read from ``analysis.json`` back to a float (``"Infinity"`` -> ``inf`` and so on)."""
    return _NON_FINITE[v] if isinstance(v, str) else float(v)


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors, arrays, numpy scalars, dataclasses and tuples turned into JSON types,
    and non-finite floats into the strings ``"Infinity"``, ``"-Infinity"``, ``"NaN"``."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _float(float(obj))
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


def _version() -> str | None:
    import importlib

    return getattr(importlib.import_module(__package__.partition(".")[0]), "__version__", None)


def _model_ref(card) -> dict:
    return {
        "name": card.name,
        "arch": card.arch,
        "dataset": card.dataset,
        "weights_sha256": card.weights_sha256,
        "trained": card.trained,
        "classes": list(card.classes),
        "input_size": card.input_size,
        "colour_mode": card.colour_mode,
        "input_kind": card.input_kind,
        "mean": list(card.mean),
        "std": list(card.std),
        "metrics": card.metrics,
        "has_reference_bands": bool(card.reference_bands),
    }


def _block_dict(m, bands: dict | None) -> dict:
    d = m.row()
    d["channel_f"] = np.asarray(m.channel_f).tolist()
    if bands:
        from ..core.studies.bands import BAND_METRICS, percentile_rank

        ranks = {}
        for metric in BAND_METRICS:
            band = bands.get(metric, {}).get(m.name)
            value = getattr(m, metric)
            if band is not None and math.isfinite(value):
                ranks[metric] = percentile_rank(value, band)
        d["reference_rank"] = ranks
    return d


def analysis_dict(analysis, *, lesion=None, sweep=None, readout=None, images: list[str] | None = None) -> dict:
    """The content of ``analysis.json`` for an :class:`~resnet_demo.core.explorer.Analysis` (JSON types only)."""
    card = analysis.card
    bands = card.reference_bands or None
    d: dict[str, Any] = {
        "tool": {"name": TOOL_NAME, "version": _version(), "format": EXPORT_FORMAT},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": _model_ref(card),
        "input": {"kind": analysis.kind, "shape": list(analysis.input.shape)},
        "lesioned": list(analysis.lesioned),
        "logits": analysis.logits.float().tolist(),
        "predictions": [{"label": p.label, "index": p.index, "prob": p.prob} for p in analysis.predictions],
        "blocks": [_block_dict(m, bands) for m in analysis.metrics],
    }
    if lesion is not None:
        d["lesion"] = lesion.to_dict()
    if sweep is not None:
        d["lesion_sweep"] = [r.to_dict() for r in sweep]
    if readout is not None:
        d["readout"] = readout.to_dict()
    if images is not None:
        d["images"] = list(images)
    return jsonable(d)


def _png_names(names) -> list[str]:
    out, seen = [], set()
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "image"
        stem = stem[:-4] if stem.lower().endswith(".png") else stem
        candidate, i = f"{stem}.png", 2
        while candidate in seen or candidate == "analysis.json":
            candidate, i = f"{stem}_{i}.png", i + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    if hasattr(image, "savefig"):  # a matplotlib Figure
        from .render import figure_to_image

        return figure_to_image(image)
    raise TypeError(f"cannot save a {type(image).__name__} as PNG; give a PIL image, an array or a Figure")


def export_zip(
    analysis,
    *,
    images: Mapping[str, Any] | None = None,
    lesion=None,
    sweep=None,
    readout=None,
    inside=None,
    path: str | Path | None = None,
) -> bytes | Path:
    """Pack an analysis into a ZIP: ``analysis.json`` plus one PNG per entry of ``images``.

    Args:
        analysis: an :class:`~resnet_demo.core.explorer.Analysis`.
        images: display name -> PIL image (or uint8 array, or matplotlib Figure); file names are the
            names made safe, with ``.png``.
        lesion: a :class:`~resnet_demo.core.insight.LesionResult`.
        sweep: the list from :func:`~resnet_demo.core.insight.lesion_sweep`.
        readout: a :class:`~resnet_demo.core.insight.Readout`.
        inside: an :class:`~resnet_demo.core.inside.Inside`, written as ``inside.json`` with its maps.
        path: where to write the ZIP; without it the ZIP's bytes are returned.

    Returns:
        ``path`` (as a Path) when given, else the ZIP as bytes.
    """
    images = dict(images or {})
    names = _png_names(images)
    doc = analysis_dict(analysis, lesion=lesion, sweep=sweep, readout=readout, images=names)
    if inside is not None:
        doc["inside"] = "inside.json"
    text = json.dumps(doc, indent=2, allow_nan=False)
    stamp = time.localtime()[:6]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("analysis.json", stamp), text, compress_type=zipfile.ZIP_DEFLATED)
        if inside is not None:
            zf.writestr(zipfile.ZipInfo("inside.json", stamp),
                        json.dumps(jsonable(inside.to_dict(maps=True)), indent=1, allow_nan=False),
                        compress_type=zipfile.ZIP_DEFLATED)
        for name, image in zip(names, images.values()):
            png = io.BytesIO()
            _to_pil(image).save(png, format="PNG")
            zf.writestr(zipfile.ZipInfo(name, stamp), png.getvalue(), compress_type=zipfile.ZIP_STORED)
    data = buf.getvalue()
    if path is None:
        return data
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
