"""The one object the UI, the benchmark and the command line call: a loaded model and its analyses."""

from __future__ import annotations

import ctypes
import math
import platform
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis import BlockMetrics, Prediction, block_metrics, topk
from .capture import BlockRecord, capture_forward, find_blocks
from .checkpoints import ModelCard, load_model
from .preprocess import Prepared, prepare

__all__ = ["Analysis", "Explorer", "cpu_model", "pack_records", "pick_device", "record_cuda_graph", "tune_malloc",
           "unpack_records"]


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for benchmark and training records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters, glibc's malloc.h


def tune_malloc(mmap_mb: int = 4, trim_mb: int = 8, arenas: int = 2) -> bool:
    """Let glibc keep freed activation memory for the next forward pass, in a few arenas.

    A forward pass allocates and frees dozens of activation tensors of a few hundred KB. With glibc's
    defaults, blocks above the (dynamic) mmap threshold are mapped and unmapped on every pass and the
    heap top is trimmed, so each pass page-faults fresh memory: a few percent of a batch-1 forward on
    a small CPU, and more when a capture keeps 20 activations alive. A fixed mmap threshold of
    ``mmap_mb`` and trimming only above ``trim_mb`` keep that memory in the heap for reuse. And glibc
    gives every allocating thread an arena of its own (up to 8 per core): a server's thread pool then
    scatters freed memory over many arenas, which shows as RSS growth (load test: +63 to +108 MB with
    the default, +25 to +28 MB with 2 arenas). Process-wide; the app and the benchmark call it at start.

    Returns:
        True if the settings were accepted; False (nothing changed) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others
        return False
    settings = ((_M_MMAP_THRESHOLD, mmap_mb << 20), (_M_TRIM_THRESHOLD, trim_mb << 20), (_M_ARENA_MAX, arenas))
    return all([bool(mallopt(param, value)) for param, value in settings])  # a list: apply every one


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


# --- moving a capture off the device in one copy ----------------------------------------------------

_FIELDS = ("x", "f", "s", "y")


def pack_records(logits: torch.Tensor, records: list[BlockRecord]) -> tuple[torch.Tensor, list]:
    """Flatten logits and every record's tensors into one float32 tensor on their device.

    A tensor shared between fields (an identity shortcut's ``s`` is its ``x``; a block's ``x`` is
    the previous block's ``y``) is stored once. Returns the flat tensor and the layout that
    :func:`unpack_records` needs: ``[(shape of logits), [(name, stage, (slot of x, f, s, y)), ...],
    [(offset, shape) of each slot]]``.
    """
    slots: dict[int, int] = {}
    tensors: list[torch.Tensor] = []

    def slot(t: torch.Tensor) -> int:
        if id(t) not in slots:
            slots[id(t)] = len(tensors)
            tensors.append(t)
        return slots[id(t)]

    blocks = [(r.name, r.stage, tuple(slot(getattr(r, k)) for k in _FIELDS)) for r in records]
    offsets, at = [], logits.numel()
    for t in tensors:
        offsets.append((at, tuple(t.shape)))
        at += t.numel()
    flat = torch.cat([logits.reshape(-1).float(), *(t.reshape(-1).float() for t in tensors)])
    return flat, [tuple(logits.shape), blocks, offsets]


def unpack_records(flat: torch.Tensor, layout: list) -> tuple[torch.Tensor, list[BlockRecord]]:
    """Inverse of :func:`pack_records`: logits and records as views of ``flat``, sharing as before."""
    logits_shape, blocks, offsets = layout
    views = [flat[at : at + math.prod(shape)].view(shape) for at, shape in offsets]
    records = [BlockRecord(name, stage, *(views[i] for i in idx)) for name, stage, idx in blocks]
    return flat[: math.prod(logits_shape)].view(logits_shape), records


_MAX_GRAPHS = 4  # recorded input shapes per explorer; the shipped models need one each


def record_cuda_graph(
    fn: Callable[[], Any], device: torch.device, warmup: int = 3
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Record one call of ``fn`` as a CUDA graph; returns the graph and that call's output.

    ``fn`` first runs ``warmup`` times on a side stream, so cuDNN autotuning and lazy initialisation
    happen outside the graph. Every replay overwrites the output's tensors in place.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads' eager CUDA work during the recording is not an error
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = fn()
    return graph, output


class _GraphedCapture:
    """The lesion-free capture forward of one input shape on CUDA, recorded once as a CUDA graph.

    Eager PyTorch spends tens of microseconds of Python and launch work per layer, so on a fast GPU a
    batch-1 forward of a small ResNet waits on the CPU, not the GPU. A graph replays every kernel,
    the hooks' copies and the packing into one flat buffer included, from a single launch; a reply is
    then one device-to-host copy. The buffers are shared, so replays take a lock (each is short).
    """

    def __init__(self, model: nn.Module, shape: tuple[int, ...], device: torch.device) -> None:
        self.lock = threading.Lock()
        self.x = torch.zeros(shape, device=device)
        self.graph, (self.flat, self.layout) = record_cuda_graph(
            lambda: pack_records(*capture_forward(model, self.x)), device
        )

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[BlockRecord]]:
        with self.lock:
            self.x.copy_(x)
            self.graph.replay()
            flat = self.flat.cpu()  # waits for the replay; a new CPU tensor, so the lock can go
        return unpack_records(flat, self.layout)


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
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, ...], _GraphedCapture | None] = {}
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

    def _graph(self, shape: tuple[int, ...]) -> _GraphedCapture | None:
        """The recorded graph for batch-1 inputs of ``shape``, made on first use; ``None`` to run eagerly."""
        if not self.cuda_graphs or shape[0] != 1:
            return None
        with self._graphs_lock:
            if shape not in self._graphs:
                if len(self._graphs) >= _MAX_GRAPHS:  # inputs of ever new sizes: keep GPU memory bounded
                    return None
                try:
                    self._graphs[shape] = _GraphedCapture(self.model, shape, self.device)
                except RuntimeError as exc:  # a model whose forward cannot be recorded: say so, run it eagerly
                    warnings.warn(
                        f"CUDA graph capture failed for input {shape}, analysing eagerly: {exc}", stacklevel=3
                    )
                    self._graphs[shape] = None
            return self._graphs[shape]
