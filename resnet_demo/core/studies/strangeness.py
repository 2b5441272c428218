"""Is this image like the training data? A score from what the explorer already computes.

Each block's ``ratio`` and ``cosine`` (:mod:`resnet_demo.core.metrics`) are placed in the card's
reference bands (:mod:`resnet_demo.core.studies.bands`: their 5th, 50th and 95th percentiles over test images)
as a robust z-score, ``z = (v - p50) / s`` with ``s = (p95 - p50) / 1.645`` above the median and
``(p50 - p5) / 1.645`` below it, so that the band's ends sit at ±1.645 as a normal distribution's would.
The score is the root mean square of the z's over every block and both metrics (``band_rms``): about 1
for a typical image, large when several blocks do what they never do on test images.

:func:`candidate_scores` also gives the alternatives it was chosen against: the mean excess beyond
the 5–95 bands in band widths, the largest |z|, the number of blocks outside a band, one minus the
largest softmax probability, and the energy ``-logsumexp(logits)`` (Liu et al. 2020).
``python -m resnet_demo.training.strange`` measures them all as AUROC (:func:`auroc`) between held-out
test images and other data, and stores the figures and the page's threshold in the card's
``studies["strangeness"]``; :func:`strangeness` reads both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..metrics import BlockMetrics
from ..weights.cards import ModelCard
from .bands import BAND_METRICS

__all__ = ["SCORE", "SCORES", "Strangeness", "auroc", "band_z", "candidate_scores", "strangeness", "trained_on"]

SCORE = "band_rms"  # the score the page uses; see candidate_scores for the others
SCORES = ("band_rms", "band_excess", "band_max", "outside", "msp", "energy")
Z_AT_BAND_END = 1.645  # the 95th percentile of a standard normal: p5 and p95 become z = -1.645 and +1.645
Z_CAP = 1e3  # a metric that is not finite (an all-zero shortcut) counts as this far out; keeps scores finite


@dataclass
class Strangeness:
    """How unlike the training data one image is, and what the page says about it.

    ``outside``: blocks whose ratio or cosine lies outside its 5–95 band; ``strange``: the score is above
    the threshold measured for this model (never without one).
    """

    score: float
    outside: int
    blocks: int
    threshold: float | None
    strange: bool
    message: str
    outside_blocks: list[str] = field(default_factory=list)
    confidence: float = float("nan")  # the largest softmax probability

    def to_dict(self) -> dict:
        return {"score": self.score, "outside": self.outside, "blocks": self.blocks, "threshold": self.threshold,
                "strange": self.strange, "message": self.message, "outside_blocks": list(self.outside_blocks),
                "confidence": self.confidence}


def band_z(value: float, band: dict[str, float]) -> float:
    """``value``'s robust z-score in ``band`` (p5, p50, p95), capped at ±:data:`Z_CAP`; not finite -> +cap."""
    if not math.isfinite(value):
        return Z_CAP
    centre = band["p50"]
    spread = (band["p95"] - centre) if value >= centre else (centre - band["p5"])
    z = (value - centre) / max(spread / Z_AT_BAND_END, 1e-12)
    return max(-Z_CAP, min(Z_CAP, z))


def _outside(value: float, band: dict[str, float]) -> bool:
    return not math.isfinite(value) or value < band["p5"] or value > band["p95"]


def _band_parts(metrics: Sequence[BlockMetrics], bands: dict) -> tuple[list[float], list[float], list[str]]:
    """z-scores and excesses beyond the band (in band widths) of every banded (block, metric), and the
    names of the blocks outside a band."""
    zs, excess, outside = [], [], []
    for m in metrics:
        out = False
        for metric in BAND_METRICS:
            band = bands.get(metric, {}).get(m.name)
            if band is None:
                continue
            v = getattr(m, metric)
            zs.append(band_z(v, band))
            width = max(band["p95"] - band["p5"], 1e-12)
            over = Z_CAP if not math.isfinite(v) else max(0.0, v - band["p95"], band["p5"] - v) / width
            excess.append(min(over, Z_CAP))
            out = out or _outside(v, band)
        if out:
            outside.append(m.name)
    return zs, excess, outside


