"""The one service object the page, the benchmark and the command line call: a loaded model and its analyses.

Everything the page shows is asked of an :class:`Explorer`: the analysis of one image, and the
insight tools on it (lesions, the sweep, the readout, Grad-CAM). Callers never touch its model or device.
"""

from __future__ import annotations

import functools
import itertools
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import insight, probes
from .capture import BlockRecord, capture_forward, find_blocks
from .inside import Inside, look_inside
from .metrics import BlockMetrics, Prediction, block_metrics, topk
from .preprocess import Prepared, normalise_batch, prepare
from .runtime import GraphedCapture, on_zero_gpu, pack_records, pick_device, unpack_records
from .weights.cards import ModelCard
from .weights.load import load_model, open_checkpoint

__all__ = ["Analysis", "Explorer"]

_MAX_GRAPHS = 4  # recorded input shapes per explorer; the shipped models need one each


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

    def __init__(
        self,
        model: nn.Module,
        card: ModelCard,
        device: str | torch.device | None = None,
        *,
        cuda_graphs: bool = True,
    ) -> None:
        """``cuda_graphs``: on CUDA, replay lesion-free batch-1 analyses from a recorded graph
        (same numbers, a fraction of the launch cost); ignored elsewhere."""
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        self.model = model.eval().to(self.device)
        # On ZeroGPU the GPU exists only inside spaces.GPU functions: nothing is recorded at load there.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and not on_zero_gpu()
        self._graphs: dict[tuple[int, ...], GraphedCapture | None] = {}
        self._graphs_lock = threading.Lock()
        self.card = card
        self.blocks = find_blocks(self.model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no residual blocks to explore")
        first = next(m for m in self.model.modules() if isinstance(m, nn.Conv2d))
        self.in_channels = first.in_channels
        if self.cuda_graphs:  # record the common case now, before requests arrive from several threads
            self._graph((1, self.in_channels, card.input_size, card.input_size))

    @classmethod
    def from_weights(
        cls, path: str | Path, device: str | torch.device | None = None, card: ModelCard | None = None
    ) -> Explorer:
        """A weights file with its card beside it (or ``card``); a file without one is opened as
        :meth:`from_checkpoint` opens any checkpoint (see :func:`~.weights.load.load_model`)."""
        model, card = load_model(path, card=card)
        return cls(model, card, device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str | torch.device | None = None, **options: Any
    ) -> Explorer:
        """A checkpoint from an untrusted source, its architecture recognised from its keys and shapes.

        The page's upload and ``--weights`` on the command line both come here: ``options`` are the keyword
        arguments of :func:`~.weights.load.open_checkpoint` (``arch``, ``maxpool``, ``preset``, ``class_names``,
        ``input_size``, ``mean``, ``std``, ``drawing``, ``config``, ``preprocessor`` ...), and ``device`` the
        explorer's.

        Raises:
            WeightsError: the file is refused, fits no supported architecture, or the class names,
                preset or normalisation do not fit it; the message says which.
        """
        model, card = open_checkpoint(path, **options)
        return cls(model, card, device)

    @property
    def nbytes(self) -> int:
        """Bytes of the model's parameters and buffers: what holding this explorer costs, on its device."""
        return sum(t.nbytes for t in itertools.chain(self.model.parameters(), self.model.buffers()))

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
            source: anything :func:`~resnet_demo.core.preprocess.prepare` takes, or a prepared tensor.
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
        graph = self._graph(tuple(x.shape)) if not lesion else None
        if graph is not None:
            logits, records = graph(x)
        else:
            logits, records = capture_forward(self.model, x.to(self.device), lesion=lesion)
            if self.device.type != "cpu":  # one device-to-host copy, not one per tensor
                flat, layout = pack_records(logits, records)
                logits, records = unpack_records(flat.cpu(), layout)
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

    def batch_input(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of uint8 images (N, C, H, W), already in the model's training format (an evaluation set's),
        as the model's input on its device: resized to its input size, channels matched, normalised
        (:func:`~.preprocess.normalise_batch`)."""
        return normalise_batch(images, self.card.mean, self.card.std, self.in_channels, size=self.card.input_size,
                               device=self.device)

    # --- about the model, for the page -----------------------------------------------------------

    @property
    def where(self) -> str:
        """The device the model runs on, as text (``cpu``, ``cuda:0``)."""
        return str(self.device)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    # --- the insight tools, on an analysis this explorer made ----------------------------------------

    def lesion(
        self, analysis: Analysis, blocks: Sequence[str], k: int = 5, alpha: float = 0.0
    ) -> insight.LesionResult:
        """The image of ``analysis`` with the branches of ``blocks`` removed (``y = relu(s(x))``), or scaled by
        ``alpha`` (0 the lesion, 1 intact), for this call only.

        Raises:
            ValueError: no block chosen, or ``alpha`` not a finite number. KeyError: a name that is not one of
                this model's blocks.
        """
        if not blocks:
            raise ValueError("Choose at least one block to lesion.")
        return insight.lesion(self.model, analysis.input, blocks, self.classes, k, intact_logits=analysis.logits,
                              alpha=alpha)

    def sweep(self, analysis: Analysis, k: int = 5, alpha: float = 0.0) -> list[insight.LesionResult]:
        """Each block lesioned (or scaled by ``alpha``) alone, in forward order."""
        return insight.lesion_sweep(self.model, analysis.input, self.classes, k, intact_logits=analysis.logits,
                                    alpha=alpha)

    def probe_readings(self, analysis: Analysis) -> list[probes.ProbeReading]:
        """What the linear probes stored beside the weights read from each block of ``analysis`` (empty when
        there are none); the probes are loaded once.

        Raises:
            WeightsError: the probes file is damaged or was fitted for other weights.
        """
        if self._probes is None:
            return []
        return probes.probe_readings(self._probes, analysis.blocks, final_index=analysis.predictions[0].index)

    @functools.cached_property
    def _probes(self) -> probes.ProbeSet | None:
        """The probes beside the weights, read on first use (two threads at once would both read: harmless)."""
        return probes.find_probes(self.card, self.model)

    def readout(self, analysis: Analysis) -> insight.Readout:
        """The classifier head applied to every block as wide as the head.

        Raises:
            ValueError: no block has the head's width, or the model has no usable head.
        """
        return insight.readout(self.model, analysis, self.classes)

    def gradcam(self, analysis: Analysis, block: str | None = None, class_index: int | None = None) -> np.ndarray:
        """Grad-CAM at ``block`` (the last by default) for ``class_index`` (the predicted class by default).

        Returns:
            (H, W) float32 map over the model's input, in [0, 1].
        """
        block = block or analysis.metrics[-1].name
        index = analysis.predictions[0].index if class_index is None else class_index
        return insight.gradcam(self.model, analysis.input, block, index)

    def inside(self, analysis: Analysis, block: str, channel: int) -> Inside:
        """Inside ``block`` for output ``channel`` of ``analysis``'s image: every step of F(x), s(x), the sum and y.

        Re-runs only that block, on the input x the analysis captured, with hooks on its inner layers for this
        call and this thread only (:mod:`.inside` says why that is exact and cheap).

        Raises:
            KeyError: ``block`` is not one of this model's blocks, or the analysis has no record of it.
            ValueError: the block is lesioned in ``analysis`` (its captured y is not the block's own).
            IndexError: ``channel`` is not one of the block's output channels.
            UnsupportedBlockError: a block type whose inner layers cannot be read.
        """
        spec = next((s for s in self.blocks if s.name == block), None)
        record = next((r for r in analysis.blocks if r.name == block), None)
        if spec is None or record is None:
            raise KeyError(f"unknown block {block!r} for this analysis; the blocks are {self.block_names}")
        if block in analysis.lesioned:
            raise ValueError(f"block {block} is lesioned in this analysis: look inside it on the intact analysis")
        x = record.x
        if x is None:  # an analysis that kept no block inputs: one pass recording this block's input only
            x = capture_forward(self.model, analysis.input[:1].to(self.device), blocks=[block])[1][0].x
        return look_inside(spec, x[:1].to(self.device), channel)

    def _graph(self, shape: tuple[int, ...]) -> GraphedCapture | None:
        """The recorded graph for batch-1 inputs of ``shape``, made on first use; ``None`` to run eagerly."""
        if not self.cuda_graphs or shape[0] != 1:
            return None
        with self._graphs_lock:
            if shape not in self._graphs:
                if len(self._graphs) >= _MAX_GRAPHS:  # inputs of ever new sizes: keep GPU memory bounded
                    return None
                try:
                    self._graphs[shape] = GraphedCapture(self.model, shape, self.device)
                except RuntimeError as exc:  # a model whose forward cannot be recorded: say so, run it eagerly
                    warnings.warn(
                        f"CUDA graph capture failed for input {shape}, analysing eagerly: {exc}", stacklevel=3
                    )
                    self._graphs[shape] = None
            return self._graphs[shape]
