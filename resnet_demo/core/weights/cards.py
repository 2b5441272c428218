"""Model cards and the facts about data sets they are made from: presets, class names, targets.

A model card (``weights/<name>.json`` beside ``weights/<name>.safetensors``) holds everything needed to
use a weights file: architecture, classes and preprocessing, plus how it was trained and measured. The
presets are the one place where CIFAR-10, MNIST and ImageNet are described (classes, mean/std, input
size, colour mode, kind of input); training, the torchvision adapter and the registry all read them here.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import WeightsError
from ..model import TUTORIAL_CONFIG, ResNetConfig

__all__ = [
    "CIFAR10",
    "CIFAR10_CLASSES",
    "IMAGENET",
    "MNIST",
    "MNIST_CLASSES",
    "PRESETS",
    "SHIPPED",
    "TARGETS",
    "WEIGHTS_DIR",
    "ModelCard",
    "Preset",
    "ShippedModel",
    "WeightsError",
    "imagenet_classes",
    "numbered_classes",
    "preset_class_names",
    "preset_for",
    "read_class_names",
    "tutorial_card",
    "upload_card",
    "write_card_field",
]

MAX_INPUT_SIZE = 1024  # pixels per side of a model's input: larger would make one analysis take seconds
WEIGHTS_DIR = Path(__file__).resolve().parents[3] / "weights"
IMAGENET_CLASSES_FILE = Path(__file__).resolve().parent / "imagenet_classes.txt"


@dataclass(frozen=True)
class Preset:
    """What a data set's images look like to a model: classes, normalisation, size and kind of input.

    ``input_kind`` is ``"photo"`` (resize the short side to ``resize``, centre-crop ``input_size``) or
    ``"drawing"`` (MNIST-style: invert, crop to the ink, centre by mass, pad to ``input_size``).
    ``colour_mode`` ``"gray"`` means one intensity channel, replicated to the model's input channels.
    """

    key: str
    dataset: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    input_size: int
    resize: int
    colour_mode: str
    input_kind: str

    def card_fields(self) -> dict[str, Any]:
        """The :class:`ModelCard` fields this preset decides."""
        return {
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
            "resize": self.resize,
            "colour_mode": self.colour_mode,
            "input_kind": self.input_kind,
            "dataset": self.dataset,
        }


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MNIST_CLASSES = [str(d) for d in range(10)]
# CIFAR-10: per-channel statistics of its train split (JPEG copy). MNIST: in [0, 1] after padding to 32x32.
CIFAR10 = Preset("cifar10", "CIFAR-10", tuple(CIFAR10_CLASSES), (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606),
                 channels=3, input_size=32, resize=32, colour_mode="rgb", input_kind="photo")
MNIST = Preset("mnist", "MNIST", tuple(MNIST_CLASSES), (0.1307,), (0.3081,),
               channels=1, input_size=32, resize=32, colour_mode="gray", input_kind="drawing")
# ImageNet's classes are read from a file on first use (see imagenet_classes); torchvision's recipe:
# resize the short side to 256, centre-crop 224.
IMAGENET = Preset("imagenet", "ImageNet-1k", (), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                  channels=3, input_size=224, resize=256, colour_mode="rgb", input_kind="photo")
PRESETS = {p.key: p for p in (CIFAR10, MNIST, IMAGENET)}


def preset_for(classes: list[str], channels: int) -> Preset | None:
    """The preset whose classes and channel count these are (CIFAR-10 or MNIST), else ``None``."""
    for preset in (CIFAR10, MNIST):
        if list(classes) == list(preset.classes) and channels == preset.channels:
            return preset
    return None


@dataclass(frozen=True)
class ShippedModel:
    """A model the project ships in ``weights/``: its selector key, file stem, label, and the bar it is held to.

    Examples in ``examples/`` are named ``<key>-<label>-<n>.<ext>``: the key says which shipped model
    (and so which kind of input) an example belongs to.
    """

    key: str
    name: str
    label: str
    preset: Preset
    target: tuple[str, float]  # (card metric, bar) on the full test split


SHIPPED = {
    m.key: m
    for m in (
        ShippedModel("cifar10", "cifar10_resnet", "CIFAR-10 (photos)", CIFAR10, ("test_acc_tta", 0.93)),
        ShippedModel("mnist", "mnist_resnet", "MNIST (drawn digits)", MNIST, ("test_acc", 0.995)),
    )
}
TARGETS = {m.name: m.target for m in SHIPPED.values()}


@dataclass
class ModelCard:
    """Everything needed to use a weights file: architecture, classes and preprocessing (see :class:`Preset`)."""

    name: str
    classes: list[str]
    mean: list[float]
    std: list[float]
    arch: str = "resnet"
    config: dict | None = None
    input_size: int = 32
    resize: int = 32
    colour_mode: str = "rgb"
    input_kind: str = "photo"
    dataset: str = ""
    trained: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    reference_bands: dict[str, Any] = field(default_factory=dict)
    # Results of data-set studies computed by a command and stored with the card, by study name
    # ("lesions", "probes", "strangeness", "exemplars", ...): see the README's data-set view.
    studies: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        missing = [k for k in ("name", "classes", "mean", "std") if k not in known]
        if missing:
            raise WeightsError(f"model card lacks required field(s) {missing}")
        return cls(**known)

    @classmethod
    def from_preset(cls, preset: Preset, name: str, **fields: Any) -> ModelCard:
        return cls(name=name, **{**preset.card_fields(), **fields})

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise WeightsError(f"model card {path} not found: it should sit beside the weights file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightsError(f"model card {path} is not valid JSON ({exc})") from None
        if not isinstance(d, dict):
            raise WeightsError(f"model card {path} must hold a JSON object")
        try:
            return cls.from_dict(d)
        except WeightsError as exc:
            raise WeightsError(f"model card {path}: {exc}") from None

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())


    def headline(self) -> tuple[str, float] | None:
        """The accuracy that judges this model: its target's metric, else flip-TTA accuracy, else plain."""
        metric = TARGETS[self.name][0] if self.name in TARGETS else "test_acc_tta"
        for key in (metric, "test_acc_tta", "test_acc"):
            if isinstance(self.metrics.get(key), (int, float)):
                return key, float(self.metrics[key])
        return None

    def target(self) -> tuple[str, float, bool] | None:
        """(metric, bar, met) for a shipped model with a target, else ``None``."""
        if self.name not in TARGETS:
            return None
        metric, bar = TARGETS[self.name]
        value = self.metrics.get(metric)
        return metric, bar, isinstance(value, (int, float)) and value >= bar

    @property
    def resnet_config(self) -> ResNetConfig:
        return ResNetConfig.from_dict(self.config or {})


