"""Linear probes: where class information becomes linearly decodable, block by block.

A probe (Alain and Bengio 2016, "Understanding intermediate layers using linear classifier probes") is
a multinomial logistic regression trained on one block's globally average-pooled output ``y`` (a vector
of C channel means), standardised with the training features' mean and std. Set beside the network's
own head applied to the same block (:func:`~resnet_demo.core.insight.readout`, only where the block is
as wide as the head) it tells apart "the class can be read here" from "the head can read it here".

The probes are fitted by :mod:`resnet_demo.training.probes` and stored beside the weights as
``weights/<name>.probes.safetensors``: per block ``<block>.weight`` (classes, C), ``<block>.bias``
(classes,), ``<block>.mean`` and ``<block>.std`` (C,), float32, and in the header's metadata the
format, the classes, the block order and the sha256 of the weights they were fitted on.
:func:`load_probes` refuses a file that is missing, damaged or made for other weights;
:func:`probe_readings` applies them to one image's captured blocks for the page.

The features and the fit over a data set are a study: :mod:`resnet_demo.core.studies.probe_fitting`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .capture import BlockRecord, find_blocks
from .errors import WeightsError
from .weights.cards import WEIGHTS_DIR, ModelCard

__all__ = [
    "PROBES_FORMAT",
    "Probe",
    "ProbeReading",
    "ProbeSet",
    "find_probes",
    "load_probes",
    "probe_readings",
    "probes_path",
    "save_probes",
]

PROBES_FORMAT = "resnet_demo.probes/1"


@dataclass
class Probe:
    """One block's probe: ``logits = ((pooled - mean) / std) @ weight.T + bias``."""

    weight: torch.Tensor  # (classes, C) float32
    bias: torch.Tensor  # (classes,)
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, C) pooled features -> (N, classes) logits, float32 on the CPU."""
        z = (pooled.detach().float().cpu() - self.mean) / self.std
        return z @ self.weight.T + self.bias


@dataclass
class ProbeSet:
    """Probes for the blocks of one model, in forward order, and what they were fitted for."""

    probes: dict[str, Probe]
    classes: list[str]
    weights_sha256: str = ""
    model: str = ""

    @property
    def blocks(self) -> list[str]:
        return list(self.probes)


@dataclass
class ProbeReading:
    """One block's probe on one image: its top class and probability, and the probability it gives
    the network's final top-1 class."""

    name: str
    index: int
    label: str
    prob: float
    p_final: float | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "index": self.index, "label": self.label, "prob": self.prob,
                "p_final": self.p_final}


# --- applying them to one image -------------------------------------------------------------------


def probe_readings(probes: ProbeSet, records: Sequence[BlockRecord], *, final_index: int | None = None,
                   index: int = 0) -> list[ProbeReading]:
    """Every probed block's reading of one image of a capture (``records`` of an analysis), in block order.

    ``final_index``: the network's top-1 class, to report the probability each probe gives it.

    Raises:
        WeightsError: a captured block's width differs from its probe's (probes of another model).
    """
    out = []
    for r in records:
        probe = probes.probes.get(r.name)
        if probe is None or r.y is None:
            continue
        if r.y.shape[1] != probe.width:
            raise WeightsError(
                f"block {r.name} outputs {r.y.shape[1]} channels but its probe takes {probe.width}: "
                "the probes were fitted for another model"
            )
        pooled = r.y[index : index + 1].float().mean(dim=(2, 3))  # (1, C, H, W) -> (1, C)
        probs = torch.softmax(probe.logits(pooled)[0], dim=0)
        top = int(probs.argmax())
        p_final = float(probs[final_index]) if final_index is not None else None
        out.append(ProbeReading(r.name, top, probes.classes[top], float(probs[top]), p_final))
    return out


# --- the file beside the weights ------------------------------------------------------------------


def find_probes(
    card: ModelCard, model: nn.Module | None = None, weights_dir: str | Path = WEIGHTS_DIR
) -> ProbeSet | None:
    """The probes stored beside a model's weights (``<weights_dir>/<card.name>.probes.safetensors``),
    checked against its card and model; ``None`` when there are none (an uploaded model, say).

    Raises:
        WeightsError: the file is there but damaged or made for other weights.
    """
    path = probes_path(Path(weights_dir) / f"{card.name}.safetensors")
    return load_probes(path, card=card, model=model) if path.is_file() else None


