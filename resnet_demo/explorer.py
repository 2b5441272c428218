"""The one object the UI, the benchmark and the command line call: a loaded model and its analyses."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis import BlockMetrics, Prediction, block_metrics, topk
from .capture import BlockRecord, capture_forward, find_blocks
from .checkpoints import ModelCard, load_model
from .preprocess import Prepared, prepare

__all__ = ["Analysis", "Explorer", "cpu_model", "pick_device"]


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for benchmark and training records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_device(preference: str | None = None) -> torch.device:
    """``preference`` if given (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), else cuda, then mps, then cpu.

    Raises:
        ValueError: the preferred device is not available here.
    """
    if preference and preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device '{preference}' was requested but CUDA is not available on this machine")
        if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device '{preference}' was requested but MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Analysis:
    """One image through the network: its input, predictions, every block's tensors and metrics.

    Tensors are on the CPU and hold only this image (batch dimension 1).
    """

    card: ModelCard
    input: torch.Tensor  # (1, C, H, W), normalised, as the model saw it
    kind: str
    logits: torch.Tensor  # (classes,)
    predictions: list[Prediction]
    blocks: list[BlockRecord]
    metrics: list[BlockMetrics]
    lesioned: tuple[str, ...] = ()

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=0)


class Explorer:
    """A model on a device, with its card, ready to analyse images.

    Thread-safe: concurrent :meth:`analyze` calls on one explorer get their own results (the
    capture's hooks act only for the thread that registered them) and never change the model.
    """

    def __init__(self, model: nn.Module, card: ModelCard, device: str | torch.device | None = None) -> None:
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        self.model = model.eval().to(self.device)
        self.card = card
        self.blocks = find_blocks(self.model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no residual blocks to explore")
        first = next(m for m in self.model.modules() if isinstance(m, nn.Conv2d))
        self.in_channels = first.in_channels

    @classmethod
    def from_weights(
        cls, path: str | Path, device: str | torch.device | None = None, card: ModelCard | None = None
    ) -> Explorer:
        model, card = load_model(path, card=card)
        return cls(model, card, device)

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def prepare(self, source: Any, kind: str | None = None) -> Prepared:
        return prepare(source, self.card, kind=kind, channels=self.in_channels)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Bare forward pass of a prepared batch; logits on the CPU."""
        with torch.inference_mode():
            return self.model(x.to(self.device)).float().cpu()

    def analyze(
        self,
        source: Any,
        *,
        kind: str | None = None,
        k: int = 5,
        lesion: Iterable[str] = (),
    ) -> Analysis:
        """Preprocess ``source``, run one forward pass with capture, and compute top-k and metrics.

        Args:
            source: anything :func:`~resnet_demo.preprocess.prepare` takes, or a prepared tensor.
            kind: ``"photo"`` or ``"drawing"``; the card's ``input_kind`` by default.
            k: how many predictions to return.
            lesion: blocks whose residual branch is removed for this analysis only.
        """
        if isinstance(source, torch.Tensor):
            x, kind = (source if source.ndim == 4 else source.unsqueeze(0)), kind or self.card.input_kind
        else:
            prepared = self.prepare(source, kind)
            x, kind = prepared.tensor, prepared.kind
        lesion = tuple(lesion)
        logits, records = capture_forward(self.model, x.to(self.device), lesion=lesion)
        if self.device.type != "cpu":
            for r in records:
                r.x, r.f, r.s, r.y = (t.float().cpu() for t in (r.x, r.f, r.s, r.y))
        logits = logits[0].float().cpu()
        return Analysis(
            card=self.card,
            input=x.cpu(),
            kind=kind,
            logits=logits,
            predictions=topk(logits, self.card.classes, k),
            blocks=records,
            metrics=block_metrics(records)[0],
            lesioned=lesion,
        )
