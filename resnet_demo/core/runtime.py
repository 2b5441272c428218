"""Where and how the model runs: device choice, the machine's description, malloc tuning, CUDA graphs.

Process-level settings that the service (:mod:`.explorer`), the training command and the benchmark
share. Nothing here touches CUDA unless called on a CUDA device.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import BlockRecord, capture_forward

__all__ = [
    "GraphedCapture",
    "cpu_model",
    "device_name",
    "machine",
    "on_zero_gpu",
    "pack_records",
    "pick_device",
    "record_cuda_graph",
    "tune_malloc",
    "unpack_records",
]


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for benchmark and training records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """One line naming the hardware ``device`` runs on, for model cards and benchmark reports."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores, {torch.get_num_threads()} torch threads"


def machine() -> dict[str, Any]:
    """The machine as the benchmark reports it: CPU, cores, torch threads, versions, and the GPU if any."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters, glibc's malloc.h


def tune_malloc(mmap_mb: int = 4, trim_mb: int = 8, arenas: int = 2) -> bool:
    """Let glibc keep freed activation memory for the next forward pass, in a few arenas.

    A forward pass allocates and frees dozens of activation tensors of a few hundred KB. With glibc's
    defaults, blocks above the (dynamic) mmap threshold are mapped and unmapped on every pass and the
    heap top is trimmed, so each pass page-faults fresh memory: a few percent of a batch-1 forward on
    a small CPU, and more when a capture keeps 20 activations alive. A fixed mmap threshold of
    ``mmap_mb`` and trimming only above ``trim_mb`` keep that memory in the heap for reuse. And glibc
    gives every allocating thread an arena of its own (up to 8 per core): a server's thread pool then
    scatters freed memory over many arenas, which shows as RSS growth (in the load test, about four
    times as much with the default as with 2 arenas). Process-wide; the app and the benchmark call it at start.

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


class GraphedCapture:
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




def on_zero_gpu() -> bool:
    """True on a Hugging Face ZeroGPU Space, which sets ``SPACES_ZERO_GPU``.

    There a GPU exists only while a function decorated with ``spaces.GPU`` runs: moving a model to
    ``cuda`` at start-up is allowed (ZeroGPU defers it), but nothing may run on the GPU outside such a
    function: no CUDA-graph recording and no cuDNN autotuning warm-up when the models load.
    """
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() not in ("", "0", "false", "no")


def enable_cudnn_autotuning(preference: str | None = None) -> bool:
    """Turn on cuDNN autotuning when the models will run on CUDA; call before they load.

    Inputs have a fixed size per model, so autotuning pays once. It must be set before the models
    load, since each :class:`~resnet_demo.core.explorer.Explorer` records its CUDA graph (and so picks
    its kernels) as it is made. Returns whether it was turned on.
    """
    if on_zero_gpu():
        return False
    if torch.cuda.is_available() and not (preference or "").startswith(("cpu", "mps")):
        torch.backends.cudnn.benchmark = True
        return True
    return False


def share_cores(concurrency: int) -> None:
    """Share the CPU's cores out between ``concurrency`` analyses running at once.

    Requests are single images: intra-op threads buy little and fight each other when several analyses
    run at once (on a GPU machine too: decoding, metrics and drawing stay on the CPU). Also keeps freed
    activation memory for the next request, in one malloc arena per concurrent analysis (see
    :func:`tune_malloc`).
    """
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // concurrency))
    tune_malloc(arenas=max(2, concurrency))
