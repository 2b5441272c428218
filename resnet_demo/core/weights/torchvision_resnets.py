"""torchvision ResNets (ResNet-18 ... 152, Wide ResNet, ResNeXt): building them, their ImageNet card, and
torchvision's published weights.

The capture needs nothing from this module: :func:`~resnet_demo.core.capture.find_blocks` recognises
torchvision's ``BasicBlock`` and ``Bottleneck`` by walking ``named_modules()``. A user's checkpoint of one of
these networks is read, recognised and fitted like any other (:func:`~.load.open_checkpoint`); this module
builds the networks (never downloading anything), with the stem the checkpoint has: torchvision's 7×7 stem
at stride 2 and its max-pool, or the 3×3 stem at stride 1 without a max-pool that CIFAR code puts on
torchvision's blocks. It also writes the ImageNet model card (resize 256, centre crop 224, ImageNet mean/std,
the 1000 class names shipped in ``imagenet_classes.txt``).

Only :func:`published_torchvision` with ``download=True`` touches the network: it fetches torchvision's
published ImageNet weights (the ``DEFAULT`` tag) through torchvision's cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .cards import IMAGENET, ModelCard, WeightsError, imagenet_classes

__all__ = [
    "EXTRA_ARCHS",
    "SUPPORTED_ARCHS",
    "TORCHVISION_ARCHS",
    "build_torchvision",
    "imagenet_card",
    "normalise_arch",
    "published_torchvision",
]

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Same torchvision ResNet class and Bottleneck block, only wider or grouped: the capture works unchanged.
EXTRA_ARCHS = ("wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")
SUPPORTED_ARCHS = TORCHVISION_ARCHS + EXTRA_ARCHS


def normalise_arch(arch: str) -> str:
    """``arch`` as torchvision names it (``ResNet-50`` -> ``resnet50``).

    Raises:
        ValueError: not one of :data:`SUPPORTED_ARCHS`.
    """
    key = str(arch).strip().lower().replace("-", "")
    if key not in SUPPORTED_ARCHS:
        raise ValueError(f"unknown torchvision architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    return key


def build_torchvision(
    arch: str, num_classes: int = 1000, *, in_channels: int = 3, stem_kernel: int = 7, maxpool: bool = True
) -> nn.Module:
    """A randomly initialised torchvision ResNet (``weights=None``: nothing is downloaded), in eval mode.

    Args:
        arch: one of :data:`SUPPORTED_ARCHS`.
        num_classes: the classifier's width.
        in_channels: the first conv's input channels (torchvision always builds 3).
        stem_kernel: 7 for torchvision's stem (7×7, stride 2, padding 3); 3 for the CIFAR-style stem (3×3,
            stride 1, padding 1).
        maxpool: keep the max-pool after the stem (torchvision's), or replace it by the identity.

    Raises:
        ValueError: ``arch`` is not one of :data:`SUPPORTED_ARCHS`, ``num_classes`` or ``in_channels`` < 1,
            or ``stem_kernel`` is neither 3 nor 7.
    """
    import torchvision.models as tvm

    arch = normalise_arch(arch)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if stem_kernel not in (3, 7):
        raise ValueError(f"stem_kernel must be 7 (torchvision's stem) or 3 (CIFAR-style), got {stem_kernel}")
    model = tvm.get_model(arch, weights=None, num_classes=int(num_classes))
    if (in_channels, stem_kernel) != (3, 7):
        stride, padding = (2, 3) if stem_kernel == 7 else (1, 1)
        model.conv1 = nn.Conv2d(int(in_channels), model.conv1.out_channels, kernel_size=stem_kernel, stride=stride,
                                padding=padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    if not maxpool:
        model.maxpool = nn.Identity()
    return model.eval()


# --- the model card ---------------------------------------------------------------------------------


def imagenet_card(arch: str, name: str | None = None, *, trained: bool = True) -> ModelCard:
    """The card of a torchvision ResNet trained on ImageNet-1k (the :data:`~.cards.IMAGENET` preset)."""
    arch = normalise_arch(arch)
    return ModelCard.from_preset(
        IMAGENET, name or arch, classes=imagenet_classes(), arch=arch, config=None, trained=trained
    )


# --- torchvision's published weights -----------------------------------------------------------------


def published_torchvision(
    arch: str, *, download: bool = False, classes: Sequence[str] | None = None
) -> tuple[nn.Module, ModelCard]:
    """torchvision ``arch`` with torchvision's published ``DEFAULT`` ImageNet weights; ``(model, card)``, on the CPU.

    Args:
        arch: one of :data:`SUPPORTED_ARCHS`.
        download: must be true: fetching needs internet the first time (the file is then cached under
            ``torch.hub.get_dir()``). Without it nothing is ever downloaded and the answer is an error that
            says how to give a weights file instead.
        classes: names for the 1000 classes instead of ImageNet's.

    Raises:
        ValueError: unknown ``arch``.
        WeightsError: no ``download``; the download failed; ``classes`` is not 1000 names long.
    """
    import torchvision.models as tvm

    arch = normalise_arch(arch)
    if not download:
        raise WeightsError(
            f"torchvision {arch} needs a weights file (--weights path/to/{arch}.pth or .safetensors), "
            f"or --download-weights to fetch torchvision's published ImageNet weights (needs internet)"
        )
    weights = tvm.get_model_weights(arch).DEFAULT
    try:
        sd = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, hash mismatch, disk full ...
        raise WeightsError(
            f"could not download torchvision's published weights for {arch} ({weights}) from {weights.url}: "
            f"{type(exc).__name__}: {exc}. Run once on a machine with internet (the file is cached under "
            f"{torch.hub.get_dir()}), or pass a weights file with --weights."
        ) from None
    card = imagenet_card(arch, name=f"{arch} ({weights.name.lower()})")
    transforms = weights.transforms()
    card.resize = int(transforms.resize_size[0])
    card.input_size = int(transforms.crop_size[0])
    card.metrics = dict(weights.meta.get("_metrics", {}).get("ImageNet-1K", {}))
    card.training = {"source": f"torchvision {weights}", "url": weights.url, "recipe": weights.meta.get("recipe", "")}
    if list(weights.meta.get("categories", [])) != card.classes:
        card.classes = list(weights.meta["categories"])
    if classes is not None:
        if len(classes) != len(card.classes):
            raise WeightsError(
                f"{len(classes)} class names were given, but torchvision's published {arch} has "
                f"{len(card.classes)} classes"
            )
        card.classes, card.dataset = list(classes), ""
    model = build_torchvision(arch)
    try:
        model.load_state_dict(sd, strict=True)  # torchvision's own file, its hash checked: its own layout
    except RuntimeError as exc:
        raise WeightsError(f"torchvision's published weights for {arch} do not fit its model ({exc})") from None
    return model.eval().cpu(), card
