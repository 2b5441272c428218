"""Where a model fails over a labelled set: every image's prediction, the confusion matrix, per-class accuracy.

A scan runs the model over a labelled uint8 image set (a shipped evaluation set from :mod:`.evalsets`, or a
user's set from :mod:`.labelled`) in batches, through :meth:`Explorer.batch_input` and a bare forward pass
under ``torch.inference_mode`` (no hooks: the model is only read, so requests on other threads, with or
without their own captures, neither see nor disturb it). Per image it keeps the true and predicted class,
the confidence (the softmax probability of the prediction) and the probability of the true class;
:meth:`Scan.filter` selects and orders images by these. :class:`ScanCache` keeps scans per model and set.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..errors import DataError
from ..explorer import Explorer
from .budget import Footprint, budgeted, footprint

__all__ = [
    "SCANS", "SORTS", "WHICH", "LabelledImages", "Scan", "ScanCache", "fingerprint", "scan", "scan_logits", "scan_set",
]

WHICH = ("all", "wrong", "right")
# "index": the set's order; "confidence": most confident first; "least_confident": least confident first;
# "confidently_wrong": wrong images first, most confident first, then right ones, least confident first.
SORTS = ("index", "confidence", "least_confident", "confidently_wrong")


class LabelledImages(Protocol):
    """What a scan reads from a set: an :class:`~.evalsets.EvalSet` and a :class:`~.labelled.LabelledSet` are both."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    name: str


@dataclass(frozen=True, eq=False)
class Scan:
    """A model's prediction for every image of a set. Tensors are on the CPU."""

    name: str  # the set
    classes: list[str]  # the model's
    labels: torch.Tensor  # (N,) int64, the true class
    predicted: torch.Tensor  # (N,) int64, the arg-max class
    confidence: torch.Tensor  # (N,) float32, softmax probability of the predicted class
    p_true: torch.Tensor  # (N,) float32, softmax probability of the true class
    confusion: torch.Tensor  # (K, K) int64: rows the true class, columns the predicted one

    @property
    def n(self) -> int:
        return int(self.labels.numel())

    @property
    def correct(self) -> torch.Tensor:
        """(N,) bool: predicted == true."""
        return self.predicted == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.double().mean()) if self.n else float("nan")

    @property
    def class_counts(self) -> torch.Tensor:
        """(K,) int64: images of each true class."""
        return self.confusion.sum(dim=1)

    @property
    def per_class_accuracy(self) -> torch.Tensor:
        """(K,) float64: the share of each true class predicted right; NaN for a class with no image."""
        counts = self.class_counts.double()
        return torch.where(counts > 0, self.confusion.diagonal().double() / counts.clamp_min(1), float("nan"))

    def worst_classes(self, k: int = 3) -> list[tuple[int, float, int]]:
        """(class, accuracy, images) of the ``k`` classes with the lowest accuracy among those that have images
        (ties: the lower class index first)."""
        acc = self.per_class_accuracy.tolist()
        counts = self.class_counts.tolist()
        present = [c for c in range(len(acc)) if counts[c] > 0]
        present.sort(key=lambda c: (acc[c], c))
        return [(c, acc[c], counts[c]) for c in present[:k]]

    def most_confused(self, k: int = 5) -> list[tuple[int, int, int]]:
        """(true, predicted, images) of the ``k`` largest off-diagonal cells, largest first (ties: by true class,
        then predicted)."""
        off = self.confusion.clone()
        off.fill_diagonal_(0)
        cells = [(int(t), int(p), int(off[t, p])) for t, p in torch.nonzero(off).tolist()]
        cells.sort(key=lambda c: (-c[2], c[0], c[1]))
        return cells[:k]

    def class_index(self, value: int | str) -> int:
        """A class given by index or by name (case ignored)."""
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if not 0 <= int(value) < len(self.classes):
                raise ValueError(f"class index {value} is out of range (the model has {len(self.classes)} classes)")
            return int(value)
        folded = [c.casefold() for c in self.classes]
        if isinstance(value, str) and value.casefold() in folded:
            return folded.index(value.casefold())
        raise ValueError(f"{value!r} is not one of the model's classes")

    def filter(
        self,
        *,
        true: int | str | None = None,
        predicted: int | str | None = None,
        which: str = "all",
        confidence: tuple[float, float] = (0.0, 1.0),
        sort: str = "index",
        limit: int | None = None,
    ) -> list[int]:
        """Indices of the images that pass every filter, in the order ``sort`` names.

        Args:
            true, predicted: keep only this true / predicted class (index or name); ``None`` keeps all.
            which: ``"all"``, ``"wrong"`` or ``"right"``.
            confidence: keep images whose confidence lies in [low, high] (inclusive).
            sort: one of :data:`SORTS`; ties keep the set's order.
            limit: at most this many indices (the first in that order).

        Raises:
            ValueError: an unknown class, ``which`` or ``sort``, or a confidence range outside [0, 1].
        """
        if which not in WHICH:
            raise ValueError(f"which must be one of {WHICH}, got {which!r}")
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}, got {sort!r}")
        low, high = confidence
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"the confidence range must satisfy 0 <= low <= high <= 1, got ({low}, {high})")
        conf = self.confidence.double().numpy()
        right = self.correct.numpy()
        keep = (conf >= low) & (conf <= high)
        if true is not None:
            keep &= self.labels.numpy() == self.class_index(true)
        if predicted is not None:
            keep &= self.predicted.numpy() == self.class_index(predicted)
        if which != "all":
            keep &= right if which == "right" else ~right
        idx = np.flatnonzero(keep)
        order = {
            "index": np.arange(idx.size),
            "confidence": np.argsort(-conf[idx], kind="stable"),
            "least_confident": np.argsort(conf[idx], kind="stable"),
            # lexsort: the last key is the primary one
            "confidently_wrong": np.lexsort((np.where(right[idx], conf[idx], -conf[idx]), right[idx])),
        }[sort]
        return idx[order][:limit].tolist()


