"""Lightning checkpoints (and any training code that keeps the network as an attribute): where in the state dict
the model sits.

A ``.ckpt`` holds ``{"state_dict": {...}, "optimizer_states": [...], "pytorch-lightning_version": ...}``; the reader
keeps the ``state_dict``, whose keys carry the attribute the LightningModule keeps its network under: ``model.``,
``net.``, ``backbone.``, ``model.backbone.`` … :func:`model_prefixes` lists the prefixes under which a whole
network's keys sit (a stem weight and a classifier weight both below it), most keys first; a caller tries each,
and keys outside the chosen prefix (a loss's weights, an EMA copy) are left out and said so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

__all__ = ["STEMS", "model_prefixes", "under"]

V = TypeVar("V")
# The first weight of every layout read here, and its classifier's: torchvision, timm, the CIFAR repo, this
# project (and the tutorial's Net), timm's ResNetV2, transformers.
STEMS = ("conv1.weight", "conv1.0.weight", "stem.conv.weight", "stem.conv1.weight",
         "resnet.embedder.embedder.convolution.weight")
HEADS = ("fc.weight", "linear.weight", "head.fc.weight", "classifier.1.weight")


def model_prefixes(keys: Mapping[str, object]) -> list[str]:
    """Non-empty prefixes (ending in ``.``) under which a network's stem and classifier weights both sit, the one
    with most keys below it first (ties: the one met first in the file)."""
    found: dict[str, int] = {}
    for key in keys:
        for stem in STEMS:
            if key.endswith("." + stem):
                prefix = key[: -len(stem)]
                if any(prefix + head in keys for head in HEADS):
                    found.setdefault(prefix, 0)
    if not found:
        return []
    for key in keys:
        for prefix in found:
            if key.startswith(prefix):
                found[prefix] += 1
    return sorted(found, key=lambda p: -found[p])


def under(sd: Mapping[str, V], prefix: str) -> tuple[dict[str, V], list[str]]:
    """The entries of ``sd`` below ``prefix`` with it removed, and the keys left out."""
    inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return inside, [k for k in sd if not k.startswith(prefix)]
