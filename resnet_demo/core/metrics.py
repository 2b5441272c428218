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


_CHUNK = 1 << 16  # values per image converted to float64 at a time: (3, 65,536) float64 = 1.5 MiB stays in cache


def _sums(rec: BlockRecord) -> torch.Tensor:
    """(B, 6) float64: ||F||², ||s||², <F, s>, ||x||², ||y||² and the count of y > 0, per image.

    F, s and y (one shape: y = relu(F + s)) go through one float64 product of their (B, 3, N) stack with
    itself: its Gram matrix holds the three squared norms and the dot product, in one op instead of six.
    The products are float64 (a float32 product rounds; two float32 factors multiply exactly in float64), taken
    over chunks of :data:`_CHUNK` values: converting a whole ImageNet-size block to float64 at once wrote and
    re-read ~30 MB per block, and cost a ResNet-50's analysis more than its forward pass; chunked, the float64
    copy stays in cache (3x less time, the same sums to ~1e-16).
    """
    identity = rec.s is rec.x
    f, s, y = rec.f.flatten(1), rec.s.flatten(1), rec.y.flatten(1)
    gram = torch.zeros(y.shape[0], 3, 3, dtype=torch.float64, device=y.device)
    for i in range(0, y.shape[1], _CHUNK):
        part = torch.stack((f[:, i : i + _CHUNK], s[:, i : i + _CHUNK], y[:, i : i + _CHUNK]), dim=1).double()
        gram += part @ part.transpose(1, 2)  # (B, 3, 3)
    if identity:
        nx2 = gram[:, 1, 1]
    else:
        x = rec.x.flatten(1)
        nx2 = sum(x[:, i : i + _CHUNK].double().square().sum(dim=1) for i in range(0, x.shape[1], _CHUNK))
    active = (y > 0).sum(dim=1, dtype=torch.float64)
    return torch.stack([gram[:, 0, 0], gram[:, 1, 1], gram[:, 0, 1], nx2, gram[:, 2, 2], active], dim=1)


def block_metrics(records: list[BlockRecord]) -> list[list[BlockMetrics]]:
    """Metrics for every image of the batch and every block: ``result[image][block]``.

    Computed in float64 so they can be checked against a hand computation to ~1e-12. Each block's sums
    take a handful of ops (:func:`_sums`); ratios and cosines are then computed for all blocks at once and
    leave torch in one ``tolist``: the metrics of a page cost ~1 ms, and far fewer small ops contend for
    the interpreter while a server runs other requests.
    """
    if not records:
        return []
    sums = torch.stack([_sums(rec) for rec in records])  # (blocks, B, 6)
    nf, ns, nx, ny = sums[..., [0, 1, 3, 4]].sqrt().unbind(-1)  # sums of squares: never negative
    dot = sums[..., 2]
    cosine = torch.where((nf > 0) & (ns > 0), dot / (nf * ns).clamp_min(1e-300), torch.zeros_like(dot))
    sizes = torch.tensor([rec.y[0].numel() for rec in records], dtype=torch.float64).unsqueeze(1)
    # columns in METRIC_NAMES order: ratio, cosine, norm_x, norm_f, norm_y, active
    scalars = torch.stack([_safe_div(nf, ns, 0.0), cosine, nx, nf, ny, sums[..., 5] / sizes], dim=2).tolist()
    channel_f = [rec.f.abs().mean(dim=(2, 3)).float().cpu().numpy() for rec in records]  # (B, C), for ranking
    batch = records[0].y.shape[0]
    return [
        [
            BlockMetrics(rec.name, rec.stage, *scalars[b][i], channel_f=channel_f[b][i])
            for b, rec in enumerate(records)
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
