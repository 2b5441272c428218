"""A state dict against a model built by its own library (timm, transformers): compared key by key and shape by
shape, then copied in strictly.

The library builds the network; nothing here re-writes it. What is checked here is only that the file fits
it exactly: the same keys, the same shapes, finite values. BN ``num_batches_tracked`` counters may be absent
(eval never reads them) and are filled in with zeros.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import WeightsError

__all__ = ["compare", "expected_shapes", "load_exact"]

_COUNTER = "num_batches_tracked"



def non_finite(value: torch.Tensor) -> int:
    """How many NaN or infinite values a tensor holds (0 for integer tensors).

    One float32 sum first: it is finite exactly when every value is, unless finite values overflow it,
    and only then (or when something is wrong) are the values counted one by one. Checking every
    element of a half-precision checkpoint directly is several times slower on a CPU, and the shipped
    models are read this way at every start.
    """
    if not value.is_floating_point():
        return 0
    wide = value.float()  # float8 types lack isfinite; their values, and half's, fit in float32 exactly
    if torch.isfinite(wide.abs().sum()):
        return 0
    return value.numel() - int(torch.isfinite(wide).sum())

def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The keys and shapes ``model.state_dict()`` has (a model on the meta device costs nothing to ask)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def compare(expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, str | None]:
    """How well ``shapes`` (a file's keys and shapes) fits ``expected``: (keys that fit, first problem or ``None``).

    A missing ``num_batches_tracked`` is no problem. The problem is one clause: "key 'fc.weight' has shape
    [10, 512], expected [1000, 512]", "it lacks key 'layer1.0.se.fc1.weight'", "it has an unexpected key 'x'".
    """
    fit, problem = 0, None
    for key, shape in expected.items():
        got = shapes.get(key)
        if got is None:
            if not key.endswith(_COUNTER):
                problem = problem or f"it lacks key '{key}'"
        elif tuple(got) != tuple(shape):
            problem = problem or f"key '{key}' has shape {list(got)}, expected {list(shape)}"
        else:
            fit += 1
    extra = next((k for k in shapes if k not in expected), None)
    if extra is not None:
        problem = problem or f"it has an unexpected key '{extra}'"
    return fit, problem


def load_exact(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, label: str) -> nn.Module:
    """Copy ``sd`` into ``model`` strictly, after checking keys, shapes and values; returns ``model`` in eval mode.

    Args:
        model: the network, built by its library.
        sd: the checkpoint's tensors, named as ``model.state_dict()`` names them.
        source: what the messages call the checkpoint ("checkpoint resnet50.safetensors").
        label: what they call the network ("timm resnet50").

    Raises:
        WeightsError: a missing, unexpected or mis-shaped key, or a tensor with NaN or infinite values.
    """
    own = model.state_dict()
    _, problem = compare(expected_shapes(model), {k: tuple(v.shape) for k, v in sd.items()})
    if problem is not None:
        raise WeightsError(f"{source} does not fit {label}: {problem}")
    filled = {}
    for key, ref in own.items():
        if key not in sd:  # a num_batches_tracked counter: compare() allows only these to be missing
            filled[key] = torch.zeros_like(ref)
            continue
        value = sd[key]
        bad = non_finite(value)
        if bad:
            raise WeightsError(f"{source} was refused because key '{key}' holds {bad:,} NaN or infinite "
                               f"value{'s' if bad != 1 else ''} (of {value.numel():,})")
        filled[key] = value.to(ref.dtype)
    model.load_state_dict(filled, strict=True)
    return model.eval()
