"""torchvision ResNets (ResNet-18 ... 152, Wide ResNet, ResNeXt) with the user's own weights.

The capture needs nothing from this module: :func:`~resnet_demo.core.capture.find_blocks` recognises
torchvision's ``BasicBlock`` and ``Bottleneck`` by walking ``named_modules()``. This module builds the
networks (never downloading anything unless asked to), reads a user's weights file (a
``torch.save(state_dict)`` file or a safetensors file), checks that it fits the chosen architecture and
says which architecture it does fit when it does not, and writes the ImageNet model card (resize 256,
centre crop 224, ImageNet mean/std, the 1000 class names shipped in ``imagenet_classes.txt``).

Only :func:`load_torchvision` with ``download=True`` and no weights file touches the network: it
fetches torchvision's published ImageNet weights (the ``DEFAULT`` tag) through torchvision's cache.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import torch
from torch import nn

from .cards import IMAGENET, ModelCard, WeightsError, imagenet_classes, numbered_classes, read_class_names
from .files import file_sha256, load_state_dict_file, load_weights_into

__all__ = [
    "EXTRA_ARCHS",
    "SUPPORTED_ARCHS",
    "TORCHVISION_ARCHS",
    "build_torchvision",
    "describe_state_dict",
    "fit_torchvision_weights",
    "guess_arch",
    "imagenet_card",
    "load_torchvision",
]

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Same torchvision ResNet class and Bottleneck block, only wider or grouped: the capture works unchanged.
EXTRA_ARCHS = ("wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")
SUPPORTED_ARCHS = TORCHVISION_ARCHS + EXTRA_ARCHS



def _normalise_arch(arch: str) -> str:
    key = str(arch).strip().lower().replace("-", "")
    if key not in SUPPORTED_ARCHS:
        raise ValueError(f"unknown torchvision architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    return key


def build_torchvision(arch: str, num_classes: int = 1000) -> nn.Module:
    """A randomly initialised torchvision ResNet (``weights=None``: nothing is downloaded), in eval mode.

    Raises:
        ValueError: ``arch`` is not one of :data:`SUPPORTED_ARCHS`, or ``num_classes`` < 1.
    """
    import torchvision.models as tvm

    arch = _normalise_arch(arch)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return tvm.get_model(arch, weights=None, num_classes=int(num_classes)).eval()


# --- the model card ---------------------------------------------------------------------------------


def imagenet_card(arch: str, name: str | None = None, *, trained: bool = True) -> ModelCard:
    """The card of a torchvision ResNet trained on ImageNet-1k (the :data:`~.cards.IMAGENET` preset)."""
    arch = _normalise_arch(arch)
    return ModelCard.from_preset(
        IMAGENET, name or arch, classes=imagenet_classes(), arch=arch, config=None, trained=trained
    )


# --- recognising a state dict ----------------------------------------------------------------------


@cache
def _reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``arch``'s state dict, without the classifier (built on the meta device: no memory, no init)."""
    import torchvision.models as tvm

    with torch.device("meta"):
        model = tvm.get_model(arch, weights=None)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _strip_optional(keys) -> set[str]:
    # BN's num_batches_tracked is absent from older checkpoints (torchvision's own V1 files) and unused in eval.
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def guess_arch(sd: dict[str, torch.Tensor]) -> str | None:
    """The supported architecture whose keys and shapes ``sd`` has exactly (any classifier width), or ``None``."""
    keys = _strip_optional(k for k in sd if not k.startswith("fc."))
    if "layer1.0.conv1.weight" not in sd:
        return None
    for arch in SUPPORTED_ARCHS:
        ref = _reference_shapes(arch)
        if keys == _strip_optional(ref) and all(tuple(sd[k].shape) == ref[k] for k in keys):
            return arch
    return None


def _blocks_per_stage(sd: dict) -> list[int]:
    counts = []
    for stage in range(1, 10):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"^layer{stage}\.(\d+)\.", k))}
        if not idx:
            break
        counts.append(max(idx) + 1)
    return counts


def describe_state_dict(sd: dict[str, torch.Tensor]) -> str:
    """A short description of what network ``sd`` seems to come from, for error messages."""
    arch = guess_arch(sd)
    if arch is not None:
        fc = sd.get("fc.weight")
        classes = f" with {fc.shape[0]} classes" if fc is not None and fc.ndim == 2 else ""
        return f"a torchvision {arch} checkpoint{classes}"
    if "res1.conv1.weight" in sd or any(k.startswith("stages.") for k in sd):
        return "a checkpoint of the tutorial's Net or of this project's own ResNet: load it without --arch"
    if any(k.startswith(("resnet.embedder", "embedder.", "encoder.stages")) for k in sd):
        return "a Hugging Face transformers ResNet checkpoint (its key names are not torchvision's)"
    if "layer1.0.conv1.weight" in sd:
        kind = "Bottleneck" if "layer1.0.conv3.weight" in sd else "BasicBlock"
        return (
            f"a torchvision-style ResNet with {kind} blocks {_blocks_per_stage(sd)} per stage, "
            f"which is none of {', '.join(SUPPORTED_ARCHS)}"
        )
    sample = ", ".join(f"'{k}'" for k in list(sd)[:3])
    return f"not a torchvision ResNet checkpoint (its first keys are {sample})"


