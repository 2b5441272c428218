"""timm's ResNets (resnet*, resnet*d/t/s/c, seresnet*, ecaresnet*, resnext*, wide_resnet*, resnetrs*, resnetv2_*):
which one a state dict is, built by timm itself, with timm's preprocessing and label names.

:func:`recognise_timm` compares a file's keys and shapes with timm's own models, built on the meta device (no
memory, no initialisation). The candidates are every model of timm's ``resnet`` and ``resnetv2`` modules whose
depth fits the file's block count, most alike by name first (a file with SE modules tries ``seresnet*`` first),
so a file usually costs one or two cheap builds. A timm ``config.json`` (what the Hub holds beside the weights)
names the model exactly and is taken at its word, once the weights fit it.

The weights cannot tell apart two variants whose differences have no parameters (``resnet50`` and
``resnetaa50``: an anti-aliasing avg-pool); the shorter name is taken and the description says so.

timm is imported only when a file is read as a timm model: importing it takes seconds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import WeightsError
from .exact import compare, expected_shapes, load_exact

__all__ = [
    "TimmArch", "build_timm", "looks_timm", "recognise_timm", "timm_labels", "timm_preprocessing", "timm_signs",
]

_LAYER = re.compile(r"^layer(\d{1,4})\.(\d{1,4})\.")  # timm ResNet: layer<stage>.<index>.
_V2 = re.compile(r"^stages\.(\d{1,4})\.blocks\.(\d{1,4})\.")  # timm ResNetV2: stages.<i>.blocks.<j>.
_DEPTH = re.compile(r"(\d+)")
_MODULES = {"resnet": ("fc.weight", ("conv1.weight", "conv1.0.weight")),
            "resnetv2": ("head.fc.weight", ("stem.conv.weight", "stem.conv1.weight"))}


@dataclass(frozen=True)
class TimmArch:
    """A timm model a state dict fits exactly.

    Attributes:
        name: timm's model name (``resnet50d``).
        num_classes: the classifier's width.
        in_chans: the first conv's input channels.
        description: one line for the page.
        pretrained_cfg: timm's preprocessing and labels from a ``config.json``, when one was given.
    """

    name: str
    num_classes: int
    in_chans: int
    description: str
    pretrained_cfg: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class _Features:
    """What a file's key names say, to try the most alike timm names first."""

    module: str  # "resnet" or "resnetv2"
    depth: int  # layers with weights: 2 + blocks x (2 or 3)
    num_classes: int
    in_chans: int
    deep: bool  # a stem of three 3x3 convs (the d/t/s/c variants)
    se: bool
    eca: bool
    grouped: bool


