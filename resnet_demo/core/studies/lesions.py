"""Which blocks matter, per class: Veit et al.'s lesion study by class, and graded interventions.

Over a labelled image set, two studies of the residual blocks:

- **Per-class lesions**: the number of images of each class the model gets right with one block's branch
  removed (``y = relu(s(x))``, Veit et al. 2016, "Residual networks behave like ensembles of relatively
  shallow networks"), for every block, and with none (the intact model): a (1 + blocks) × classes matrix.
- **Accuracy against alpha**: each block's branch scaled by ``alpha``, ``y = relu(alpha * F(x) + s(x))``,
  for alphas in [0, 2]; alpha 0 is the lesion and 1 the intact model, both exactly (they are taken from
  the lesion and intact passes, which :func:`~resnet_demo.core.capture.capture` makes bit for bit equal).

Both are counts of correct top-1 answers: integers, summed over the processes of a data-parallel run
with :meth:`~resnet_demo.core.studies.distributed.Dist.sum`, and images are sharded in whole batches
(:meth:`~resnet_demo.core.studies.distributed.Dist.shard` with ``block=batch_size``), so every batch is the one
a single process would run and one process and several give the same numbers.

For the project's own :class:`~resnet_demo.core.model.ResNet` a pass with block ``i`` changed resumes
from block ``i``'s input, kept from the intact pass: the blocks before it would compute the same thing
again (about 45% of the work). Other models (torchvision's) run the whole network for every change.

Computed by ``python -m resnet_demo.training.scan`` and stored in the model card's ``studies["lesions"]``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..capture import capture, find_blocks
from ..errors import DataError
from ..explorer import Explorer
from ..model import ResNet
from .budget import WORKING_SET, budgeted, footprint
from .distributed import Dist

__all__ = [
    "DEFAULT_ALPHAS", "DEFAULT_BATCH", "NONE", "AlphaCurves", "ClassLesions", "LesionScan", "lesion_scan",
    "scan_explorer",
]

NONE = "none"  # the row of the intact model in the per-class matrix
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
DEFAULT_BATCH = 100  # images per forward pass (fewer when the server's study budget asks for it); the tutorial
# Net keeps ~130 MB of block inputs per 100 images to resume from


def _matrix(rows: Sequence, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(rows, dtype=np.int64)
    if arr.shape != shape:
        raise ValueError(f"{what} has shape {arr.shape}, expected {shape}")
    return arr


@dataclass
class ClassLesions:
    """Correct top-1 answers per class with each block lesioned; row ``"none"`` is the intact model."""

    rows: list[str]  # "none", then the blocks in forward order
    classes: list[str]
    correct: np.ndarray  # (rows, classes) int64
    support: np.ndarray  # (classes,) int64: images of each class

    @property
    def n(self) -> int:
        return int(self.support.sum())

    @property
    def accuracy(self) -> np.ndarray:
        """(rows, classes) share right per class; NaN for a class with no images."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.support > 0, self.correct / np.maximum(self.support, 1), np.nan)

    @property
    def overall(self) -> np.ndarray:
        """(rows,) share of all images right."""
        return self.correct.sum(axis=1) / max(self.n, 1)

    @property
    def drop(self) -> np.ndarray:
        """(rows, classes) accuracy minus the intact model's, per class: negative where a lesion hurts."""
        acc = self.accuracy
        return acc - acc[self.rows.index(NONE)]

    def error(self) -> dict[str, float]:
        """Top-1 error over all images, per row: ``{"none": ..., "res1": ..., ...}``."""
        return {r: float(1 - a) for r, a in zip(self.rows, self.overall)}

    def to_dict(self) -> dict:
        return {"rows": list(self.rows), "classes": list(self.classes), "support": self.support.tolist(),
                "correct": self.correct.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> ClassLesions:
        rows, classes = [str(r) for r in d["rows"]], [str(c) for c in d["classes"]]
        support = _matrix(d["support"], (len(classes),), "the per-class support")
        return cls(rows, classes, _matrix(d["correct"], (len(rows), len(classes)), "the per-class matrix"), support)


@dataclass
class AlphaCurves:
    """Correct top-1 answers out of ``n`` with one block's branch scaled by each alpha."""

    blocks: list[str]
    alphas: list[float]
    correct: np.ndarray  # (blocks, alphas) int64
    n: int

    @property
    def accuracy(self) -> np.ndarray:
        """(blocks, alphas) share of the images right."""
        return self.correct / max(self.n, 1)

    def to_dict(self) -> dict:
        return {"blocks": list(self.blocks), "alphas": list(self.alphas), "n": self.n, "correct": self.correct.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> AlphaCurves:
        blocks, alphas = [str(b) for b in d["blocks"]], [float(a) for a in d["alphas"]]
        return cls(blocks, alphas, _matrix(d["correct"], (len(blocks), len(alphas)), "the alpha curves"), int(d["n"]))


@dataclass
class LesionScan:
    """Both studies over one image set."""

    lesions: ClassLesions
    curves: AlphaCurves

    @property
    def n(self) -> int:
        return self.lesions.n

    def to_dict(self) -> dict:
        """What the model card stores (``studies["lesions"]``); ``accuracy`` is there for people reading it."""
        return {
            "n": self.n,
            "classes": list(self.lesions.classes),
            "blocks": list(self.curves.blocks),
            "alphas": list(self.curves.alphas),
            "accuracy": {r: round(float(a), 6) for r, a in zip(self.lesions.rows, self.lesions.overall)},
            "per_class": self.lesions.to_dict(),
            "alpha_curves": self.curves.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LesionScan:
        """From :meth:`to_dict`'s output (other keys, such as the data set's name, are ignored).

        Raises:
            ValueError: a part is missing or has the wrong shape.
        """
        try:
            return cls(ClassLesions.from_dict(d["per_class"]), AlphaCurves.from_dict(d["alpha_curves"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a stored lesion scan: {exc!r} missing or malformed") from None


# --- running a pass with one block changed -----------------------------------------------------------


class _Runner:
    """Forward passes with one block's branch scaled; resumes from that block's input where it can."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps: list[tuple[str | None, nn.Module]] | None = None
        inplace = any(m.__dict__.get("inplace", False) is True for m in model.modules())
        # Only the project's ResNet itself (a subclass's forward could differ) and only without in-place
        # modules, which could write into a kept block input.
        if type(model) is ResNet and not inplace:
            steps: list[tuple[str | None, nn.Module]] = [(None, model.stem)]
            for stage in model.stages:  # the order of ResNet.forward_features
                steps.append((None, stage.transition))
                steps.extend((block.name, block) for block in stage.blocks)
            self.steps = steps
            self.start = {name: i for i, (name, _) in enumerate(steps) if name is not None}

    def intact(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The intact logits, and every block's input when the pass can resume from them."""
        if self.steps is None:
            return self.model(x), {}
        inputs = {}
        for name, step in self.steps:
            if name is not None:
                inputs[name] = x
            x = step(x)
        return self.model.forward_head(x), inputs

    def scaled(self, x: torch.Tensor, inputs: dict[str, torch.Tensor], block: str, alpha: float) -> torch.Tensor:
        """The logits with ``block``'s branch scaled by ``alpha`` (0: lesioned)."""
        with capture(self.model, scale={block: alpha}, record=False):
            if self.steps is None:
                return self.model(x)
            h = inputs[block]
            for _, step in self.steps[self.start[block] :]:
                h = step(h)
            return self.model.forward_head(h)


def _alphas(alphas: Sequence[float]) -> list[float]:
    out = []
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a):
            raise ValueError(f"alphas must be finite numbers, got {a!r}")
        out.append(float(a))
    if not out:
        raise ValueError("give at least one alpha")
    return sorted(set(out))


def _check(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise DataError(f"expected uint8 images (N, C, H, W), got {images.dtype} of shape {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.is_floating_point:
        raise DataError(f"expected one integer label per image ({len(images)}), got shape {tuple(labels.shape)}")
    if len(labels) == 0:
        raise DataError("no images to scan")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= len(classes):
        raise DataError(f"labels run from {low} to {high}, but there are {len(classes)} classes")


class _Counts:
    """A process's running counts: per-class right answers per row, images per class, right answers per alpha."""

    def __init__(self, blocks: int, classes: int, alphas: int, device: torch.device | None = None) -> None:
        self.correct = torch.zeros(1 + blocks, classes, dtype=torch.int64, device=device)
        self.support = torch.zeros(classes, dtype=torch.int64, device=device)
        self.curves = torch.zeros(blocks, alphas, dtype=torch.int64, device=device)

    def add_batch(self, runner: _Runner, x: torch.Tensor, y: torch.Tensor, blocks: list[str], alphas: list[float]):
        n_cls = self.support.numel()
        logits, inputs = runner.intact(x)
        if logits.shape[1] != n_cls:
            raise ValueError(f"the model gives {logits.shape[1]} logits, but {n_cls} classes were named")
        self.support += torch.bincount(y, minlength=n_cls)
        right = logits.argmax(1) == y
        self.correct[0] += torch.bincount(y[right], minlength=n_cls)
        for b, name in enumerate(blocks):
            lesioned = runner.scaled(x, inputs, name, 0.0).argmax(1) == y
            self.correct[1 + b] += torch.bincount(y[lesioned], minlength=n_cls)
            for a, alpha in enumerate(alphas):
                if alpha == 0:
                    hit = lesioned
                elif alpha == 1:
                    hit = right
                else:
                    hit = runner.scaled(x, inputs, name, alpha).argmax(1) == y
                self.curves[b, a] += hit.sum()


@torch.inference_mode()
def lesion_scan(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: Sequence[str],
    normalise: Callable[[torch.Tensor], torch.Tensor],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    dist: Dist | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> LesionScan:
    """Per-class accuracy with each block lesioned, and accuracy with each block's branch scaled by each alpha.

    Args:
        model: the model, in eval mode, on the device ``normalise`` puts batches on; it is not modified.
        images: (N, C, H, W) uint8, the whole set (each process takes its shard).
        labels: (N,) class indices.
        classes: class names, in logit order.
        normalise: uint8 batch -> model input on the model's device.
        alphas: factors of a block's branch; 0 is the lesion, 1 intact.
        dist: the data-parallel job (one process by default); every process gets the combined result.
        batch_size: images per forward pass, at most: fewer when the server's study budget
            (:mod:`~.budget`) asks for it. The counts do not depend on it.
        progress: called with (images done, images of this process) after each batch.

    Raises:
        DataError: images, labels or classes that do not fit together.
        ValueError: an alpha that is not finite; a model whose logits do not match ``classes``.
        StudyTooLarge: not even one image fits the server's study budget.
    """
    dist = dist or Dist()
    _check(images, labels, classes)
    alphas = _alphas(alphas)
    blocks = [b.name for b in find_blocks(model)]
    runner = _Runner(model)
    # nothing is captured; the project's ResNet keeps every block's input of the batch to resume from. A scaled
    # branch is a new tensor beside the branch (measured: ResNet-50, 100 images, ~1.5 GiB against a bare pass's 1.2)
    need = footprint(model, normalise(images[:1]), kept=("x",) if runner.steps is not None else (),
                     working=WORKING_SET + 1)
    with budgeted(need, min(batch_size, len(images)), what="The lesion study") as batch_size:
        index = dist.shard(len(images), block=batch_size)
        counts = _Counts(len(blocks), len(classes), len(alphas))  # stays zero for a process without images
        for start in range(0, len(index), batch_size):
            idx = index[start : start + batch_size]
            x = normalise(images[idx])
            if start == 0:
                counts = _Counts(len(blocks), len(classes), len(alphas), x.device)
            counts.add_batch(runner, x, labels[idx].to(x.device, torch.int64), blocks, alphas)
            if progress is not None:
                progress(min(start + batch_size, len(index)), len(index))
    correct, support, curves = (dist.sum(t).cpu().numpy() for t in (counts.correct, counts.support, counts.curves))
    lesions = ClassLesions([NONE, *blocks], list(classes), correct, support)
    return LesionScan(lesions, AlphaCurves(blocks, alphas, curves, int(support.sum())))


def scan_explorer(
    explorer: Explorer, images: torch.Tensor, labels: torch.Tensor, *,
    alphas: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0), progress: Callable[[float], None] | None = None,
) -> LesionScan:
    """:func:`lesion_scan` of ``explorer``'s model over uint8 ``images``, normalised as the explorer normalises
    a batch; ``progress`` gets the share done."""
    report = None if progress is None else (lambda done, total: progress(done / max(total, 1)))
    return lesion_scan(explorer.model, images, labels, classes=explorer.classes, normalise=explorer.batch_input,
                       alphas=alphas, progress=report)