def candidate_scores(metrics: Sequence[BlockMetrics], logits: torch.Tensor, bands: dict) -> dict[str, float]:
    """Every score of :data:`SCORES` for one image (higher = stranger).

    Raises:
        ValueError: ``bands`` covers none of the image's blocks.
    """
    zs, excess, outside = _band_parts(metrics, bands)
    if not zs:
        raise ValueError("the reference bands cover none of this model's blocks")
    logits = logits.detach().double().reshape(-1).cpu()
    return {
        "band_rms": float(np.sqrt(np.mean(np.square(zs)))),
        "band_excess": float(np.mean(excess)),
        "band_max": float(np.max(np.abs(zs))),
        "outside": float(len(outside)),
        "msp": float(1 - torch.softmax(logits, dim=0).max()),
        "energy": float(-torch.logsumexp(logits, dim=0)),
    }


def trained_on(card: ModelCard) -> str:
    """What the model was trained on, in words: "32×32 photos of 10 classes (CIFAR-10)"."""
    kind = {"photo": "photos", "drawing": "drawings"}.get(card.input_kind, f"{card.input_kind} images")
    dataset = card.dataset.split(" (")[0].strip()
    text = f"{card.input_size}×{card.input_size} {kind} of {len(card.classes)} classes"
    return f"{text} ({dataset})" if dataset else text


def strangeness(
    metrics: Sequence[BlockMetrics], logits: torch.Tensor, card: ModelCard, *, threshold: float | None = None
) -> Strangeness | None:
    """Score one analysed image against the card's reference bands; ``None`` when the card has none.

    Args:
        metrics: the image's block metrics (an analysis's ``metrics``).
        logits: its logits.
        card: the model's card: ``reference_bands``, and the threshold in ``studies["strangeness"]``.
        threshold: overrides the card's threshold.
    """
    bands = card.reference_bands or {}
    if not any(bands.get(m, {}).get(b.name) for m in BAND_METRICS for b in metrics):
        return None
    scores = candidate_scores(metrics, logits, bands)
    _, _, outside = _band_parts(metrics, bands)
    if threshold is None:
        threshold = (card.studies or {}).get("strangeness", {}).get("threshold")
    score = scores[SCORE]
    strange = threshold is not None and score > float(threshold)
    n, k = len(metrics), len(outside)
    counted = f"{k} of {n} blocks outside {'its' if k == 1 else 'their'} usual range"
    if strange:
        message = f"This image is unlike the training data: {counted}; this model was trained on {trained_on(card)}."
    elif threshold is None:
        message = f"{counted.capitalize()} (no warning threshold has been measured for this model)."
    else:
        message = f"{counted.capitalize()}, as on many test images: nothing unusual."
    return Strangeness(score, k, n, None if threshold is None else float(threshold), strange, message, outside,
                       1.0 - scores["msp"])


def auroc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """Area under the ROC curve of a score that should be higher for ``positives``: the probability that
    a random positive scores above a random negative, ties counted half (the Mann-Whitney U statistic
    over ``len(positives) * len(negatives)``). Computed from average ranks, so ties cost no extra pass.

    Raises:
        ValueError: an empty group, or a NaN score.
    """
    neg = np.asarray(negatives, dtype=np.float64).reshape(-1)
    pos = np.asarray(positives, dtype=np.float64).reshape(-1)
    if neg.size == 0 or pos.size == 0:
        raise ValueError(f"AUROC needs scores in both groups, got {neg.size} negatives and {pos.size} positives")
    if np.isnan(neg).any() or np.isnan(pos).any():
        raise ValueError("AUROC of scores that include NaN is undefined")
    both = np.concatenate([neg, pos])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    # 1-based rank of each distinct value's first copy, then the mean rank of its copies
    first = np.concatenate([[1], 1 + np.cumsum(counts)[:-1]])
    mean_rank = first + (counts - 1) / 2
    u = mean_rank[inverse[neg.size :]].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))
