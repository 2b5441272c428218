"""A training timeline: the snapshots one training run saved, and how its blocks settled over the run.

``python -m resnet_demo.training.train ... --snapshots N`` saves ``N`` snapshots, log-spaced over the
steps, in a run folder::

    <run>/step-000001.safetensors  step-000001.json   # fp16 weights and a card: step, epoch, test accuracy
    <run>/step-000008.safetensors  step-000008.json
    ...

:class:`Timeline` reads such a folder; each snapshot loads as an :class:`~.explorer.Explorer` when first
used (and stays loaded: a handful of models). :meth:`Timeline.history` measures every block's median
``ratio`` and ``cosine`` (see :mod:`.metrics`) over a data set at each snapshot: how the blocks settle,
over training, into refining their input rather than replacing it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsError
from ..explorer import Explorer
from ..weights.cards import ModelCard
from .bands import band_values

__all__ = ["History", "Snapshot", "Timeline", "find_timelines"]

SNAPSHOT = re.compile(r"step-(\d{6,})\.safetensors")
MAX_SNAPSHOTS = 64  # a run folder is read whole; more than this is not a timeline the page can show


@dataclass(frozen=True)
class Snapshot:
    """One saved moment of a run: its weights file and the card written with it."""

    step: int
    epoch: int
    steps: int  # of the whole run
    accuracy: float | None  # test accuracy measured on this snapshot as saved
    path: Path
    card: ModelCard

    @property
    def label(self) -> str:
        acc = f", {self.accuracy:.2%} test accuracy" if self.accuracy is not None else ""
        return f"step {self.step:,} of {self.steps:,} (epoch {self.epoch}){acc}"


@dataclass(frozen=True)
class History:
    """Each block's median ratio and cosine over ``n`` images of ``data``, at each snapshot's step."""

    steps: list[int]
    blocks: list[str]
    stages: list[int]  # each block's stage (1, 2, ...), for colouring
    ratio: np.ndarray  # (snapshots, blocks)
    cosine: np.ndarray  # (snapshots, blocks)
    accuracy: list[float | None]
    n: int
    data: str

    def to_dict(self) -> dict:
        return {
            "steps": self.steps, "blocks": self.blocks, "stages": self.stages, "accuracy": self.accuracy,
            "n": self.n, "data": self.data,
            "median_ratio": self.ratio.round(6).tolist(), "median_cosine": self.cosine.round(6).tolist(),
        }


class Timeline:
    """The snapshots of one run folder, in step order; thread-safe."""

    def __init__(self, folder: Path, snapshots: Sequence[Snapshot], device: str | torch.device | None = None) -> None:
        if not snapshots:
            raise WeightsError(f"{folder} holds no snapshots (step-XXXXXX.safetensors with its .json card)")
        self.folder = Path(folder)
        self.snapshots = sorted(snapshots, key=lambda s: s.step)
        self.device = device
        self._explorers: dict[int, Explorer] = {}
        self._histories: dict[tuple[str, int], History] = {}
        self._lock = threading.Lock()

    @classmethod
    def read(cls, folder: str | Path, device: str | torch.device | None = None) -> Timeline:
        """The run folder's snapshots; only their cards are read here.

        Raises:
            WeightsError: not a folder, no snapshots, too many, a snapshot without a readable card, or
                snapshots of different architectures or classes (not one run).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"training run folder {folder} not found")
        files = sorted(p for p in folder.iterdir() if SNAPSHOT.fullmatch(p.name))
        if len(files) > MAX_SNAPSHOTS:
            raise WeightsError(f"{folder} holds {len(files)} snapshots; a timeline shows at most {MAX_SNAPSHOTS}")
        snapshots = [_snapshot(p) for p in files]
        first = snapshots[0].card if snapshots else None
        for s in snapshots[1:]:
            if (s.card.config, s.card.classes, s.card.arch) != (first.config, first.classes, first.arch):
                raise WeightsError(f"{s.path.name} is not of the same network as {snapshots[0].path.name}: "
                                   "a run folder holds the snapshots of one run")
        return cls(folder, snapshots, device)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def card(self) -> ModelCard:
        """The last snapshot's card (classes, preprocessing, the run's command)."""
        return self.snapshots[-1].card

    def __len__(self) -> int:
        return len(self.snapshots)

    def explorer(self, index: int) -> Explorer:
        """Snapshot ``index`` (in step order) as an explorer, loaded on first use."""
        snap = self.snapshots[index]
        with self._lock:
            found = self._explorers.get(snap.step)
        if found is None:
            found = Explorer.from_weights(snap.path, self.device, card=snap.card)
            with self._lock:
                found = self._explorers.setdefault(snap.step, found)
        return found

    def history(
        self, images: torch.Tensor, *, data: str = "", batch_size: int = 100,
        progress: Callable[[float], None] | None = None,
    ) -> History:
        """Every block's median ratio and cosine over ``images`` (uint8, as an evaluation set stores them) at
        each snapshot; cached per data set name and size."""
        key = (data, int(images.shape[0]))
        with self._lock:
            if data and key in self._histories:
                return self._histories[key]
        ratios, cosines = [], []
        for i in range(len(self)):
            r, c = _medians(self.explorer(i), images, batch_size)
            ratios.append(r)
            cosines.append(c)
            if progress is not None:
                progress((i + 1) / len(self))
        history = History(
            [s.step for s in self.snapshots], self.explorer(0).block_names, [b.stage for b in self.explorer(0).blocks],
            np.array(ratios), np.array(cosines),
            [s.accuracy for s in self.snapshots], int(images.shape[0]), data,
        )
        if data:
            with self._lock:
                self._histories[key] = history
        return history


def _snapshot(path: Path) -> Snapshot:
    card = ModelCard.read(path.with_suffix(".json"))
    training = card.training or {}
    step = int(SNAPSHOT.fullmatch(path.name).group(1))
    if int(training.get("step", step)) != step:
        raise WeightsError(f"{path.name}'s card says step {training.get('step')}, its name step {step}")
    acc = card.metrics.get("test_acc")
    return Snapshot(step, int(training.get("epoch", 0)), int(training.get("steps", step)),
                    float(acc) if isinstance(acc, (int, float)) else None, path, card)


def _medians(explorer: Explorer, images: torch.Tensor, batch_size: int) -> tuple[list[float], list[float]]:
    """Per block, the median over ``images`` of ratio and of cosine (non-finite values left out, as in bands)."""
    values = band_values(explorer.model, images, normalise=explorer.batch_input, batch_size=batch_size)
    return ([_median(values["ratio"][b]) for b in explorer.block_names],
            [_median(values["cosine"][b]) for b in explorer.block_names])


def _median(vals: list[float]) -> float:
    arr = np.asarray(vals, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(np.median(arr)) if arr.size else float("nan")


def find_timelines(folder: Path) -> list[Path]:
    """Run folders (``*_timeline``) directly inside ``folder``, such as the shipped ``weights/``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.endswith("_timeline"))
