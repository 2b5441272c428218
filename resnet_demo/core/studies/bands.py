"""Reference bands: what each block usually does, so one image's metrics can be judged against a data set.

For every block, the 5th, 25th, 50th, 75th and 95th percentiles of ``ratio`` and ``cosine`` (see
:mod:`resnet_demo.core.metrics`) over a data set, usually the model's test split. They are stored in the
model card's ``reference_bands`` field, which :func:`resnet_demo.view.render.residual_chart` draws::

    {"ratio":  {"res1": {"p5": ..., "p25": ..., "p50": ..., "p75": ..., "p95": ...}, ...},
     "cosine": {...},
     "percentiles": [5, 25, 50, 75, 95], "n": 10000, "data": "cifar10-jpeg.tar.gz", "split": "test"}

Computed by the command in :mod:`resnet_demo.training.bands`::

    python -m resnet_demo.training.bands --weights weights/cifar10_resnet.safetensors \\
        --data ../shared/datasets/cifar10-jpeg.tar.gz [--split test] [--limit N]

which rewrites only the card (``weights/<name>.json``); the weights file, and so its sha256, is untouched.
Percentiles are numpy's default (linear interpolation between order statistics). Images where a metric
is not finite (an all-zero shortcut makes ``ratio`` infinite) are left out of that block's band.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from ..capture import BlockRecord, capture_forward, find_blocks
from ..metrics import BlockMetrics, block_metrics
from .budget import budgeted, footprint
from .distributed import Dist

__all__ = [
    "BAND_METRICS",
    "PERCENTILES",
    "band_values",
    "bands_from_values",
    "compute_bands",
    "describe",
    "percentile_rank",
    "where",
]

PERCENTILES = (5, 25, 50, 75, 95)
BAND_METRICS = ("ratio", "cosine")
DEFAULT_BATCH = 64  # images per forward pass, fewer when the server's study budget asks for it
BRANCH_METRICS = ("ratio", "cosine")  # computed from F(x) and s(x) alone: the capture keeps nothing else

# How to say "higher" and "lower" for each metric.
_WORDING = {
    "ratio": ("works harder on this image", "works less on this image"),
    "cosine": ("is more aligned with its input on this image", "is less aligned with its input on this image"),
}


def bands_from_values(
    values: dict[str, dict[str, Sequence[float]]], percentiles: Sequence[float] = PERCENTILES
) -> dict[str, dict[str, dict[str, float]]]:
    """``values[metric][block]`` (one number per image) -> ``bands[metric][block]["p<q>"]``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for metric, per_block in values.items():
        out[metric] = {}
        for name, vals in per_block.items():
            arr = np.asarray(vals, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            if arr.size == 0:
                continue
            qs = np.percentile(arr, list(percentiles))
            out[metric][name] = {f"p{q:g}": float(v) for q, v in zip(percentiles, qs)}
    return out


def _branch_metrics(records: list[BlockRecord]) -> dict[str, torch.Tensor]:
    """``ratio`` and ``cosine`` of every image and block, (B, blocks) float64, from F(x) and s(x) only; the
    same arithmetic as :func:`~resnet_demo.core.metrics.block_metrics` (float64 norms and dot product)."""
    ratio, cosine = [], []
    for rec in records:
        stacked = torch.stack((rec.f.flatten(1), rec.s.flatten(1)), dim=1).double()  # (B, 2, N)
        g = stacked @ stacked.transpose(1, 2)
        nf, ns, dot = g[:, 0, 0].sqrt(), g[:, 1, 1].sqrt(), g[:, 0, 1]
        r = nf / ns
        r = torch.where((ns == 0) & (nf == 0), torch.zeros_like(r), r)  # a dead input: 0 when F is 0 too, else inf
        ratio.append(torch.where((ns == 0) & (nf != 0), torch.full_like(r, float("inf")), r))
        cosine.append(torch.where((nf > 0) & (ns > 0), dot / (nf * ns).clamp_min(1e-300), torch.zeros_like(dot)))
    return {"ratio": torch.stack(ratio, dim=1), "cosine": torch.stack(cosine, dim=1)}


def _batch_values(
    model: nn.Module, x: torch.Tensor, metrics: Sequence[str]
) -> tuple[list[str], list[list[list[float]]]]:
    """Block names reached, and ``values[image][metric][block]`` for one prepared batch. Ratio and cosine
    need only F(x) and s(x), so for them the capture keeps nothing else."""
    if set(metrics) <= set(BRANCH_METRICS):
        _, records = capture_forward(model, x, keep=("f", "s"))
        table = _branch_metrics(records)
        values = torch.stack([table[m] for m in metrics], dim=1).tolist()  # (B, metrics, blocks)
        return [r.name for r in records], values
    _, records = capture_forward(model, x)
    per_image = block_metrics(records)
    return [r.name for r in records], [[[getattr(m, metric) for m in image] for metric in metrics]
                                       for image in per_image]


def _planned(model: nn.Module, sample: torch.Tensor, batch_size: int, metrics: Sequence[str]):
    """The server's budget for a bands study: the batch size that fits, held while it runs."""
    kept = ("f", "s") if set(metrics) <= set(BRANCH_METRICS) else ("x", "f", "s", "y")
    return budgeted(footprint(model, sample, kept=kept), batch_size, what="Reference bands")


def _batches(data: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch_size):
            yield data[i : i + batch_size]
    else:
        yield from data


@torch.inference_mode()
def compute_bands(
    model: nn.Module,
    data: torch.Tensor | Iterable[torch.Tensor],
    *,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = DEFAULT_BATCH,
    percentiles: Sequence[float] = PERCENTILES,
    metrics: Sequence[str] = BAND_METRICS,
) -> dict:
    """Per-block percentiles of ``metrics`` over a data set.

    Args:
        model: the model, in eval mode (it is not modified).
        data: images (N, C, H, W), or an iterable of such batches. uint8 images go through
            ``normalise`` first (e.g. :class:`resnet_demo.data.Normalise` built from the model card);
            float images are taken as already normalised.
        normalise: uint8 batch -> model input.
        batch_size: images per forward pass when ``data`` is one tensor (at most; fewer when the server's
            study budget asks for it, :mod:`~.budget`).

    Returns:
        ``{metric: {block: {"p5": ..., ...}}, "percentiles": [...], "n": number of images}``.

    Raises:
        StudyTooLarge: not even one image fits the server's study budget.
    """
    device = next(model.parameters()).device
    values: dict[str, dict[str, list[float]]] = {m: {} for m in metrics}
    n = 0

    def prepared(batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype == torch.uint8:
            if normalise is None:
                raise ValueError("uint8 images need a normalise function (uint8 batch -> model input)")
            batch = normalise(batch)
        return batch.to(device)

    if isinstance(data, torch.Tensor) and len(data):
        with _planned(model, prepared(data[:1]), min(batch_size, len(data)), metrics) as size:
            for batch in _batches(data, size):
                n += _add(values, *_batch_values(model, prepared(batch), metrics), metrics)
    else:
        for batch in _batches(data, batch_size):
            n += _add(values, *_batch_values(model, prepared(batch), metrics), metrics)
    if n == 0:
        raise ValueError("no images to compute reference bands from")
    bands: dict = bands_from_values(values, percentiles)
    bands["percentiles"] = [float(q) if q != int(q) else int(q) for q in percentiles]
    bands["n"] = n
    return bands


def _add(values: dict[str, dict[str, list[float]]], names: list[str], batch: list[list[list[float]]],
         metrics: Sequence[str]) -> int:
    for image in batch:
        for metric, per_block in zip(metrics, image):
            for name, v in zip(names, per_block):
                values[metric].setdefault(name, []).append(v)
    return len(batch)


def band_values(
    model: nn.Module,
    images: torch.Tensor,
    *,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    dist: Dist | None = None,
    batch_size: int = DEFAULT_BATCH,
    metrics: Sequence[str] = BAND_METRICS,
) -> dict[str, dict[str, list[float]]]:
    """``values[metric][block]``: one number per image of ``images`` (uint8), in data order, whichever
    process computed it. Each process runs its shard in whole batches of ``batch_size`` and every process
    gets all the values (``all_gather``). ``batch_size`` is at most what a pass takes: fewer images when the
    server's study budget asks for it (the same in every process: the estimate depends only on the model).

    Raises:
        StudyTooLarge: not even one image fits the server's study budget.
    """
    dist = dist or Dist()
    names = [b.name for b in find_blocks(model)]
    with _planned(model, normalise(images[:1]), min(batch_size, len(images)), metrics) as batch_size:
        index = dist.shard(len(images), block=batch_size)
        rows = []
        for start in range(0, len(index), batch_size):
            reached, per_image = _batch_values(model, normalise(images[index[start : start + batch_size]]), metrics)
            if reached != names:
                raise ValueError(f"a forward pass reached only the blocks {reached} of {names}")
            rows.extend([v for per_metric in image for v in per_metric] for image in per_image)
    local = torch.tensor(rows, dtype=torch.float64).reshape(len(index), len(metrics) * len(names))
    table = dist.gather(local, index)  # (N, metrics x blocks), in data order
    return {metric: {name: table[:, i * len(names) + j].tolist() for j, name in enumerate(names)}
            for i, metric in enumerate(metrics)}


def percentile_rank(value: float, band: dict[str, float]) -> float:
    """Where ``value`` falls among the data set, in percent, by linear interpolation between the stored
    percentiles; clamped to the outermost ones (a value above ``p95`` ranks 95)."""
    table = _rank_table(tuple((k, float(v)) for k, v in band.items() if k.startswith("p")))
    if table is None:
        raise ValueError(f"band {band} holds no percentiles")
    unique, mid, lowest, highest = table
    if value > unique[-1]:
        return highest
    if value < unique[0]:
        return lowest
    if len(unique) == 1:
        return float(mid[0])
    return float(np.interp(value, unique, mid))


@lru_cache(maxsize=256)
def _rank_table(percentiles: tuple[tuple[str, float], ...]):
    """A band's distinct levels, the rank of each, and its outermost ranks; cached, since a page ranks
    ~20 values against the same few bands."""
    qs = sorted((float(k[1:]), v) for k, v in percentiles)
    if not qs:
        return None
    ranks = np.array([q for q, _ in qs])
    levels = np.maximum.accumulate(np.array([v for _, v in qs]))
    # Tied percentiles (a metric that is constant over part of the data) share their middle rank.
    unique = np.unique(levels)
    mid = np.array([ranks[levels == u].mean() for u in unique])
    return unique, mid, float(ranks[0]), float(ranks[-1])


def where(
    value: float,
    band: dict[str, float],
    *,
    block: str = "this block",
    metric: str = "ratio",
    population: str = "test images",
) -> str:
    """A sentence placing ``value`` in ``band``, e.g. "res7 works harder on this image than on 95% of test images".

    Between the 25th and 75th percentile the block is called typical.
    """
    if not np.isfinite(value):
        return f"{block}: {metric} is not finite on this image"
    more, less = _WORDING.get(metric, (f"has a higher {metric} on this image", f"has a lower {metric} on this image"))
    rank = percentile_rank(value, band)
    if 25 <= rank <= 75:
        return f"{block} is typical on this image (between the 25th and 75th percentile of {population})"
    if rank > 75:
        return f"{block} {more} than on {rank:.0f}% of {population}"
    return f"{block} {less} than on {100 - rank:.0f}% of {population}"


def describe(
    metrics: Sequence[BlockMetrics],
    bands: dict | None,
    *,
    metric: str = "ratio",
    outside: float = 25.0,
    population: str = "test images",
) -> list[str]:
    """Sentences for the blocks whose ``metric`` lies at or beyond the ``outside``-th percentile from the
    middle (by default outside the 25-75 band); ``[]`` without bands."""
    if not bands or metric not in bands:
        return []
    out = []
    for m in metrics:
        band = bands[metric].get(m.name)
        value = getattr(m, metric)
        if band is None or not np.isfinite(value):
            continue
        rank = percentile_rank(value, band)
        if rank <= outside or rank >= 100 - outside:
            out.append(where(value, band, block=m.name, metric=metric, population=population))
    return out