def probes_path(weights: str | Path) -> Path:
    """``weights/<name>.safetensors`` -> ``weights/<name>.probes.safetensors``."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}.probes.safetensors")


def save_probes(probes: ProbeSet, path: str | Path) -> Path:
    """Write ``probes`` as safetensors (float32 tensors, metadata in the header); returns the path."""
    from safetensors.torch import save_file

    tensors = {}
    for name, p in probes.probes.items():
        for part in ("weight", "bias", "mean", "std"):
            tensors[f"{name}.{part}"] = getattr(p, part).detach().float().contiguous().cpu()
    metadata = {
        "format": PROBES_FORMAT,
        "model": probes.model,
        "weights_sha256": probes.weights_sha256,
        "classes": json.dumps(list(probes.classes)),
        "blocks": json.dumps(probes.blocks),
    }
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # safetensors writes 0600; the file ships beside the weights, readable like them
    tmp.replace(path)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise WeightsError(
            f"probes file {path} not found: compute it with python -m resnet_demo.training.probes"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"probes file {path} is not a readable safetensors file ({exc})") from None
    return tensors, meta


def _json_list(meta: dict[str, str], key: str, path: Path) -> list[str]:
    try:
        value = json.loads(meta.get(key, ""))
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise WeightsError(f"probes file {path} is damaged: its header's '{key}' is not a list of names")
    return value


def _probe(tensors: dict[str, torch.Tensor], name: str, k: int, path: Path) -> Probe:
    parts = {}
    for part in ("weight", "bias", "mean", "std"):
        t = tensors.get(f"{name}.{part}")
        if t is None:
            raise WeightsError(f"probes file {path} is damaged: it lacks {name}.{part}")
        if not torch.isfinite(t).all():
            raise WeightsError(f"probes file {path} is damaged: {name}.{part} holds values that are not finite")
        parts[part] = t.float()
    w = parts["weight"]
    c = w.shape[1] if w.ndim == 2 else -1
    shapes_ok = (w.ndim == 2 and w.shape[0] == k and tuple(parts["bias"].shape) == (k,)
                 and tuple(parts["mean"].shape) == (c,) and tuple(parts["std"].shape) == (c,))
    if not shapes_ok:
        raise WeightsError(
            f"probes file {path} is damaged: the shapes of block {name}'s probe do not fit {k} classes "
            f"(weight {tuple(w.shape)}, bias {tuple(parts['bias'].shape)}, mean {tuple(parts['mean'].shape)}, "
            f"std {tuple(parts['std'].shape)})"
        )
    if not (parts["std"] > 0).all():
        raise WeightsError(f"probes file {path} is damaged: block {name}'s std has values <= 0")
    return Probe(**parts)


def load_probes(path: str | Path, *, card: ModelCard | None = None, model: nn.Module | None = None) -> ProbeSet:
    """Read a probes file, checked against the model it is meant for.

    Args:
        path: ``weights/<name>.probes.safetensors``.
        card: the model's card: the classes must be its classes and, when both record one, the sha256
            of the weights the probes were fitted on must be the card's.
        model: the model: every probed block must be one of its blocks, as wide as it.

    Raises:
        WeightsError: the file is missing, not safetensors, damaged (missing tensors, wrong shapes,
            values not finite), of another format, or made for another model; the message says which.
    """
    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("format") != PROBES_FORMAT:
        raise WeightsError(
            f"probes file {path} is not a probes file of this project (format {meta.get('format')!r}, "
            f"expected {PROBES_FORMAT!r})"
        )
    classes, blocks = _json_list(meta, "classes", path), _json_list(meta, "blocks", path)
    probes = ProbeSet({b: _probe(tensors, b, len(classes), path) for b in blocks}, classes,
                      meta.get("weights_sha256", ""), meta.get("model", ""))
    extra = sorted(set(tensors) - {f"{b}.{p}" for b in blocks for p in ("weight", "bias", "mean", "std")})
    if extra:
        raise WeightsError(f"probes file {path} is damaged: it holds tensors no block names ({', '.join(extra[:3])})")
    if card is not None:
        _check_card(probes, card, path)
    if model is not None:
        _check_model(probes, model, path)
    return probes


def _check_card(probes: ProbeSet, card: ModelCard, path: Path) -> None:
    if list(card.classes) != probes.classes:
        raise WeightsError(
            f"probes file {path} was fitted for the classes {probes.classes[:4]}…, not this model's "
            f"{list(card.classes)[:4]}…: it belongs to another model"
        )
    if card.weights_sha256 and probes.weights_sha256 and card.weights_sha256 != probes.weights_sha256:
        raise WeightsError(
            f"probes file {path} was fitted on other weights (sha256 {probes.weights_sha256[:12]}…, the card "
            f"says {card.weights_sha256[:12]}…): compute them again with python -m resnet_demo.training.probes"
        )


def _check_model(probes: ProbeSet, model: nn.Module, path: Path) -> None:
    widths = {s.name: _out_width(s.module) for s in find_blocks(model)}
    for name, probe in probes.probes.items():
        if name not in widths:
            raise WeightsError(f"probes file {path} probes block {name}, which this model does not have")
        if widths[name] is not None and widths[name] != probe.width:
            raise WeightsError(
                f"probes file {path}: block {name} outputs {widths[name]} channels, its probe takes {probe.width}"
            )


def _out_width(block: nn.Module) -> int | None:
    """Output channels of a block: those of the last conv or BN inside it."""
    width = None
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            width = m.out_channels
        elif isinstance(m, nn.BatchNorm2d):
            width = m.num_features
    return width