def scan_logits(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], name: str = "") -> Scan:
    """A scan from logits already computed: (N, K) logits and (N,) true classes in [0, K)."""
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    k = len(classes)
    if logits.ndim != 2 or logits.shape[1] != k or labels.shape != (logits.shape[0],):
        raise ValueError(f"need (N, {k}) logits and (N,) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < k):
        raise DataError(f"the set's labels must lie in 0..{k - 1} (the model's {k} classes), "
                        f"found {int(labels.min())}..{int(labels.max())}")
    probs = torch.softmax(logits, dim=1)
    confidence, predicted = probs.max(dim=1)
    p_true = probs.gather(1, labels[:, None])[:, 0]
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)
    return Scan(name, list(classes), labels, predicted, confidence, p_true, confusion)


def scan(
    explorer: Explorer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    name: str = "",
    batch_size: int = 100,
    progress: Callable[[float], None] | None = None,
) -> Scan:
    """The explorer's model over a labelled uint8 image set, ``batch_size`` images per forward pass.

    Args:
        images: (N, C, H, W) uint8 in the model's training format (an evaluation set's, or a labelled set's).
        labels: (N,) true classes, indices into the explorer's classes.
        batch_size: images per forward pass, at most: fewer when the server's study budget asks for it
            (:mod:`~.budget`); the logits do not depend on it.
        progress: called with the share of images done, after each batch.

    Raises:
        DataError: the images are not a uint8 batch, or labels and images do not fit each other or the model.
        StudyTooLarge: not even one image fits the server's study budget.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise DataError(f"a scan needs (N, C, H, W) uint8 images, got {images.dtype} of shape {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = images.shape[0]
    parts = []
    with torch.inference_mode():
        # a bare forward pass: nothing is captured, only the logits are kept
        need = footprint(explorer.model, explorer.batch_input(images[:1])) if n else Footprint(0)
        with budgeted(need, min(batch_size, max(n, 1)), what=f"The error scan of {explorer.card.name}") as batch_size:
            for start in range(0, n, batch_size):
                parts.append(explorer.logits(explorer.batch_input(images[start : start + batch_size])))
                if progress is not None:
                    progress(min(n, start + batch_size) / n)
    logits = torch.cat(parts) if parts else torch.zeros(0, len(explorer.classes))
    return scan_logits(logits, labels, explorer.classes, name)


def fingerprint(data: LabelledImages) -> str:
    """What a set holds, so two sets under one name (two visitors' uploads) never share a cached scan."""
    h = hashlib.blake2b(digest_size=16)
    for t in (data.images, data.labels):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(np.ascontiguousarray(t.numpy()).data)
    h.update("\n".join(data.classes).encode())
    return h.hexdigest()


class ScanCache:
    """Scans kept per explorer (weakly: a model that goes away takes its scans along) and per set.

    Thread-safe. Two threads asking for the same uncached scan at once both compute it (the same numbers);
    the lock is never held during a forward pass. At most ``per_model`` sets per explorer, least recently used
    evicted: a scan is small (4 numbers per image), but visitors' sets keep coming.
    """

    def __init__(self, per_model: int = 8) -> None:
        self.per_model = per_model
        self._scans: weakref.WeakKeyDictionary[Explorer, OrderedDict[tuple[str, str], Scan]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def get(self, explorer: Explorer, data: LabelledImages, **options) -> Scan:
        """The scan of ``data`` by ``explorer`` (``options`` go to :func:`scan`), computed once."""
        key = (data.name, fingerprint(data))
        with self._lock:
            kept = self._scans.setdefault(explorer, OrderedDict())
            if key in kept:
                kept.move_to_end(key)
                return kept[key]
        result = _scan_checked(explorer, data, **options)
        with self._lock:
            kept = self._scans.setdefault(explorer, OrderedDict())
            kept[key] = result
            kept.move_to_end(key)
            while len(kept) > self.per_model:
                kept.popitem(last=False)
        return result

    def __len__(self) -> int:
        """Scans held, over every explorer."""
        with self._lock:
            return sum(len(kept) for kept in self._scans.values())

    def clear(self) -> None:
        with self._lock:
            self._scans.clear()


def _scan_checked(explorer: Explorer, data: LabelledImages, **options) -> Scan:
    if list(data.classes) != list(explorer.classes):
        raise DataError(
            f"the set {data.name} is labelled with other classes ({', '.join(data.classes[:10])}"
            f"{', …' if len(data.classes) > 10 else ''}) than the model's ({', '.join(explorer.classes[:10])}"
            f"{', …' if len(explorer.classes) > 10 else ''})"
        )
    return scan(explorer, data.images, data.labels, name=data.name, **options)


SCANS = ScanCache()  # the server's: one per process, shared by every request


def scan_set(explorer: Explorer, data: LabelledImages, *, cache: ScanCache | None = SCANS, **options) -> Scan:
    """The scan of a labelled set (an evaluation set or a user's), from ``cache`` when it holds it.

    Raises:
        DataError: the set's classes are not the model's, or its images or labels are malformed.
    """
    if cache is None:
        return _scan_checked(explorer, data, **options)
    return cache.get(explorer, data, **options)
