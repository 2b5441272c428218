"""The CIFAR-repo ResNet layout (kuangliu/pytorch-cifar's ResNet-18/34/50/101/152): torchvision's blocks under
other names.

Its network is torchvision's ResNet with a 3×3 stem at stride 1 and no max-pool: ``conv1``/``bn1``, ``layer1`` …
``layer4`` of ``BasicBlock``/``Bottleneck`` whose projection is ``shortcut.0`` (1×1 conv) and ``shortcut.1`` (BN),
and the head ``linear``. Its forward ends in ``avg_pool2d(out, 4)``, which on its 32×32 inputs is the global
average pool torchvision's ``avgpool`` is. Renamed to torchvision's names (``downsample``, ``fc``), the file is
read as the CIFAR-style stem on torchvision's blocks, and the capture sees torchvision's blocks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

__all__ = ["from_cifar_repo_keys", "looks_cifar_repo"]

V = TypeVar("V")
_SHORTCUT = re.compile(r"^(layer\d{1,4}\.\d{1,4}\.)shortcut\.")


def looks_cifar_repo(keys: Mapping[str, object]) -> bool:
    """Whether the keys are kuangliu/pytorch-cifar's: a ``linear`` head and ``layer<s>.<i>`` blocks, no ``fc``."""
    return "linear.weight" in keys and "fc.weight" not in keys and "conv1.weight" in keys and any(
        k.startswith("layer1.0.") for k in keys)


def from_cifar_repo_keys(sd: Mapping[str, V]) -> dict[str, V]:
    """``sd`` in torchvision's names: ``layer<s>.<i>.shortcut.{0,1}`` -> ``.downsample.``, ``linear`` -> ``fc``."""
    out = {}
    for key, value in sd.items():
        key = _SHORTCUT.sub(r"\1downsample.", key)
        out["fc." + key[len("linear."):] if key.startswith("linear.") else key] = value
    return out
