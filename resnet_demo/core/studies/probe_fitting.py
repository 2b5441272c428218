"""Linear probes fitted over a data set: every block's pooled output, and one logistic regression per block.

The probes themselves, their file and their reading of one image are :mod:`resnet_demo.core.probes`.
The fit (:func:`fit_probe`) is deterministic: zero start, full-batch L-BFGS with a strong-Wolfe line
search in float64 on one thread, on ``mean cross-entropy + l2 / 2 * ||W||²`` (the bias is not penalised).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import capture_forward
from ..insight import head_of, head_width
from ..probes import Probe
from .distributed import Dist

__all__ = ["BlockFeatures", "block_features", "fit_probe"]

STD_FLOOR = 1e-6  # a channel that never changes (a dead ReLU) is divided by 1, not by ~0
DEFAULT_BATCH = 100
MAX_ITER = 300  # L-BFGS iterations per fit; standardised features with a little L2 converge in far fewer


# --- features over a data set -------------------------------------------------------------------


@dataclass
class BlockFeatures:
    """Per block, the global average pool of ``y`` (N, C); the head applied to ``y`` where widths allow
    (N, classes); and the network's logits (N, classes). All float32 on the CPU, in block order."""

    pooled: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None


@torch.inference_mode()
def block_features(
    model: nn.Module,
    images: torch.Tensor,
    *,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dist: Dist | None = None,
    batch_size: int = DEFAULT_BATCH,
    with_head: bool = False,
) -> BlockFeatures:
    """Pooled block outputs (and, with ``with_head``, the head's readout of every block as wide as the
    head) of ``images``, in data order.

    Args:
        model: in eval mode, on its device (it is not modified).
        images: (N, C, H, W) uint8 images, turned into model input by ``normalise``; or float images,
            taken as model input already.
        dist: the data-parallel job (:class:`~resnet_demo.core.studies.distributed.Dist`): each process runs its
            shard in whole batches of ``batch_size``, as one process would, and every process gets all
            the features. One process by default.

    Raises:
        ValueError: no images, or uint8 images without ``normalise``.
    """
    if len(images) == 0:
        raise ValueError("no images to compute block features from")
    if images.dtype == torch.uint8 and normalise is None:
        raise ValueError("uint8 images need a normalise function (uint8 batch -> model input)")
    dist = dist or Dist()
    device = next(model.parameters()).device
    head, width = (head_of(model), head_width(model)) if with_head else (None, 0)
    index = dist.shard(len(images), block=batch_size)
    pooled: dict[str, list[torch.Tensor]] = {}
    heads: dict[str, list[torch.Tensor]] = {}
    logits = []
    # A process whose shard is empty still runs one image (and keeps none of it), so that every process
    # knows every tensor's shape and gathers the same tensors in the same order.
    for idx in [index[s : s + batch_size] for s in range(0, len(index), batch_size)] or [None]:
        x, keep = (images[:1], 0) if idx is None else (images[idx], len(idx))
        # contiguous: a freshly decoded data set is channels-last in memory, its cached copy is not, and
        # the convolutions' last bits depend on the layout
        x = (normalise(x) if normalise is not None else x).to(device).contiguous()
        out, records = capture_forward(model, x)
        for r in records:
            pooled.setdefault(r.name, []).append(r.y[:keep].float().mean(dim=(2, 3)).cpu())  # (B, C, H, W) -> (B, C)
            if head is not None and r.y.shape[1] == width:
                heads.setdefault(r.name, []).append(head(r.y[:keep]).float().cpu())
        logits.append(out[:keep].float().cpu())
    return BlockFeatures(
        {k: dist.gather(torch.cat(v), index) for k, v in pooled.items()},
        {k: dist.gather(torch.cat(v), index) for k, v in heads.items()},
        dist.gather(torch.cat(logits), index),
    )


# --- fitting ----------------------------------------------------------------------------------------


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    return mean, torch.where(std > STD_FLOOR, std, torch.ones_like(std))


def fit_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, *, max_iter: int = MAX_ITER
) -> Probe:
    """Multinomial logistic regression on standardised ``features`` (N, C), by full-batch L-BFGS.

    Minimises ``mean cross-entropy + l2 / 2 * ||W||²`` from a zero start in float64, on one thread: the
    same data give the same probe, however many threads or processes computed the features.

    Raises:
        ValueError: no samples, labels out of range, a negative or non-finite ``l2``.
    """
    if features.ndim != 2 or len(features) == 0 or len(features) != len(labels):
        raise ValueError(f"need (N, C) features with one label each, got {tuple(features.shape)} and {len(labels)}")
    if not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    labels = labels.long().cpu()
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    threads = torch.get_num_threads()
    try:  # one thread: every sum in one order, whatever the machine
        torch.set_num_threads(1)
        return _fit(features, labels, num_classes, l2, max_iter)
    finally:
        torch.set_num_threads(threads)


def _fit(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, max_iter: int) -> Probe:
    mean, std = _standardise(features)
    z = (features.double().cpu() - mean) / std
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, labels) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(w.detach().float(), b.detach().float(), mean.float(), std.float())
