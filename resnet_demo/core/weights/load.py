"""Loading: the project's weights with their card, and any other checkpoint, recognised, into ``(model, card)``.

- :func:`load_model`: a weights file with its card beside it (``weights/<name>.json``): the card says what
  the network is and the file must match the card's sha256. A file without a card is a checkpoint from
  elsewhere and goes the way of every such file:
- :func:`open_checkpoint`: the one way an untrusted checkpoint becomes a model, for a visitor's upload and
  for ``--weights`` on the command line alike: read (bounded, never unpickled unsafely), recognised from its
  keys and shapes (or as the caller says), built, fitted, and given a card whose preprocessing is the one
  the caller chose or, by default, the one the checkpoint points to (:func:`preset_from_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import WeightsError
from .cards import CIFAR10, IMAGENET, MNIST, ModelCard, Preset, preset_class_names, upload_card
from .families import identify, open_library
from .files import file_sha256
from .fitting import build_recognised, fit_recognised
from .hf_resnets import HFArch, _from_config, build_hf
from .reader import read_checkpoint
from .recognise import Architecture, parse_override, recognise
from .timm_resnets import TimmArch, build_timm
from .torchvision_resnets import normalise_arch

__all__ = ["AUTO", "card_architecture", "load_model", "open_checkpoint", "preset_from_checkpoint", "stem_warning"]

AUTO = "auto"  # the preset "as the checkpoint says": see preset_from_checkpoint


def load_model(path: str | Path, *, card: ModelCard | None = None, verify: bool = True) -> tuple[nn.Module, ModelCard]:
    """Load a weights file and its card; returns the model in eval mode on the CPU.

    ``path`` is a project ``.safetensors`` file whose card sits beside it as ``.json`` (or is given as
    ``card``): the file must match the card's sha256 (unless ``verify`` is false), and the card says the
    architecture. A file without a card is opened as any checkpoint is (:func:`open_checkpoint`: its
    architecture recognised, its preprocessing chosen from it), with messages that name it by ``path``.

    Raises:
        WeightsError: one sentence naming the file: not found, a sha256 that does not match, a file the
            reader refuses, or weights that do not fit the card's (or any) architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    card_path = path.with_suffix(".json")
    if card is None and not card_path.is_file():
        return open_checkpoint(path, source=f"checkpoint {path}")
    card = card if card is not None else ModelCard.read(card_path)
    if verify and card.weights_sha256 and file_sha256(path) != card.weights_sha256:
        raise WeightsError(
            f"weights file {path} does not match the sha256 in its card {card_path}: "
            "the file is corrupt, truncated or was replaced without updating the card"
        )
    source = f"weights file {path}"
    sd = read_checkpoint(path, source=source)
    arch = card_architecture(card)
    if isinstance(arch, TimmArch):
        return build_timm(arch, sd, source).eval(), card
    if isinstance(arch, HFArch):
        return build_hf(arch, sd, source).eval(), card
    model = build_recognised(arch)
    fit_recognised(model, sd, arch, source)
    return model.eval(), card


def card_architecture(card: ModelCard) -> Architecture | TimmArch | HFArch:
    """The network a card names: this project's ResNet with the card's config; a torchvision ResNet with the stem
    in the card's ``config`` (``in_channels``, ``stem_kernel``, ``maxpool``; torchvision's own stem when there is
    none), as an :class:`~.recognise.Architecture`; or a library's network, as the card of an opened library
    checkpoint says it (:func:`~.families.open_library`): ``arch="timm/<name>"`` with ``config`` ``library``,
    ``model``, ``num_classes``, ``in_chans`` (a :class:`~.timm_resnets.TimmArch`), ``arch="transformers/resnet"``
    with ``ResNetConfig``'s fields and ``num_labels`` (an :class:`~.hf_resnets.HFArch`, its fields checked as a
    ``config.json``'s are).

    Raises:
        WeightsError: a transformers card whose config does not describe a ResNet that can be built.
    """
    config = card.config or {}
    if card.arch.startswith("timm/") or config.get("library") == "timm":
        name = str(config.get("model") or card.arch.removeprefix("timm/"))
        return TimmArch(name, int(config.get("num_classes", len(card.classes))), int(config.get("in_chans", 3)),
                        f"timm {name} (as its card says)")
    if card.arch == "transformers/resnet" or config.get("library") == "transformers":
        fields = {k: v for k, v in config.items() if k not in ("library", "num_labels", "model_type")}
        fields = _from_config({"model_type": "resnet", **fields}, f"the card of {card.name}")
        return HFArch(fields, int(config.get("num_labels", len(card.classes))),
                      "transformers ResNetForImageClassification (as its card says)")
    if card.arch == "resnet":
        config = card.resnet_config
        return Architecture("resnet", config, config.num_classes, config.in_channels, "")
    stem = card.config or {}
    kernel = int(stem.get("stem_kernel", 7))
    return Architecture(normalise_arch(card.arch), None, len(card.classes), int(stem.get("in_channels", 3)), "",
                        stem_kernel=kernel, stem_stride=2 if kernel == 7 else 1,
                        maxpool=bool(stem.get("maxpool", kernel == 7)))


