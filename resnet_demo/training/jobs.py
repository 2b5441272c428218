"""What every data-set command shares (``scan``, ``bands``, ``probes``, ``strange``, ``exemplars``): its job
options, the data-parallel job it joins (one process, or one of several under ``torchrun``), the model with its
data, and the command line recorded in the card."""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..core.errors import DataError, WeightsError
from ..core.studies.distributed import Dist
from ..core.weights.cards import ModelCard
from ..core.weights.load import load_model
from .data import DEFAULT_CACHE_DIR, ImageSet, Normalise, load_data, subset

__all__ = ["add_job_options", "launch_command", "load_for_scan", "model_input", "start_job"]


def add_job_options(p: argparse.ArgumentParser, batch_size: int, *, data: bool = True) -> None:
    """``--batch-size``, ``--device``, ``--threads`` and, for a command that reads a data set, ``--cache-dir``."""
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default); under torchrun, cuda is "
                   "each process's LOCAL_RANK GPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: PyTorch's)")
    if data:
        p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="decoded-data cache (default: data/cache)")


def start_job(p: argparse.ArgumentParser, args: argparse.Namespace) -> Dist:
    """Set the CPU threads and join the job torchrun started (or be the one process); a bad device exits."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return Dist.from_env(args.device)
    except ValueError as exc:
        p.exit(2, f"error: {exc}\n")


def model_input(model: nn.Module, card: ModelCard, device: torch.device) -> Normalise:
    """uint8 batches -> the model's input on ``device``, with the card's mean and std."""
    in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    return Normalise(card.mean, card.std, in_channels, device, channels_last=False)


def launch_command(module: str, argv: Sequence[str]) -> str:
    """The command line that ran this process's job: ``python -m ...`` or, under torchrun, ``torchrun ...``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return shlex.join(["python", "-m", module, *argv])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = ["--nnodes", str(world // per_node)] if per_node != world else []
    return shlex.join(["torchrun", *nodes, "--nproc-per-node", str(per_node), "-m", module, *argv])


T = TypeVar("T")


def require_card(weights: Path, why: str) -> None:
    """WeightsError unless the model card ``<name>.json`` lies beside ``weights``; ``why`` the command needs it."""
    if not weights.with_suffix(".json").is_file():
        raise WeightsError(f"no model card {weights.with_suffix('.json')} beside {weights}: {why}")


def decoded_once(dist: Dist, load: Callable[[], T]) -> T:
    """``load()`` on rank 0 first, then on the others (which read the cache rank 0 wrote): a data set is
    decoded once however many processes need it."""
    if not dist.main:
        dist.barrier()
    try:
        return load()
    finally:
        if dist.main:
            dist.barrier()


def same_classes(data: ImageSet, card: ModelCard, spec: str) -> None:
    """DataError unless the data set ``spec`` names the card's classes, in its order."""
    if list(data.classes) != list(card.classes):
        raise DataError(f"the classes of {spec} {list(data.classes)} do not match the model card's {card.classes}")


def load_for_scan(args: argparse.Namespace, dist: Dist) -> tuple[nn.Module, ModelCard, ImageSet]:
    """The model (on ``dist.device``, eval mode), its card, and the data set whose classes it must share.

    Rank 0 decodes the data first and the others read its cache, so a data set is decoded once.

    Raises:
        WeightsError: no card beside the weights, or unreadable weights. DataError: the data set's classes
            differ from the card's, or it cannot be read.
    """
    weights = Path(args.weights)
    require_card(weights, "results are stored there")
    model, card = load_model(weights)
    data = decoded_once(dist, lambda: load_data(args.data, args.split, size=card.input_size,
                                                cache_dir=args.cache_dir, download=args.download))
    same_classes(data, card, args.data)
    return model.to(dist.device).eval(), card, subset(data, args.limit)