def looks_timm(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether the key names are those of a timm ResNet or ResNetV2 (also torchvision's: timm uses its names)."""
    return _features(shapes) is not None


def timm_signs(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether the keys have what only timm's ResNets have: its deep stem's BN at ``conv1.1``, SE or ECA modules, an
    avg-pool shortcut (its conv at ``downsample.1``), or ResNetV2's ``stages.<i>.blocks.<j>``."""
    return any(k == "conv1.1.running_mean" or ".se." in k or k.endswith(".downsample.2.running_mean")
               or _V2.match(k) for k in shapes)


def _features(shapes: Mapping[str, tuple[int, ...]]) -> _Features | None:
    for module, (head, stems) in _MODULES.items():
        stem = next((k for k in stems if k in shapes), None)
        pattern = _LAYER if module == "resnet" else _V2
        blocks = {m.groups() for k in shapes if (m := pattern.match(k))}
        if stem is None or head not in shapes or not blocks or len(shapes[head]) not in (2, 4):
            continue
        bottleneck = any(".conv3." in k for k in shapes)
        conv2 = next((shapes[k] for k in shapes if pattern.match(k) and k.endswith(".conv2.weight")), (1, 1))
        conv1 = next((shapes[k] for k in shapes if pattern.match(k) and k.endswith(".conv1.weight")), (1, 1))
        return _Features(module, 2 + len(blocks) * (3 if bottleneck else 2), shapes[head][0], shapes[stem][1],
                         deep=stem in ("conv1.0.weight", "stem.conv1.weight"),
                         se=any(".se.fc1." in k or ".se.fc." in k for k in shapes),
                         eca=any(".se.conv." in k for k in shapes),
                         grouped=bottleneck and len(conv2) == 4 and conv2[1] * 2 <= conv1[0])
    return None


def _name_features(name: str) -> tuple[bool, bool, bool, bool]:
    """(deep stem, SE, ECA, grouped) as timm's naming suggests them: only an order to try names in."""
    after = re.search(r"\d+([a-z]?)", name)
    deep = (after is not None and after.group(1) in ("d", "t", "s", "c")) or name.startswith("resnetrs")
    return deep, name.startswith(("se", "resnetrs")), name.startswith("eca"), "resnext" in name


@lru_cache(maxsize=2)
def _names(module: str) -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models(module=module))


def _candidates(f: _Features) -> list[str]:
    def near(name: str) -> bool:
        m = _DEPTH.search(name.replace("resnetv2_", ""))
        return m is None or abs(int(m.group(1)) - f.depth) <= 3  # resnetrs420 has 419 layers with weights

    def order(name: str) -> tuple[int, int, str]:
        agree = sum(a == b for a, b in zip(_name_features(name), (f.deep, f.se, f.eca, f.grouped)))
        return -agree, len(name), name

    return sorted((n for n in _names(f.module) if near(n)), key=order)


class _NoInit(TorchFunctionMode):
    """Skips in-place initialisers (``normal_``, ``fill_`` ...) of meta tensors: on the meta device they do nothing
    but cost two thirds of building a model. Torch function modes are per thread: other threads are untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


@lru_cache(maxsize=256)
def _expected(name: str, num_classes: int, in_chans: int) -> dict[str, tuple[int, ...]]:
    import timm

    with _NoInit():
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, device="meta")
    return expected_shapes(model)


def _config_name(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """timm's model name and pretrained_cfg from a ``config.json`` (its nested form or the older flat one)."""
    cfg = dict(config.get("pretrained_cfg") or {k: v for k, v in config.items() if k != "architecture"})
    for key in ("num_classes", "label_names", "label_descriptions"):
        if key in config:
            cfg[key] = config[key]
    if "labels" in cfg:
        cfg["label_names"] = cfg.pop("labels")
    return str(config.get("architecture", "")), cfg


def recognise_timm(
    shapes: Mapping[str, tuple[int, ...]], *, config: Mapping[str, Any] | None = None, source: str = "the checkpoint",
    said: str = "its timm config.json",
) -> TimmArch | None:
    """The timm ResNet whose keys and shapes ``shapes`` has exactly, or ``None`` (no timm ResNet fits).

    Args:
        shapes: the checkpoint's keys and shapes.
        config: timm's ``config.json`` beside the weights (``architecture``, ``pretrained_cfg``): only that
            model is considered.
        source: what messages call the checkpoint.
        said: what messages call whatever named the model in ``config`` (a person's choice, not a file).

    Raises:
        WeightsError: ``config`` names a model that is no timm ResNet, or that the weights do not fit.
    """
    f = _features(shapes)
    if config is not None and config.get("architecture"):
        name, cfg = _config_name(config)
        if f is None or name not in _names(f.module):
            raise WeightsError(f"{source}: {said} names {name!r}, which is not a timm ResNet read here")
        _, problem = compare(_expected(name, f.num_classes, f.in_chans), shapes)
        short = said.replace(" timm ", " ")
        if problem is not None:
            raise WeightsError(f"{source} does not fit timm {name}, as {short} says: {problem}")
        return TimmArch(name, f.num_classes, f.in_chans, f"timm {name} (as {short} says)", cfg)
    if f is None:
        return None
    for name in _candidates(f):
        if compare(_expected(name, f.num_classes, f.in_chans), shapes)[1] is None:
            return TimmArch(name, f.num_classes, f.in_chans,
                            f"timm {name} (recognised from the weights; variants that differ only in layers without "
                            f"weights, such as anti-aliased ones, would look the same)")
    return None


def build_timm(arch: TimmArch, sd: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """timm's own model for ``arch`` (``pretrained=False``: nothing is downloaded), with ``sd`` loaded strictly."""
    import timm

    with torch.device("cpu"):
        model = timm.create_model(arch.name, pretrained=False, num_classes=arch.num_classes, in_chans=arch.in_chans)
    if arch.pretrained_cfg:
        model.pretrained_cfg = {**model.pretrained_cfg, **arch.pretrained_cfg}
    return load_exact(model, sd, source, f"timm {arch.name}")


def timm_preprocessing(model: nn.Module) -> dict[str, Any]:
    """timm's evaluation preprocessing for ``model`` (``resolve_data_config`` of its ``pretrained_cfg``).

    Returns:
        ``input_size`` (the crop's side), ``resize`` (the short side before the crop: the size over
        ``crop_pct``, floored, as timm's eval transform does), ``mean``, ``std``, ``interpolation``, ``crop_pct``.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    return {"input_size": size, "resize": math.floor(size / crop_pct), "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]], "interpolation": str(cfg.get("interpolation", "bilinear")),
            "crop_pct": crop_pct}


def timm_labels(model: nn.Module, num_classes: int) -> tuple[list[str] | None, str]:
    """The class names timm knows for ``model``'s head, and the data set's name; ``(None, "")`` when it knows none.

    From the ``pretrained_cfg``'s ``label_names`` (with ``label_descriptions``) when a config.json gave them,
    else ImageNet's (1k, 11k or 22k, by the head's width) from the synset files timm ships.
    """
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    names = cfg.get("label_names")
    if isinstance(names, list) and len(names) == num_classes:
        described = cfg.get("label_descriptions") or {}
        return [str(described.get(n, n)) for n in names], ""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({**cfg, "num_classes": num_classes})
    if subset is None:
        return None, ""
    info = ImageNetInfo(subset)
    if info.num_classes() != num_classes:
        return None, ""
    return list(info.label_descriptions()), {"imagenet-1k": "ImageNet-1k"}.get(subset, subset)
