"""Models that visitors upload: visible only in the session that uploaded them, bounded, evicted least-recently-used.

Each upload becomes an :class:`~resnet_demo.core.explorer.Explorer` held in memory; the checkpoint file
is deleted as soon as it is read, so nothing a visitor uploads stays on disk. At most ``per_session``
models per browser session and ``total`` in the server: adding one beyond a bound evicts the least
recently used (its memory is returned when the last request using it ends). A session's models go
when the session ends (Gradio's ``unload`` event).
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.explorer import Explorer
from ..core.weights.cards import WeightsError, preset_class_names, read_class_names
from ..core.weights.families import is_timm_config, is_transformers_config
from ..core.weights.load import AUTO
from ..core.weights.opening import read_json
from ..core.weights.torchvision_resnets import SUPPORTED_ARCHS

__all__ = ["ARCH_CHOICES", "DEFAULT_PRESET", "MAX_HELD_BYTES", "PRESET_CHOICES", "UPLOAD_PREFIX", "Upload",
           "UserModels", "load_upload", "parse_class_names", "read_config_files"]

UPLOAD_PREFIX = "upload:"  # model keys of uploaded models; never a shipped model's key
# The input presets offered for an upload: label -> preset key ("custom" takes size, mean and std typed in). The
# first, the default, is the preprocessing the checkpoint points to: ImageNet's for torchvision's 7×7 stem with
# a max-pool, CIFAR-10's for a 3×3 stem and 3 channels, MNIST's for one channel (the card says which and why).
PRESET_CHOICES = [
    ("From the checkpoint (its stem and input channels)", AUTO),
    ("CIFAR-style 32×32 photo", "cifar10"),
    ("MNIST-style drawing", "mnist"),
    ("ImageNet 224 photo", "imagenet"),
    ("Custom size / mean / std", "custom"),
]
DEFAULT_PRESET = AUTO
# The architecture override: recognised from the keys and shapes unless the visitor says otherwise. A max-pool
# has no weights, so whether one follows the stem is an assumption (after a 7×7 stem yes, after a 3×3 stem no)
# that the visitor may correct; the values are the override's grammar (resnet_demo.core.weights.recognise).
ARCH_CHOICES = [
    ("Recognise it from the keys and shapes", ""),
    ("Recognise it; a max-pool follows the stem", "auto:maxpool"),
    ("Recognise it; no max-pool after the stem (CIFAR-style)", "auto:no-maxpool"),
    ("The tutorial's Net / this project's ResNet", "tutorial"),
]
ARCH_CHOICES += [(f"torchvision {name}", name) for name in SUPPORTED_ARCHS]
MAX_CLASS_NAME = 200  # characters; a label longer than this is not a class name


@dataclass
class Upload:
    key: str
    label: str
    session: str
    explorer: Explorer
    used: float = field(default_factory=time.monotonic)
    nbytes: int = 0  # the explorer's weights, counted once when it is added


def parse_class_names(text: str | None, path: str | None) -> list[str] | None:
    """Class names from a file (one per line, or JSON) or typed in (one per line or comma-separated).

    Returns ``None`` when neither is given. Raises ``WeightsError`` for an empty or unreadable list.
    """
    if path:
        names = read_class_names(path)
    elif text and text.strip():
        sep = "\n" if "\n" in text.strip() else ","
        names = [n.strip() for n in text.strip().split(sep)]
        if any(not n for n in names):
            raise WeightsError("the typed class names hold an empty name: one name per line, or separated by commas")
    else:
        return None
    too_long = next((n for n in names if len(n) > MAX_CLASS_NAME), None)
    if too_long is not None:
        raise WeightsError(f"a class name is {len(too_long)} characters long; the limit is {MAX_CLASS_NAME}")
    return names


def read_config_files(paths: Sequence[str] | str | None) -> tuple[dict | None, dict | None]:
    """``(config, preprocessor)`` from the JSON files uploaded with a checkpoint: a timm or transformers
    ``config.json`` and a ``preprocessor_config.json``, told apart by what they hold, not by their names (a browser
    may rename them). Each file is deleted once read.

    Raises:
        WeightsError: a file is not a JSON object, is too large, is neither kind, or two of one kind were given.
    """
    if not paths:
        return None, None
    found: dict[str, dict] = {}
    for path in [paths] if isinstance(paths, str) else list(paths):
        name = Path(path).name
        try:
            value = read_json(path, f"the uploaded {name}")
        finally:
            Path(path).unlink(missing_ok=True)
        if is_timm_config(value) or is_transformers_config(value):
            kind = "config"
        elif any(k in value for k in ("image_processor_type", "feature_extractor_type", "image_mean", "crop_pct")):
            kind = "preprocessor"
        else:
            raise WeightsError(f"the uploaded {name} is neither a timm or transformers config.json nor a "
                               "preprocessor_config.json")
        if kind in found:
            raise WeightsError(f"two {kind} files were uploaded; give one config.json and one preprocessor_config.json")
        found[kind] = value
    return found.get("config"), found.get("preprocessor")


def default_class_names(preset: str, num_classes: int) -> list[str]:
    """The preset's class names when the head has that many classes, else ``class 0`` … ``class n-1``."""
    return preset_class_names(preset, num_classes)


