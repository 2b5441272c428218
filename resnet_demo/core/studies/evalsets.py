"""The evaluation sets shipped beside the weights (``weights/evalset/*.npz``): small held-out test images.

The data-set views (block similarity over a data set) read them at run time; ``python -m
resnet_demo.training.evalset`` builds them. Images are stored exactly as the models were trained on them
(uint8, 32×32; MNIST digits already centred and white on black), so only normalisation remains.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import DataError
from ..weights.cards import CIFAR10, MNIST, WEIGHTS_DIR, ModelCard

__all__ = ["EVALSET_DIR", "EVALSETS", "EvalSet", "evalset_for", "load_evalset"]

EVALSET_DIR = WEIGHTS_DIR / "evalset"
EVALSETS = {CIFAR10.key: "cifar10_test500", MNIST.key: "mnist_test500"}  # preset -> its shipped evaluation set


class EvalSet(NamedTuple):
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    name: str


def load_evalset(name: str | Path) -> EvalSet:
    """A shipped evaluation set, by name (``"cifar10_test500"``, ``"mnist_test500"``) or ``.npz`` path.

    Raises:
        DataError: the file is missing or unreadable.
    """
    path = Path(name)
    if path.suffix != ".npz":
        path = EVALSET_DIR / f"{name}.npz"
    if not path.is_file():
        raise DataError(f"evaluation set {path} not found (build it with python -m resnet_demo.training.evalset)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return EvalSet(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]).long(),
                           [str(c) for c in z["classes"]], path.stem)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"evaluation set {path} could not be read ({exc})") from None


def evalset_for(card: ModelCard) -> str | None:
    """The shipped evaluation set of the data a model was trained on (by its classes and kind of input)."""
    for preset in (CIFAR10, MNIST):
        if list(card.classes) == list(preset.classes) and card.input_kind == preset.input_kind:
            return EVALSETS[preset.key]
    return None