def numbered_classes(n: int) -> list[str]:
    """Names for a head whose classes nobody named: ``class 0`` … ``class n-1``."""
    return [f"class {i}" for i in range(n)]


def tutorial_card(name: str = "tutorial", *, trained: bool = True) -> ModelCard:
    """Card for a checkpoint of the tutorial's ``Net`` trained on CIFAR-10 (the tutorial's own task)."""
    return ModelCard.from_preset(CIFAR10, name, config=TUTORIAL_CONFIG.to_dict(), trained=trained)


# --- class names ----------------------------------------------------------------------------------


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file (one per line) or a JSON file (a list, or a model card's ``classes``).

    Raises:
        WeightsError: the file is missing, unreadable, empty, or has a blank line among the names.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WeightsError(f"class-names file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsError(f"class-names file {path} could not be read ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WeightsError(f"class-names file {path} is not valid JSON ({exc})") from None
        if isinstance(data, dict):
            data = data.get("classes")
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise WeightsError(
                f"class-names file {path} must hold a JSON list of strings (or an object with 'classes')"
            )
        names = [c.strip() for c in data]
    else:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
    if not names:
        raise WeightsError(f"class-names file {path} holds no class names")
    blank = [i + 1 for i, n in enumerate(names) if not n]
    if blank:
        raise WeightsError(f"class-names file {path}: entry {blank[0]} is blank (one class name per line, none empty)")
    return names


def preset_class_names(preset: str | None, num_classes: int) -> list[str]:
    """The preset's class names when the head has that many classes, else ``class 0`` … ``class n-1``."""
    if preset == IMAGENET.key and num_classes == 1000:
        return imagenet_classes()
    known = PRESETS.get(preset or "")
    if known is not None and len(known.classes) == num_classes:
        return list(known.classes)
    return numbered_classes(num_classes)


@lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[str, ...]:
    names = read_class_names(IMAGENET_CLASSES_FILE)
    if len(names) != 1000:
        raise WeightsError(f"{IMAGENET_CLASSES_FILE} should hold 1000 ImageNet class names, found {len(names)}")
    return tuple(names)


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, in torchvision's index order."""
    return list(_imagenet_classes())


def upload_card(
    name: str,
    arch: str,
    config: ResNetConfig | None,
    in_channels: int,
    classes: list[str],
    *,
    preset: str | None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    drawing: bool = False,
) -> ModelCard:
    """The card of an uploaded checkpoint: its architecture, its classes and the preprocessing chosen for it.

    ``preset`` (a key of :data:`PRESETS`) decides size, mean, std and kind of input; without one,
    ``input_size``, ``mean`` and ``std`` are required. One mean/std value serves every input channel.

    Raises:
        WeightsError: an unknown preset, a size out of range, or a normalisation that does not fit the
            checkpoint's input channels.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise WeightsError(f"unknown input preset {preset!r}; choose one of {sorted(PRESETS)}")
        p = PRESETS[preset]
        fields = p.card_fields()
        mean, std = p.mean, p.std
    else:
        if input_size is None or not 8 <= int(input_size) <= MAX_INPUT_SIZE:
            raise WeightsError(f"the input size must be between 8 and {MAX_INPUT_SIZE} pixels, got {input_size}")
        if not mean or not std:
            raise WeightsError("a custom preset needs the mean and std of the inputs the model was trained on")
        if any(s <= 0 for s in std):
            raise WeightsError(f"every std must be positive, got {list(std)}")
        fields = {"input_size": int(input_size), "resize": int(input_size), "dataset": "",
                  "colour_mode": "gray" if in_channels == 1 else "rgb",
                  "input_kind": "drawing" if drawing else "photo"}
    mean, std = list(mean), list(std)
    if len(mean) != len(std):
        raise WeightsError(f"mean has {len(mean)} values but std has {len(std)}")
    if len(mean) == 1 and in_channels > 1:
        mean, std = mean * in_channels, std * in_channels  # one gray value for every input channel
    if len(mean) not in (1, in_channels):
        raise WeightsError(
            f"the checkpoint takes {in_channels} input channel(s), but the normalisation has {len(mean)} values: "
            "give one value, or one per channel"
        )
    fields.update(classes=list(classes), mean=mean, std=std)
    fields.setdefault("dataset", "")
    return ModelCard(name=name, arch=arch, config=config.to_dict() if config is not None else None,
                     trained=True, **fields)


def write_card_field(card_path: str | Path, key: str, value: Any, *, study: bool = False) -> None:
    """Set one field of a card's JSON (or one entry of its ``studies`` when ``study``), keeping every other
    field as it is; written to a temporary file and renamed, so a reader never sees half a card.

    Commands that add what they computed beside the weights (bands, studies) use this: the weights file,
    and so its sha256, is untouched.
    """
    card_path = Path(card_path)
    d = json.loads(card_path.read_text())
    if study:
        d.setdefault("studies", {})[key] = value
    else:
        d[key] = value
    tmp = card_path.with_name(f"{card_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(d, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, card_path)
