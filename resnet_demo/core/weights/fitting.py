"""Fitting a state dict to a model: build what the recogniser said, copy every tensor in after checking it.

- :func:`build_recognised` makes the model an :class:`~.recognise.Architecture` describes (this project's
  ResNet, or a torchvision ResNet with the checkpoint's stem, input channels and classifier width).
- :func:`fit_recognised` checks every key and shape against that architecture (in the tutorial's key names
  when the checkpoint uses them), refuses non-finite weights, and copies the state dict in.
- :func:`load_weights_into` is the copy itself, for a model and a state dict already known to belong
  together (this project's own files, the tutorial's ``Net`` keys renamed by :func:`from_tutorial_keys`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import WeightsError
from ..model import TUTORIAL_CONFIG, ResNetConfig, build_model
from .exact import non_finite
from .reader import strip_prefixes
from .recognise import Architecture, compare_shapes, expected_shapes, tutorial_key_map
from .torchvision_resnets import build_torchvision

__all__ = [
    "build_recognised",
    "fit_recognised",
    "from_tutorial_keys",
    "is_tutorial_state_dict",
    "load_weights_into",
    "tutorial_key_map",
]


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word if n == 1 else word + 's'}"


# --- the tutorial's key names ----------------------------------------------------------------------------


def is_tutorial_state_dict(sd: Mapping) -> bool:
    return "res1.conv1.weight" in sd and "conv1.weight" in sd


def _rename(sd: Mapping, mapping: dict[str, str]) -> dict:
    out = {}
    for key, value in sd.items():
        prefix, _, leaf = key.rpartition(".")
        out[f"{mapping.get(prefix, prefix)}.{leaf}"] = value
    return out


def from_tutorial_keys(sd: Mapping, config: ResNetConfig = TUTORIAL_CONFIG) -> dict:
    """Rename a state dict saved from the tutorial's ``Net`` to the project's module names."""
    inverse = {v: k for k, v in tutorial_key_map(config).items()}
    return _rename(sd, inverse)


# --- copying ---------------------------------------------------------------------------------------------


def load_weights_into(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "weights") -> nn.Module:
    """Copy ``sd`` into ``model`` after checking every key and shape; fp16 tensors become the model's dtype.

    Raises:
        WeightsError: naming ``source`` and the first missing, unexpected or mismatched key, or a key with NaN or
            infinite values. When ``sd`` uses the tutorial's key names, so does the message.
    """
    config = getattr(model, "config", None)
    tutorial = isinstance(config, ResNetConfig) and is_tutorial_state_dict(sd)
    to_file_name = (lambda k: k) if not tutorial else (lambda k: _rename({k: 0}, tutorial_key_map(config)).popitem()[0])
    if tutorial:
        sd = from_tutorial_keys(sd, config)
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in sd:
            raise WeightsError(
                f"{source} does not fit this model: missing key '{to_file_name(key)}' "
                f"(expected a tensor of shape {list(ref.shape)})"
            )
        if sd[key].shape != ref.shape:
            raise WeightsError(
                f"{source} does not fit this model: key '{to_file_name(key)}' has shape "
                f"{list(sd[key].shape)}, expected {list(ref.shape)}"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise WeightsError(f"{source} does not fit this model: unexpected key '{to_file_name(extra[0])}'")
    converted = {}
    for key, ref in expected.items():
        value = sd[key].to(ref.dtype)
        if ref.is_floating_point() and non_finite(value):
            raise WeightsError(f"{source}: key '{to_file_name(key)}' holds NaN or infinite values")
        converted[key] = value
    model.load_state_dict(converted, strict=True)
    return model


# --- building and fitting what the recogniser said ----------------------------------------------------------


def build_recognised(arch: Architecture) -> nn.Module:
    """A randomly initialised model of ``arch``, in eval mode, on the CPU.

    A torchvision layout gets the stem ``arch`` says: its input channels, its kernel (torchvision's 7×7 at
    stride 2, or the CIFAR-style 3×3 at stride 1) and its max-pool or none.

    Raises:
        ValueError: ``arch.kind`` is neither ``"resnet"`` nor a supported torchvision name, or ``"resnet"``
            without a config.
    """
    with torch.device("cpu"):  # whatever the process's default device: the model starts on the CPU
        if arch.kind == "resnet":
            if arch.config is None:
                raise ValueError("an Architecture of kind 'resnet' needs a config")
            return build_model(arch.config).eval()
        return build_torchvision(arch.kind, num_classes=arch.num_classes, in_channels=arch.in_channels,
                                 stem_kernel=arch.stem_kernel, maxpool=arch.maxpool).eval()


def fit_recognised(model: nn.Module, sd: Mapping[str, torch.Tensor], arch: Architecture, source: str) -> nn.Module:
    """Copy ``sd`` into ``model`` (built by :func:`build_recognised` for ``arch``), every key and shape checked.

    Non-finite weights are refused: a model with a NaN or an infinity in its weights gives no meaningful
    prediction, and the file is damaged or its training diverged. Missing BN ``num_batches_tracked``
    counters are filled in with zeros (eval never reads them).

    Args:
        model: the model to fill, in place.
        sd: the state dict from :func:`~.reader.read_checkpoint` (either key naming for ``"resnet"``).
        arch: what :func:`~.recognise.recognise` said ``sd`` is.
        source: what the messages call the checkpoint, e.g. ``"checkpoint net.pth"``.

    Returns:
        ``model``, in eval mode.

    Raises:
        WeightsError: a key or shape that does not fit ``arch``, or non-finite values.
    """
    sd = strip_prefixes(dict(sd))
    expected = expected_shapes(arch, sd)
    short = "torchvision " + arch.kind if arch.kind != "resnet" else "this ResNet"
    problem = compare_shapes(expected, sd, source, short)
    if problem is not None:
        raise WeightsError(f"{source} does not fit {short}: {problem}")
    for key, value in sd.items():
        bad = non_finite(value)
        if bad:
            raise WeightsError(
                f"{source} was refused because key '{key}' holds {_plural(bad, 'NaN or infinite value')} "
                f"(of {value.numel():,}): a model with non-finite weights cannot give a meaningful prediction"
            )
    for key, shape in expected.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros(shape, dtype=torch.long)
    load_weights_into(model, sd, source=source)
    return model.eval()
