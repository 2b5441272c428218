"""Any ResNet checkpoint file, with the config files beside it, into ``(model, card)``.

:func:`open_weights` is :func:`~.load.open_checkpoint` (read by the one bounded reader, identified by
:func:`~.families.identify`, built by its library or the recogniser's fitting) with a timm or transformers
``config.json`` and a ``preprocessor_config.json`` taken from beside the file unless given: what ``--weights`` on
the command line and a Hub download need; an upload gives the files it came with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import WeightsError
from .cards import ModelCard
from .families import is_timm_config, is_transformers_config
from .load import open_checkpoint

__all__ = ["MAX_JSON_BYTES", "configs_beside", "open_weights", "read_json"]

MAX_JSON_BYTES = 4 * 2**20  # a config.json with ImageNet-21k's id2label is ~1 MiB


def read_json(path: str | Path, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from a file of at most ``max_bytes``.

    Raises:
        WeightsError: naming ``what``: missing, too large, not JSON, or not an object.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise WeightsError(f"{what} is {size:,} bytes, over the limit of {max_bytes:,} for a config file")
        value = json.loads(path.read_bytes())
    except OSError:
        raise WeightsError(f"{what} could not be read") from None
    except (ValueError, RecursionError):
        raise WeightsError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{what} holds a JSON {type(value).__name__}, not an object")
    return value


def configs_beside(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(config, preprocessor)`` from ``config.json`` and ``preprocessor_config.json`` beside ``path``, when they
    are there; a ``config.json`` that is neither timm's nor transformers' is someone else's and left alone."""
    folder = Path(path).parent
    config = preprocessor = None
    if (folder / "config.json").is_file():
        found = read_json(folder / "config.json", "config.json beside the checkpoint")
        config = found if is_timm_config(found) or is_transformers_config(found) else None
    if (folder / "preprocessor_config.json").is_file():
        preprocessor = read_json(folder / "preprocessor_config.json", "preprocessor_config.json beside the checkpoint")
    return config, preprocessor


def open_weights(
    path: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    preprocessor: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    source: str | None = None,
    beside: bool = True,
) -> tuple[nn.Module, ModelCard]:
    """A checkpoint of any supported source (timm, transformers, Lightning, the CIFAR repo, torchvision, this
    project, the tutorial) as ``(model, card)``, on the CPU in eval mode.

    Args:
        path: ``.safetensors``, ``pytorch_model.bin``, ``.pth`` or ``.ckpt`` (pickles read with ``weights_only``).
        config: a timm or transformers ``config.json``, parsed; by default the one beside ``path``.
        preprocessor: a transformers ``preprocessor_config.json``, parsed; by default the one beside ``path``.
        class_names: one per class, instead of the ones the config or library gives.
        source: what messages call the file (``"checkpoint <file name>"``).
        beside: look for the config files beside ``path`` when they are not given.

    Raises:
        WeightsError: one sentence: the file is refused, or fits nothing (with what its keys point to).
    """
    path = Path(path)
    if beside and config is None and preprocessor is None:
        config, preprocessor = configs_beside(path)
    return open_checkpoint(path, source=source, class_names=class_names, config=config, preprocessor=preprocessor)
