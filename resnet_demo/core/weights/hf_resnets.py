"""Hugging Face transformers' ResNets (``ResNetForImageClassification``, e.g. ``microsoft/resnet-50``): the config
from a ``config.json`` or, without one, from the weights' shapes; built by transformers; its preprocessing and
labels.

Keys: ``resnet.embedder.embedder.convolution.weight`` (the stem), ``resnet.encoder.stages.<s>.layers.<i>.layer.<j>``
(a block's branch) and ``...shortcut`` (its projection), ``classifier.1.weight``. A bare ``ResNetModel`` (no
``resnet.`` prefix, no classifier) gives no class scores and is refused with a sentence that says so.

transformers is imported only when a file is read as one of its models: importing it takes seconds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ..errors import WeightsError
from .exact import compare, expected_shapes, load_exact

__all__ = ["HFArch", "build_hf", "hf_labels", "hf_preprocessing", "looks_transformers", "recognise_hf"]

_STEM = "resnet.embedder.embedder.convolution.weight"
_HEAD = "classifier.1.weight"
_LAYER = re.compile(r"^resnet\.encoder\.stages\.(\d{1,4})\.layers\.(\d{1,4})\.layer\.(\d)\.convolution\.weight$")
# config.json fields that shape the network; anything else in the file is ignored
_FIELDS = ("num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type", "hidden_act",
           "downsample_in_first_stage", "downsample_in_bottleneck")
_MAX_STAGES, _MAX_BLOCKS, _MAX_WIDTH = 16, 1000, 65536


@dataclass(frozen=True)
class HFArch:
    """A transformers ResNet a state dict fits exactly: its config (keyword arguments of ``ResNetConfig``),
    one line for the page, and what was assumed."""

    config: dict[str, Any]
    num_labels: int
    description: str
    assumptions: tuple[str, ...] = ()


def looks_transformers(shapes: Mapping[str, Any]) -> bool:
    """Whether the key names are transformers' ResNet's (with or without its classifier)."""
    return any(k.startswith(("resnet.embedder.", "embedder.embedder.", "encoder.stages.")) for k in shapes)


def _from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``ResNetConfig`` arguments read from the weights, and what they cannot say."""
    convs: dict[tuple[int, int], dict[int, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if m := _LAYER.match(key):
            convs.setdefault((int(m.group(1)), int(m.group(2))), {})[int(m.group(3))] = shape
    stages = sorted({s for s, _ in convs})
    if not stages or stages != list(range(len(stages))) or len(stages) > _MAX_STAGES:
        raise WeightsError("its stages are not numbered 0, 1, 2 …")
    depths = [len({i for s2, i in convs if s2 == s}) for s in stages]
    first = [convs[(s, 0)] for s in stages]
    bottleneck = all(2 in layer for layer in first)
    hidden = [layer[max(layer)][0] for layer in first]
    stem = shapes[_STEM]
    projects_first = "resnet.encoder.stages.0.layers.0.shortcut.convolution.weight" in shapes
    config = {"num_channels": stem[1], "embedding_size": stem[0], "hidden_sizes": hidden, "depths": depths,
              "layer_type": "bottleneck" if bottleneck else "basic", "hidden_act": "relu",
              # a basic first stage whose widths match has a projection only when it strides
              "downsample_in_first_stage": not bottleneck and stem[0] == hidden[0] and projects_first,
              "downsample_in_bottleneck": False}
    assumed = ["the config was inferred from the weights (no config.json was given)", "ReLU activations"]
    if bottleneck:
        assumed.append("the stride in each bottleneck's 3×3 conv, as microsoft/resnet-* have it")
    return config, tuple(assumed)


def _from_config(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The network's fields of a ``config.json``, checked before anything is built from them."""
    from transformers.activations import ACT2FN

    if config.get("model_type") != "resnet":
        raise WeightsError(f"{source}: its config.json is for a {config.get('model_type')!r} model, not a ResNet")
    fields = {k: config[k] for k in _FIELDS if k in config}
    sizes, depths = fields.get("hidden_sizes", []), fields.get("depths", [])
    ints = [v for v in (*sizes, *depths, fields.get("embedding_size", 64), fields.get("num_channels", 3))]
    if (not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= _MAX_WIDTH for v in ints)
            or len(sizes) != len(depths) or not 0 < len(sizes) <= _MAX_STAGES or sum(depths) > _MAX_BLOCKS
            or fields.get("layer_type", "bottleneck") not in ("basic", "bottleneck")
            or fields.get("hidden_act", "relu") not in ACT2FN):
        raise WeightsError(f"{source}: its config.json does not describe a ResNet that can be built "
                           f"(hidden_sizes {sizes}, depths {depths})")
    return fields


@lru_cache(maxsize=32)
def _expected(frozen: tuple, num_labels: int) -> dict[str, tuple[int, ...]]:
    from transformers import ResNetConfig, ResNetForImageClassification

    with torch.device("meta"):
        model = ResNetForImageClassification(ResNetConfig(**dict(frozen), num_labels=num_labels))
    return expected_shapes(model)


def _freeze(config: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))


def recognise_hf(
    shapes: Mapping[str, tuple[int, ...]], *, config: Mapping[str, Any] | None = None, source: str = "the checkpoint"
) -> HFArch | None:
    """The transformers ResNet ``shapes`` fits exactly, or ``None`` when the keys are not transformers'.

    Args:
        shapes: the checkpoint's keys and shapes.
        config: its ``config.json``, when given; else the config is read from the shapes (and said so).
        source: what messages call the checkpoint.

    Raises:
        WeightsError: transformers' keys that fit no ResNetConfig (the sentence names the first key that does
            not fit), a ResNetModel without its classifier, or a config.json that is not a ResNet's.
    """
    if not looks_transformers(shapes):
        return None
    if _HEAD not in shapes or _STEM not in shapes:
        raise WeightsError(f"{source} is a transformers ResNetModel without its classifier (no 'classifier.1.weight'"
                           "): it gives no class scores; save ResNetForImageClassification's weights instead")
    if config is not None:
        fields, assumed, how = _from_config(config, source), (), "its config.json"
    else:
        fields, assumed = _from_shapes(shapes)
        how = "a config inferred from its weights"
    num_labels = shapes[_HEAD][0]
    _, problem = compare(_expected(_freeze(fields), num_labels), shapes)
    if problem is not None:
        raise WeightsError(f"{source} has transformers' ResNet keys but does not fit {how}: {problem}")
    widths = "/".join(str(w) for w in fields.get("hidden_sizes", []))
    kind = fields.get("layer_type", "bottleneck")
    text = (f"transformers ResNetForImageClassification, {kind} blocks {fields.get('depths')} at {widths} channels "
            f"({'config from config.json' if config is not None else 'config inferred from the weights'})")
    return HFArch(fields, num_labels, text, assumed)


@lru_cache(maxsize=1)
def _classifier_class() -> type:
    from transformers import ResNetForImageClassification

    class ResNetClassifier(ResNetForImageClassification):
        """transformers' model, answering logits: ``forward`` returns ``.logits``, ``forward_head`` pools and
        classifies any last-stage feature map (what the per-block readout needs) and ``num_features`` is the width
        it takes, as timm's models have them."""

        @property
        def num_features(self) -> int:
            return int(self.config.hidden_sizes[-1])

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(pixel_values).logits

        def forward_head(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.resnet.pooler(x))

    return ResNetClassifier


def build_hf(arch: HFArch, sd: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """transformers' ``ResNetForImageClassification`` (returning logits) for ``arch``, ``sd`` loaded strictly."""
    from transformers import ResNetConfig

    with torch.device("cpu"):
        model = _classifier_class()(ResNetConfig(**arch.config, num_labels=arch.num_labels))
    return load_exact(model, sd, source, "this transformers ResNet")


def hf_preprocessing(preprocessor: Mapping[str, Any] | None, source: str) -> dict[str, Any] | None:
    """Size, mean and std from a ``preprocessor_config.json`` (ConvNeXt's image processor, which microsoft/resnet-*
    use: below 384 pixels the short side is resized to ``size / crop_pct`` and the centre cropped to ``size``);
    ``None`` without one.

    Raises:
        WeightsError: sizes or statistics that are not numbers in range.
    """
    if preprocessor is None:
        return None
    size = preprocessor.get("size", 224)
    if isinstance(size, Mapping):
        size = size.get("shortest_edge", size.get("height", 224))
    crop_pct = preprocessor.get("crop_pct") or 1.0
    mean = preprocessor.get("image_mean", [0.485, 0.456, 0.406])
    std = preprocessor.get("image_std", [0.229, 0.224, 0.225])
    lists = isinstance(mean, list) and isinstance(std, list) and 1 <= len(mean) == len(std) <= 4
    numbers = [size, crop_pct, *mean, *std] if lists else [None]
    if (not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
            or not 8 <= size <= 1024 or not 0.1 <= crop_pct <= 1 or min(std) <= 0):
        raise WeightsError(f"{source}: its preprocessor_config.json has sizes or statistics out of range")
    size = int(size)
    resize = int(size / crop_pct) if size < 384 else size
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(preprocessor.get("resample"), "bilinear")
    return {"input_size": size, "resize": resize, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "interpolation": resample, "crop_pct": float(crop_pct)}


def hf_labels(config: Mapping[str, Any] | None, num_labels: int) -> list[str] | None:
    """Class names from a config.json's ``id2label`` (indices 0 … n-1), ``None`` without real ones (transformers
    writes ``LABEL_0`` … when nobody named them)."""
    id2label = (config or {}).get("id2label")
    if not isinstance(id2label, Mapping) or len(id2label) != num_labels:
        return None
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    names = [by_index.get(i) for i in range(num_labels)]
    if None in names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names