def _num_classes(sd: dict) -> int | None:
    fc = sd.get("fc.weight")
    return int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.ndim == 2 and fc.shape[0] > 0 else None


def fit_torchvision_weights(model: nn.Module, sd: dict[str, torch.Tensor], arch: str, source: str) -> nn.Module:
    """Check ``sd`` against ``model`` (a torchvision ``arch``) and copy it in.

    Missing BN ``num_batches_tracked`` counters (older checkpoints lack them; eval never reads them) are
    filled in. Every other missing, unexpected or mis-shaped key is an error.

    Raises:
        WeightsError: naming ``source`` and ``arch``, the first offending key, and the architecture the
            file does seem to be, with the ``--arch`` to use for it.
    """
    sd = dict(sd)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros_like(value)
    try:
        return load_weights_into(model, sd, source=source)
    except WeightsError as exc:
        detail = str(exc)
        for prefix in (f"{source} does not fit this model: ", f"{source}: "):
            if detail.startswith(prefix):
                detail = detail[len(prefix) :]
                break
        guess = guess_arch(sd)
        if guess == arch:  # the right architecture, but e.g. NaN values
            raise WeightsError(f"{source} has the layout of torchvision {arch}, but {detail}") from None
        if guess is not None:
            hint = f"it looks like a {guess} checkpoint: try --arch {guess}"
        else:
            hint = f"it looks like {describe_state_dict(sd)}"
        raise WeightsError(f"{source} does not fit torchvision {arch}: {detail} ({hint})") from None


# --- loading -----------------------------------------------------------------------------------------


def _download_state_dict(arch: str) -> tuple[dict, ModelCard]:
    """torchvision's published ``DEFAULT`` ImageNet weights for ``arch`` (through its cache), and their card."""
    import torchvision.models as tvm

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
    card.metrics = {k: v for k, v in weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).items()}
    card.training = {"source": f"torchvision {weights}", "url": weights.url, "recipe": weights.meta.get("recipe", "")}
    if list(weights.meta.get("categories", [])) != card.classes:
        card.classes = list(weights.meta["categories"])
    return sd, card


def load_torchvision(
    arch: str,
    weights: str | Path | None,
    *,
    download: bool = False,
    classes: str | Path | None = None,
) -> tuple[nn.Module, ModelCard]:
    """Build torchvision ``arch`` and load ``weights`` into it; returns ``(model, card)``, eval mode, on the CPU.

    Args:
        arch: one of :data:`SUPPORTED_ARCHS` (``resnet18`` ... ``resnet152``, Wide ResNet, ResNeXt).
        weights: a ``torch.save(model.state_dict())`` file (``.pth``/``.pt``, read with
            ``weights_only=True``) or a ``.safetensors`` file, with torchvision's key names. A
            fine-tune with another classifier width is fine: the class count is read from ``fc.weight``.
        download: with ``weights=None``, fetch torchvision's published ImageNet weights (needs internet
            the first time). Without it nothing is ever downloaded.
        classes: class-names file (one per line, or JSON); by default the ImageNet names for a
            1000-class classifier and ``class 0``, ``class 1`` ... otherwise.

    Raises:
        ValueError: unknown ``arch``.
        WeightsError: no weights and no ``download``; an unreadable file; weights that do not fit
            ``arch`` (the message names the file and the arch and suggests the right ``--arch``);
            a class-names file whose length differs from the classifier's.
    """
    arch = _normalise_arch(arch)
    if weights is None:
        if not download:
            raise WeightsError(
                f"torchvision {arch} needs a weights file (--weights path/to/{arch}.pth or .safetensors), "
                f"or --download-weights to fetch torchvision's published ImageNet weights (needs internet)"
            )
        sd, card = _download_state_dict(arch)
        source = f"torchvision's published weights for {arch}"
    else:
        path = Path(weights)
        source = f"weights file {path}"
        sd = load_state_dict_file(path)
        card = imagenet_card(arch, name=path.stem)
        card.weights_sha256 = file_sha256(path)
        card.training = {"source": str(path)}
    num_classes = _num_classes(sd) or 1000
    if classes is not None:
        names = read_class_names(classes)
        if len(names) != num_classes:
            raise WeightsError(
                f"class-names file {classes} lists {len(names)} classes, but {source} has a classifier "
                f"(fc.weight) for {num_classes}"
            )
        card.classes = names
    elif num_classes != len(card.classes):
        card.classes = numbered_classes(num_classes)
        card.dataset = ""
    model = build_torchvision(arch, num_classes=num_classes)
    fit_torchvision_weights(model, sd, arch, source)
    return model.eval().cpu(), card
