"""Per-block residual metrics and top-k predictions.

For one image and block, with F = F(x) the branch and s = s(x) the shortcut (both flattened):

- ``ratio``  = ||F|| / ||s||      how much the block changes its input (Jastrzebski et al. 2018)
- ``cosine`` = <F, s> / (||F|| ||s||)  whether the branch pushes along the input or against it
- ``norm_x``, ``norm_f``, ``norm_y``   L2 norms of the input, the branch and the output
- ``active`` share of output units with y > 0
- ``channel_f`` mean |F| per channel, to rank channels by how much the branch writes into them
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .capture import BlockRecord

__all__ = ["BlockMetrics", "Prediction", "block_metrics", "topk"]

METRIC_NAMES = ("ratio", "cosine", "norm_x", "norm_f", "norm_y", "active")


@dataclass
class BlockMetrics:
    name: str
    stage: int
    ratio: float
    cosine: float
    norm_x: float
    norm_f: float
    norm_y: float
    active: float
    channel_f: np.ndarray  # (C,) mean |F(x)| per channel

    def row(self) -> dict:
        """The scalar metrics as a flat dict (for tables and JSON)."""
        d = asdict(self)
        d.pop("channel_f")
        return d


@dataclass
class Prediction:
    label: str
    index: int
    prob: float


def _safe_div(a: torch.Tensor, b: torch.Tensor, zero_over_zero: float) -> torch.Tensor:
    # A dead input (all-zero s) makes the ratio undefined: report 0 when F is also zero, else inf.
    out = a / b
    out = torch.where((b == 0) & (a == 0), torch.full_like(out, zero_over_zero), out)
    return torch.where((b == 0) & (a != 0), torch.full_like(out, float("inf")), out)


def block_metrics(records: list[BlockRecord]) -> list[list[BlockMetrics]]:
    """Metrics for every image of the batch and every block: ``result[image][block]``.

    Computed in float64 so they can be checked against a hand computation to ~1e-12.
    """
    per_block = []
    for rec in records:
        f = rec.f.flatten(1).double()  # (B, C*H*W)
        s = rec.s.flatten(1).double()
        nf, ns = f.norm(dim=1), s.norm(dim=1)
        dot = (f * s).sum(dim=1)
        cosine = torch.where((nf > 0) & (ns > 0), dot / (nf * ns).clamp_min(1e-300), torch.zeros_like(dot))
        per_block.append(
            dict(
                ratio=_safe_div(nf, ns, 0.0),
                cosine=cosine,
                norm_x=rec.x.flatten(1).double().norm(dim=1),
                norm_f=nf,
                norm_y=rec.y.flatten(1).double().norm(dim=1),
                active=(rec.y.flatten(1) > 0).double().mean(dim=1),
                channel_f=rec.f.double().abs().mean(dim=(2, 3)),  # (B, C)
            )
        )
    batch = records[0].y.shape[0] if records else 0
    return [
        [
            BlockMetrics(
                rec.name,
                rec.stage,
                **{k: float(m[k][i]) for k in METRIC_NAMES},
                channel_f=m["channel_f"][i].float().cpu().numpy(),
            )
            for rec, m in zip(records, per_block)
        ]
        for i in range(batch)
    ]


def topk(logits: torch.Tensor, classes: list[str], k: int = 5) -> list[Prediction]:
    """Top-``k`` classes of one image's logits (shape (classes,) or (1, classes)) with softmax probabilities."""
    logits = logits.detach().float().reshape(-1)
    if logits.numel() != len(classes):
        raise ValueError(f"{logits.numel()} logits but {len(classes)} class names")
    probs = torch.softmax(logits, dim=0)
    k = max(1, min(int(k), len(classes)))
    values, indices = probs.topk(k)
    return [Prediction(classes[i], int(i), float(p)) for p, i in zip(values.tolist(), indices.tolist())]
