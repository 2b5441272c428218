"""Every source of a ResNet checkpoint, one small class each: from a state dict's keys (and a config beside it) to
which network it is; and, for networks a library defines (timm, transformers), the network built by that library
with that library's preprocessing and labels.

:func:`identify` asks each source in turn:

- :class:`TimmSource`: a timm ``config.json`` names the model, or the keys are a timm ResNet's or ResNetV2's;
- :class:`TransformersSource`: transformers' key names (``resnet.embedder`` …) or its ``config.json``;
- :class:`RecogniserSource`: the recogniser's families (this project's ResNet, the tutorial's ``Net``,
  torchvision's ResNets, the CIFAR-style stem on torchvision's blocks);
- :class:`CifarRepoSource`: kuangliu/pytorch-cifar's names, renamed to torchvision's;

first on the whole state dict, then below each prefix a training checkpoint keeps the network under (a Lightning
``model.`` or ``net.``: :mod:`.lightning`). When nothing fits, the one sentence says what the keys show: "a
transformers ResNet without its config", "a Lightning checkpoint whose model sits under ``net.``".

:func:`open_library` then builds a timm or transformers network and writes its card; a recogniser's answer goes
the recogniser's way (:func:`~.fitting.build_recognised`, :func:`~.load.open_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import WeightsError
from .cards import IMAGENET, MAX_INPUT_SIZE, ModelCard, imagenet_classes, numbered_classes
from .cifar_repo import from_cifar_repo_keys, looks_cifar_repo
from .hf_resnets import HFArch, looks_transformers
from .lightning import model_prefixes, under
from .recognise import Architecture, recognise
from .timm_resnets import TimmArch, looks_timm, timm_signs

__all__ = [
    "SOURCES", "Found", "Given", "Source", "identify", "is_timm_config", "is_transformers_config", "open_library",
]

Shapes = Mapping[str, tuple[int, ...]]


@dataclass
class Found:
    """What a checkpoint is: the source that read it, its tensors named as that network names them, and notes.

    Attributes:
        kind: ``"timm"``, ``"transformers"`` or ``"recognised"`` (the recogniser's families).
        sd: the tensors, renamed or taken from below a prefix where the file needed it.
        arch: the :class:`~.timm_resnets.TimmArch`, :class:`~.hf_resnets.HFArch` or recogniser's
            :class:`~.recognise.Architecture`.
        notes: what was done to the keys, one clause each ("the model sits under 'net.' …").
    """

    kind: str
    sd: dict[str, torch.Tensor]
    arch: TimmArch | HFArch | Architecture
    notes: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return self.arch.description + "".join(f"; {n}" for n in self.notes)


def is_timm_config(config: Mapping[str, Any] | None) -> bool:
    """A timm ``config.json``: it names an ``architecture`` (and holds a ``pretrained_cfg`` or ``num_classes``)."""
    return bool(config) and isinstance(config.get("architecture"), str) and (
        "pretrained_cfg" in config or "num_classes" in config)


def is_transformers_config(config: Mapping[str, Any] | None) -> bool:
    """A transformers ``config.json``: it has a ``model_type``."""
    return bool(config) and isinstance(config.get("model_type"), str)


@dataclass(frozen=True)
class Given:
    """What came with the weights: a ``config.json``, what messages call the file, and whether a max-pool follows
    a torchvision-style stem (``None``: as the stem says), and a timm model named instead of a ``config.json``."""

    config: Mapping[str, Any] | None
    source: str
    maxpool: bool | None = None
    timm_name: str | None = None  # a timm model the person named (``--arch timm/<name>``): only that one is tried


class Source:
    """One source of checkpoints. :meth:`find` answers a :class:`Found` for a state dict it reads, ``None`` for one
    it does not, or raises :class:`WeightsError` when the keys are its own but do not fit (a sentence worth more than
    any other source's)."""

    label = ""

    def find(self, sd: dict[str, torch.Tensor], shapes: Shapes, given: Given) -> Found | None:
        raise NotImplementedError


class TimmSource(Source):
    label = "timm"

    def find(self, sd, shapes, given):
        config = given.config if is_timm_config(given.config) else None
        if not (config or given.timm_name or looks_timm(shapes)):
            return None
        from .timm_resnets import recognise_timm

        if given.timm_name:
            arch = recognise_timm(shapes, config={**(config or {}), "architecture": given.timm_name},
                                  source=given.source, said="the architecture chosen")
        else:
            arch = recognise_timm(shapes, config=config, source=given.source)
        return None if arch is None else Found("timm", sd, arch)


class TransformersSource(Source):
    label = "transformers"

    def find(self, sd, shapes, given):
        if not looks_transformers(shapes):
            return None
        from .hf_resnets import recognise_hf

        config = given.config if is_transformers_config(given.config) else None
        try:
            arch = recognise_hf(shapes, config=config, source=given.source)
        except WeightsError as exc:
            if config is None and "does not fit" in str(exc):
                raise WeightsError(f"{exc}; it looks like a transformers ResNet without its config: give its "
                                   "config.json beside it") from None
            raise
        return None if arch is None else Found("transformers", sd, arch)


class RecogniserSource(Source):
    label = "the recogniser"

    def find(self, sd, shapes, given):
        # its WeightsError names the closest candidate
        return Found("recognised", sd, recognise(shapes, maxpool=given.maxpool, source=given.source))


class CifarRepoSource(Source):
    label = "kuangliu/pytorch-cifar"

    def find(self, sd, shapes, given):
        if not looks_cifar_repo(shapes):
            return None
        renamed = from_cifar_repo_keys(sd)
        try:
            arch = recognise(from_cifar_repo_keys(shapes), maxpool=given.maxpool, source=given.source)
        except WeightsError as exc:
            raise WeightsError(f"{exc} (after renaming the CIFAR-repo layout's keys, kuangliu/pytorch-cifar's "
                               "'shortcut' and 'linear', to torchvision's)") from None
        return Found("recognised", renamed, arch,
                     ["kuangliu/pytorch-cifar's layout ('shortcut' read as 'downsample', 'linear' as 'fc')"])


_TIMM = TimmSource()
# The recogniser before timm: a file in torchvision's names (timm's resnet50 has them too) stays torchvision's.
SOURCES: tuple[Source, ...] = (TransformersSource(), CifarRepoSource(), RecogniserSource(), _TIMM)


def _first(sd: dict[str, torch.Tensor], given: Given) -> Found:
    """The first source that reads ``sd`` (timm's, when a timm config.json names the model); when none does, the
    recogniser's sentence, with what the keys say of timm."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    sources = (_TIMM,) if is_timm_config(given.config) or given.timm_name else SOURCES
    recognised_error: WeightsError | None = None
    for src in sources:
        try:
            found = src.find(sd, shapes, given)
        except WeightsError as exc:
            if not isinstance(src, RecogniserSource):
                raise
            recognised_error, found = exc, None
        if found is not None:
            return found
    text = str(recognised_error or f"{given.source} fits no supported architecture")
    if looks_timm(shapes) and timm_signs(shapes):
        text += "; its key names are those of a timm ResNet, but no timm ResNet of its depth fits it"
    raise WeightsError(text)


def identify(
    sd: Mapping[str, torch.Tensor], *, source: str, config: Mapping[str, Any] | None = None,
    maxpool: bool | None = None,
    timm_name: str | None = None,
) -> Found:
    """Which network ``sd`` is, from its keys and shapes (and ``config``), whole or below a training prefix.

    Args:
        sd: a state dict from :func:`~.reader.read_checkpoint`.
        source: what messages call the checkpoint.
        config: a ``config.json`` given with the weights (timm's or transformers'); others are ignored.
        maxpool: for torchvision's blocks, whether a max-pool follows the stem (``None``: as the stem says).
        timm_name: a timm model the person named: only timm, and only that model, is tried.

    Returns:
        The :class:`Found`.

    Raises:
        WeightsError: one sentence: the source the keys point to and why they do not fit it, or the recogniser's
            closest candidate; a checkpoint whose network sits below a prefix (Lightning) says so.
    """
    sd, given = dict(sd), Given(config, source, maxpool, timm_name)
    try:
        return _first(sd, given)
    except WeightsError as exc:
        whole = exc
    for prefix in model_prefixes(sd):
        inside, left = under(sd, prefix)
        try:
            found = _first(inside, given)
        except WeightsError as exc:
            raise WeightsError(f"{source} looks like a Lightning checkpoint whose model sits under '{prefix}', but "
                               f"that model fits nothing either: {_clause(exc, source)}") from None
        where = f"the model sits under '{prefix}' (a Lightning-style checkpoint)"
        if left:
            where += f"; {len(left):,} key{'s' if len(left) != 1 else ''} outside it left out ('{left[0]}' …)"
        found.notes.insert(0, where)
        return found
    raise whole


def _clause(exc: WeightsError, source: str) -> str:
    text = str(exc)
    return text[len(source):].lstrip(" :") if text.startswith(source) else text


# --- the card of a network a library defines ------------------------------------------------------------------


def open_library(
    found: Found,
    *,
    name: str,
    source: str,
    config: Mapping[str, Any] | None = None,
    preprocessor: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    default_classes: Callable[[int], list[str]] | None = None,
    sha256: str = "",
) -> tuple[nn.Module, ModelCard]:
    """A timm or transformers network for ``found``, built by its library with the weights in, and its card.

    Preprocessing and labels are the library's: timm's ``pretrained_cfg`` (input size, crop_pct, mean, std,
    interpolation) and label names; transformers' ``preprocessor_config.json`` and ``id2label``. Without them:
    ImageNet's names for a 1000-way head, ``class 0`` … otherwise, and ImageNet's preprocessing for
    transformers, each said in the card.

    Args:
        found: from :func:`identify`, of kind ``"timm"`` or ``"transformers"``.
        name: the card's name.
        source: what messages call the checkpoint.
        config, preprocessor: the ``config.json`` and ``preprocessor_config.json`` given with the weights.
        class_names: names given by the person, one per class, instead of the library's.
        default_classes: names for a head the library has none for (``n`` -> names), before ImageNet's or numbers.
        sha256: the weights file's, for the card.

    Raises:
        ValueError: ``found`` is the recogniser's. WeightsError: weights that do not load, class names that do not
            fit the head, an input size out of range.
    """
    if found.kind == "timm":
        from .timm_resnets import build_timm, timm_labels, timm_preprocessing

        model = build_timm(found.arch, found.sd, source)
        pre = timm_preprocessing(model)
        labels, dataset = timm_labels(model, found.arch.num_classes)
        how = f"timm's pretrained_cfg for {found.arch.name}"
        arch, card_config = f"timm/{found.arch.name}", {"library": "timm", "model": found.arch.name,
                                                        "num_classes": found.arch.num_classes,
                                                        "in_chans": found.arch.in_chans}
        assumptions: list[str] = []
    elif found.kind == "transformers":
        from .hf_resnets import build_hf, hf_labels, hf_preprocessing

        model = build_hf(found.arch, found.sd, source)
        pre = hf_preprocessing(preprocessor, source)
        how = "its preprocessor_config.json"
        assumptions = list(found.arch.assumptions)
        if pre is None:
            pre = {"input_size": IMAGENET.input_size, "resize": IMAGENET.resize, "mean": list(IMAGENET.mean),
                   "std": list(IMAGENET.std), "interpolation": "bilinear", "crop_pct": 0.875}
            how = "ImageNet's, assumed (no preprocessor_config.json was given)"
        labels, dataset = hf_labels(config, found.arch.num_labels), ""
        arch, card_config = "transformers/resnet", {"library": "transformers", **found.arch.config,
                                                    "num_labels": found.arch.num_labels}
    else:
        raise ValueError(f"{found.kind!r} networks are built by the recogniser's fitting, not here")
    n = found.arch.num_classes if found.kind == "timm" else found.arch.num_labels
    in_chans = card_config.get("in_chans", card_config.get("num_channels", 3))
    if class_names is None and labels is None and default_classes is not None:
        class_names = default_classes(n)
    classes = _classes(class_names, labels, n)
    if labels is None and class_names is None:
        assumptions.append("ImageNet-1k's class names (1000 classes, no names were given)" if n == 1000 else
                           "numbered classes (no names were given)")
        dataset = "ImageNet-1k" if n == 1000 else dataset
    if not 8 <= pre["input_size"] <= MAX_INPUT_SIZE:
        raise WeightsError(f"{source}: its input size {pre['input_size']} is outside 8 … {MAX_INPUT_SIZE} pixels")
    mean, std = pre["mean"], pre["std"]
    if len(mean) != in_chans:  # one grey value for a network of another channel count
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    text = (f"{pre['input_size']}×{pre['input_size']} centre crop of the short side resized to {pre['resize']} "
            f"({pre['interpolation']}), mean {_fmt(mean)}, std {_fmt(std)}: {how}")
    training = {"source": source, "architecture": found.description, "preprocessing": text}
    if assumptions:
        training["assumptions"] = assumptions
    card = ModelCard(name=name, classes=classes, mean=mean, std=std, arch=arch, config=card_config,
                     input_size=pre["input_size"], resize=pre["resize"], colour_mode="gray" if in_chans == 1 else "rgb",
                     input_kind="photo", dataset=dataset, trained=True, training=training, weights_sha256=sha256)
    return model.eval(), card


def _classes(given: Sequence[str] | None, labels: list[str] | None, n: int) -> list[str]:
    if given is not None:
        if len(given) != n:
            raise WeightsError(f"{len(given)} class names were given, but the checkpoint's classifier has {n} classes")
        return list(given)
    if labels is not None:
        return labels
    return imagenet_classes() if n == 1000 else numbered_classes(n)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"