MAX_HELD_BYTES = 2 * 2**30  # weights of uploaded models held in all: 8 ResNet-152s (241 MB each) fit


class UserModels:
    """The uploaded models of every session, bounded per session, in number and in bytes of weights; thread-safe.

    ``max_bytes`` bounds the parameters and buffers of all the models held (the rest of a held model, its
    Python objects, is small beside them), so the memory of many large uploads is known before they arrive.
    """

    def __init__(self, per_session: int = 3, total: int = 8, max_bytes: int = MAX_HELD_BYTES) -> None:
        if per_session < 1 or total < per_session:
            raise ValueError(f"need 1 <= per_session <= total, got {per_session} and {total}")
        if max_bytes < 1:
            raise ValueError(f"need max_bytes >= 1, got {max_bytes}")
        self.per_session, self.total, self.max_bytes = per_session, total, max_bytes
        self._models: dict[str, Upload] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def add(self, session: str, explorer: Explorer, label: str) -> tuple[str, list[str]]:
        """Keep ``explorer`` for ``session``; returns its key and the labels of models evicted to make room.

        Two of a session's models never share a label: a second ``label`` gets the weights' short sha256 (two
        uploads both called model.safetensors), and the same file twice a number.
        """
        if not session:
            raise WeightsError("uploads need a browser session; reload the page and try again")
        if explorer.nbytes > self.max_bytes:
            raise WeightsError(f"this model's weights take {explorer.nbytes / 2**20:,.0f} MiB; this server holds at "
                               f"most {self.max_bytes / 2**20:,.0f} MiB of uploaded models in all")
        with self._lock:
            key = f"{UPLOAD_PREFIX}{next(self._ids)}"
            taken = {u.label for u in self._models.values() if u.session == session}
            sha = explorer.card.weights_sha256[:8]
            if label in taken and sha and sha not in label:
                label = f"{label} ({sha})"
            base, n = label, 2
            while label in taken:
                label, n = f"{base} ({n})", n + 1
            self._models[key] = Upload(key, label, session, explorer, nbytes=explorer.nbytes)
            evicted = self._evict(session)
        gc.collect()  # the evicted models' tensors go back now, not at some later collection
        return key, evicted

    def _evict(self, session: str) -> list[str]:
        """Drop least-recently-used models until ``session`` and the server are within their bounds."""
        evicted = []
        while True:
            mine = [u for u in self._models.values() if u.session == session]
            if len(mine) > self.per_session:
                pool = mine
            elif len(self._models) > self.total or self.held_bytes() > self.max_bytes:
                pool = list(self._models.values())
            else:
                return evicted
            oldest = min(pool, key=lambda u: u.used)
            del self._models[oldest.key]
            evicted.append(oldest.label)

    def held_bytes(self) -> int:
        """Bytes of weights of the models held now (call with the lock held, or accept a moment's view)."""
        return sum(u.nbytes for u in list(self._models.values()))

    def get(self, session: str, key: str) -> Explorer:
        """The explorer of ``key`` if ``session`` uploaded it; the same message whether it never existed,
        belongs to another session or was evicted, so one session learns nothing about another's models."""
        with self._lock:
            upload = self._models.get(key)
            if upload is None or upload.session != session:
                raise WeightsError(
                    f"the uploaded model '{key}' is not available in this session (uploads are kept for the "
                    "session that made them, and the oldest go when the server holds too many): upload it again"
                )
            upload.used = time.monotonic()
            return upload.explorer

    def choices(self, session: str) -> list[tuple[str, str]]:
        """(label, key) of the session's models, oldest first."""
        with self._lock:
            return [(u.label, u.key) for u in self._models.values() if u.session == session]

    def end_session(self, session: str) -> int:
        """Forget every model of ``session``; returns how many."""
        with self._lock:
            keys = [k for k, u in self._models.items() if u.session == session]
            for k in keys:
                del self._models[k]
        if keys:
            gc.collect()
        return len(keys)

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)


def load_upload(
    path: str | Path,
    *,
    arch: str | None,
    preset: str,
    class_names: Sequence[str] | None,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | None = None,
    config: dict | None = None,
    preprocessor: dict | None = None,
) -> Explorer:
    """Read an uploaded checkpoint (bounded, never unpickled unsafely), recognise it and wrap it in an Explorer.

    The same way as ``--weights`` on the command line (:meth:`~resnet_demo.core.explorer.Explorer.from_checkpoint`):
    the same decisions, the same sentences. The file is deleted once read, whatever happens. ``preset`` is a key
    of :data:`PRESET_CHOICES`; the class names default to the preset's when the head has as many classes.
    ``config`` and ``preprocessor``: a timm or transformers ``config.json`` and a ``preprocessor_config.json`` uploaded
    with it (:func:`read_config_files`).
    """
    path = Path(path)
    try:
        return Explorer.from_checkpoint(
            path, arch=arch, preset=None if preset == "custom" else preset, class_names=class_names,
            input_size=size, mean=mean, std=std, device=device, config=config, preprocessor=preprocessor,
        )
    finally:
        path.unlink(missing_ok=True)
