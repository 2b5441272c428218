"""The project's own weights files: their sha256, writing them (with the card beside them), and reading one.

Shipped weights are ``weights/<name>.safetensors`` with the model card ``weights/<name>.json`` beside them.
Reading goes through the one bounded reader (:func:`~.reader.read_checkpoint`), whatever the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .cards import ModelCard
from .reader import read_checkpoint

__all__ = ["file_sha256", "load_state_dict_file", "save_weights"]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a weights file, read by the one bounded reader; errors name the file by its path."""
    return read_checkpoint(path, source=f"weights file {path}")


def save_weights(model: nn.Module, card: ModelCard, path: str | Path, *, half: bool = True) -> ModelCard:
    """Write ``path`` (safetensors, fp16 by default) and its card beside it; returns the card with its sha256.

    BN running statistics are kept in fp32: their variances can leave fp16's range, and they are tiny.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point() and not key.endswith(("running_mean", "running_var")):
            value = value.half()
        tensors[key] = value
    save_file(tensors, str(path))
    card.weights_sha256 = file_sha256(path)
    card.write(path.with_suffix(".json"))
    return card