def preset_from_checkpoint(arch: Architecture) -> tuple[Preset | None, str]:
    """The preprocessing a checkpoint points to, and why, in words.

    A stem that shrinks its input 4 times before the first block (torchvision's 7×7 at stride 2 and its
    max-pool) was made for ImageNet-size photos: the ImageNet preset (224×224, ImageNet's mean and std, its
    class names for a 1000-way head). A stem that keeps the resolution (the tutorial's, this project's, the
    CIFAR-style 3×3 without a max-pool) was made for 32×32 inputs: MNIST's drawings for one input channel,
    CIFAR-10's photos for three. Other channel counts get no preset (``None``): a mean of 0.5 and a std of
    0.25 for every channel, at the size the stem points to.
    """
    large = arch.stem_reduction >= 4
    channels = f"{arch.in_channels} input channel{'s' if arch.in_channels != 1 else ''}"
    if arch.in_channels == 3 and large:
        preset = IMAGENET
    elif arch.in_channels == 1:
        preset = MNIST
    elif arch.in_channels == 3:
        preset = CIFAR10
    else:
        size = IMAGENET.input_size if large else CIFAR10.input_size
        return None, (f"{size}×{size} photos with a mean of 0.5 and a std of 0.25 for every channel, chosen from "
                      f"the checkpoint: {arch.stem} and {channels}")
    kind = "drawings" if preset.input_kind == "drawing" else "photos"
    return preset, (f"{preset.dataset}-style {kind} ({preset.input_size}×{preset.input_size}, {preset.dataset}'s mean "
                    f"and std), chosen from the checkpoint: {arch.stem} and {channels}")


def open_checkpoint(
    path: str | Path,
    *,
    arch: str | None = None,
    maxpool: bool | None = None,
    preset: str | None = AUTO,
    class_names: Sequence[str] | None = None,
    default_classes: Callable[[int], list[str]] | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    drawing: bool = False,
    source: str | None = None,
    config: Mapping[str, Any] | None = None,
    preprocessor: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, ModelCard]:
    """A checkpoint from an untrusted source as ``(model, card)``: read, recognised, built and fitted.

    The one path for every such file: a visitor's upload, ``--weights`` on the command line, a card-less file
    given to :func:`load_model`. They take the same decisions and refuse with the same sentences.

    Args:
        path: a safetensors file or a ``torch.save`` state dict or training checkpoint (read with
            ``weights_only=True``).
        arch: the architecture to use instead of the recognised one (``tutorial``, ``resnet``, a
            torchvision name, or ``timm/<name>`` for one of timm's ResNets, built by timm).
        maxpool: for torchvision's blocks, whether a max-pool follows the stem (the weights cannot say);
            ``None``: as the stem says.
        preset: ``"auto"`` (the preprocessing the checkpoint points to, :func:`preset_from_checkpoint`),
            ``cifar10``, ``mnist`` or ``imagenet`` (:data:`~.cards.PRESETS`), or ``None`` for
            ``input_size``, ``mean`` and ``std`` given directly.
        class_names: one per class of the checkpoint's head; by default ``default_classes(n)``, else the
            preset's names when the head has as many classes, else ``class 0`` … ``class n-1``.
        drawing: with ``preset=None``, prepare inputs as MNIST-style drawings.
        source: what the messages call the file; ``"checkpoint <file name>"`` by default.
        config, preprocessor: a timm or transformers ``config.json`` and a ``preprocessor_config.json`` given
            with the weights, parsed (:func:`~.opening.configs_beside` finds them beside a file).

    Without ``arch``, :func:`~.families.identify` says which source the file is: a network timm or transformers
    defines is built by that library, with its preprocessing and labels (:func:`~.families.open_library`; the
    preset arguments are then not used); a Lightning checkpoint's model is taken from below its prefix and the
    CIFAR repo's keys are renamed before the recogniser's way below.

    Raises:
        ValueError: an unknown ``arch``.
        WeightsError: the file is refused, fits no supported architecture (or not ``arch``), or the class
            names, preset or normalisation do not fit it; the one sentence says which.
    """
    path = Path(path)
    source = source or f"checkpoint {path.name}"
    sd = read_checkpoint(path, source=source)
    timm_name, arch = timm_override(arch, config)
    family, said = parse_override(arch)
    notes = ""
    if family is None:
        found = identify(sd, source=source, config=config, maxpool=said if maxpool is None else maxpool,
                         timm_name=timm_name)
        if found.kind != "recognised":
            sha256 = file_sha256(path)
            return open_library(found, name=f"{path.name} ({sha256[:8]})", source=source, config=config,
                                preprocessor=preprocessor, class_names=class_names or None,
                                default_classes=default_classes, sha256=sha256)
        sd, architecture, notes = found.sd, found.arch, "".join(f"; {n}" for n in found.notes)
    else:
        architecture = recognise(sd, override=arch, maxpool=maxpool, source=source)
    model = build_recognised(architecture)
    fit_recognised(model, sd, architecture, source)
    del sd
    preprocessing = ""
    if preset == AUTO:
        found, preprocessing = preset_from_checkpoint(architecture)
        preset = found.key if found is not None else None
        if found is None:
            input_size = (IMAGENET if architecture.stem_reduction >= 4 else CIFAR10).input_size
            mean, std, drawing = [0.5], [0.25], False
    classes = _class_names(class_names, default_classes, preset, architecture.num_classes)
    sha256 = file_sha256(path)
    card = upload_card(
        f"{path.name} ({sha256[:8]})", architecture.kind, architecture.config, architecture.in_channels, classes,
        preset=preset, input_size=input_size, mean=mean, std=std, drawing=drawing,
    )
    _describe(card, architecture, source=source, notes=notes, sha256=sha256,
              preprocessing=preprocessing or _chosen(card, preset))
    return model.eval(), card


