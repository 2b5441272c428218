"""Weights files: read them safely, fit them to a model (the tutorial's key names included), save them.

Shipped weights are ``weights/<name>.safetensors`` with the model card ``weights/<name>.json`` beside
them. A user's checkpoint may also be a ``torch.save(state_dict)`` file: it is read with
``torch.load(weights_only=True)``, never with unrestricted unpickling.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from ..model import TUTORIAL_CONFIG, ResNetConfig
from .cards import ModelCard, WeightsError

__all__ = [
    "file_sha256",
    "from_tutorial_keys",
    "is_tutorial_state_dict",
    "load_state_dict_file",
    "load_weights_into",
    "save_weights",
]

def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- reading state dicts ------------------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a ``torch.save`` state dict safely, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"weights file {path} is not a readable safetensors file ({exc})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's text advises retrying with weights_only=False: exactly what must not be done with a
            # file from a stranger. Keep only the line that names what was refused, when there is one.
            refused = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
            raise WeightsError(
                f"weights file {path} holds Python objects, not only tensors{f' ({refused})' if refused else ''}; "
                "it was not loaded (only tensors are accepted; unsafe pickles are refused)"
            ) from None
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad or hostile file
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"weights file {path} could not be loaded as a PyTorch state dict "
                f"(only tensors are accepted; unsafe pickles are refused): {msg}"
            ) from None
        # Accept the two common wrappers around a state dict.
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    # Checkpoints saved from a DataParallel or compiled model carry a prefix on every key.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


_TUTORIAL_RES = re.compile(r"^res(\d+)\.(conv1|bn1|conv2|bn2)\.(.+)$")


def is_tutorial_state_dict(sd: dict) -> bool:
    return "res1.conv1.weight" in sd and "conv1.weight" in sd


def tutorial_key_map(config: ResNetConfig) -> dict[str, str]:
    """Map the project's key prefixes to the tutorial's (``stages.0.blocks.res1.branch.conv1`` -> ``res1.conv1``)."""
    if config.downsample != "transition":
        raise WeightsError("tutorial-style checkpoints need a config with downsample='transition'")
    mapping = {"stem.conv": "conv1", "stem.bn": "bn1", "fc": "fc"}
    k = 0
    for s, n in enumerate(config.blocks):
        if s > 0:
            mapping[f"stages.{s}.transition.conv"] = f"conv{s + 1}"
            mapping[f"stages.{s}.transition.bn"] = f"bn{s + 1}"
        for _ in range(n):
            k += 1
            for part in ("conv1", "bn1", "conv2", "bn2"):
                mapping[f"stages.{s}.blocks.res{k}.branch.{part}"] = f"res{k}.{part}"
    return mapping


def _rename(sd: dict, mapping: dict[str, str]) -> dict:
    out = {}
    for key, value in sd.items():
        prefix, _, leaf = key.rpartition(".")
        out[f"{mapping.get(prefix, prefix)}.{leaf}"] = value
    return out


def from_tutorial_keys(sd: dict, config: ResNetConfig = TUTORIAL_CONFIG) -> dict:
    """Rename a state dict saved from the tutorial's ``Net`` to the project's module names."""
    inverse = {v: k for k, v in tutorial_key_map(config).items()}
    return _rename(sd, inverse)


# --- fitting a state dict to a model --------------------------------------------------------------


def load_weights_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "weights") -> nn.Module:
    """Copy ``sd`` into ``model`` after checking every key and shape; fp16 tensors become the model's dtype.

    Raises:
        WeightsError: naming ``source`` and the first missing, unexpected or mismatched key. When
            ``sd`` uses the tutorial's key names, so does the message.
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
        if ref.is_floating_point() and not torch.isfinite(value).all():
            raise WeightsError(f"{source}: key '{to_file_name(key)}' holds NaN or infinite values")
        converted[key] = value
    model.load_state_dict(converted, strict=True)
    return model


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
