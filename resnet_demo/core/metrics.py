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

    Computed in float64 so they can be checked against a hand computation to ~1e-12. Each tensor is
    converted once (an identity shortcut's s is x's copy, so it is converted once for both) and each
    block's scalars leave torch in one ``tolist``: the metrics cost ~2 ms a page, not ~5.
    """
    per_block = []
    for rec in records:
        f = rec.f.flatten(1).double()  # (B, C*H*W)
        x = rec.x.flatten(1).double()
        s = x if rec.s is rec.x else rec.s.flatten(1).double()
        nf, ns = torch.linalg.vector_norm(f, dim=1), torch.linalg.vector_norm(s, dim=1)
        nx = ns if s is x else torch.linalg.vector_norm(x, dim=1)
        dot = torch.linalg.vecdot(f, s)
        cosine = torch.where((nf > 0) & (ns > 0), dot / (nf * ns).clamp_min(1e-300), torch.zeros_like(dot))
        y = rec.y.flatten(1)
        ny = torch.linalg.vector_norm(y, dim=1, dtype=torch.float64)
        active = (y > 0).sum(dim=1, dtype=torch.float64) / y.shape[1]
        # columns in METRIC_NAMES order: ratio, cosine, norm_x, norm_f, norm_y, active
        scalars = torch.stack([_safe_div(nf, ns, 0.0), cosine, nx, nf, ny, active], dim=1).tolist()
        channel_f = f.view(*rec.f.shape[:2], -1).abs().mean(dim=2).float().cpu().numpy()  # (B, C)
        per_block.append((scalars, channel_f))
    batch = records[0].y.shape[0] if records else 0
    return [
        [
            BlockMetrics(rec.name, rec.stage, *scalars[i], channel_f=channel_f[i])
            for rec, (scalars, channel_f) in zip(records, per_block)
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