def _class_names(given: Sequence[str] | None, default: Callable[[int], list[str]] | None, preset: str | None,
                 n: int) -> list[str]:
    """The names given, else ``default(n)``, else the preset's (``class i`` when it has no names for ``n``).

    Raises:
        WeightsError: names given that are not one per class of the head.
    """
    classes = list(given) if given else default(n) if default is not None else preset_class_names(preset, n)
    if len(classes) != n:
        raise WeightsError(f"{len(classes)} class names were given, but the checkpoint's classifier has {n} classes")
    return classes


def _describe(card: ModelCard, architecture: Architecture, *, source: str, notes: str, sha256: str,
              preprocessing: str) -> None:
    """What a recognised checkpoint's card says of it: its stem, file hash, where it came from, what was assumed
    and any warning about its stem and input size."""
    if architecture.kind != "resnet":
        card.config = {"in_channels": architecture.in_channels, "stem_kernel": architecture.stem_kernel,
                       "maxpool": architecture.maxpool}
    card.weights_sha256 = sha256
    card.training = {"source": source, "architecture": architecture.description + notes, "stem": architecture.stem,
                     "preprocessing": preprocessing}
    if architecture.assumptions:
        card.training["assumptions"] = list(architecture.assumptions)
    warning = stem_warning(architecture, card.input_size)
    if warning:
        card.training["warnings"] = [warning]


def timm_override(arch: str | None, config: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """``(timm model name, the rest of the override)``: ``"timm/resnet26d"`` -> ``("resnet26d", None)``; any other
    override -> ``(None, arch)``.

    Raises:
        ValueError: ``timm/`` with no name, or a timm config.json given too that names another model.
    """
    text = str(arch or "").strip()
    if not text.lower().startswith("timm/"):
        return None, arch
    name = text[len("timm/"):].strip()
    if not name or ":" in name:
        raise ValueError(f"write a timm architecture as timm/<model name>, e.g. timm/resnet50d, not {arch!r}")
    named = (config or {}).get("architecture")
    if named and named != name:
        raise ValueError(f"the architecture chosen is timm/{name}, but the config.json given names {named!r}")
    return name, None


def _chosen(card: ModelCard, preset: str | None) -> str:
    """The preprocessing a caller chose, in words."""
    kind = "drawings" if card.input_kind == "drawing" else "photos"
    if preset is not None:
        return (f"{card.dataset}-style {kind} ({card.input_size}×{card.input_size}, {card.dataset}'s mean and std), "
                "as chosen")
    return f"{card.input_size}×{card.input_size} {kind} with the mean and std given, as chosen"


def stem_warning(arch: Architecture, input_size: int) -> str | None:
    """One sentence when the input size does not suit the stem: a stem that shrinks its input 4 times was made
    for ImageNet-size inputs, one that keeps the resolution for 32×32 ones; else ``None``."""
    size = int(input_size)
    if arch.stem_reduction >= 4 and size < 112:
        stride = arch.stem_reduction * 8  # torchvision's 3 strided stages after the stem
        last = max(1, -(-size // stride))
        return (f"the checkpoint has {arch.stem}, made for ImageNet-size inputs (about 224×224), but {size}×{size} "
                f"was chosen: its last blocks see {last}×{last} maps")
    if arch.stem_reduction == 1 and size > 64:
        return (f"the checkpoint has {arch.stem}, made for small inputs (about 32×32), but {size}×{size} was chosen: "
                f"its first blocks see {size}×{size} maps, {size / 32:.3g} times as wide as such a stem is made for")
    return None
