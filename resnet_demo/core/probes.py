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

The fit (:func:`fit_probe`) is deterministic: zero start, full-batch L-BFGS with a strong-Wolfe line
search in float64 on one thread, on ``mean cross-entropy + l2 / 2 * ||W||²`` (the bias is not penalised).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .capture import BlockRecord, capture_forward, find_blocks
from .cards import WEIGHTS_DIR, ModelCard
from .distributed import Dist
from .errors import WeightsError
from .insight import head_of, head_width

__all__ = [
    "PROBES_FORMAT",
    "BlockFeatures",
    "Probe",
    "ProbeReading",
    "ProbeSet",
    "block_features",
    "find_probes",
    "fit_probe",
    "load_probes",
    "probe_readings",
    "probes_path",
    "save_probes",
]

PROBES_FORMAT = "resnet_demo.probes/1"
STD_FLOOR = 1e-6  # a channel that never changes (a dead ReLU) is divided by 1, not by ~0
DEFAULT_BATCH = 100
MAX_ITER = 300  # L-BFGS iterations per fit; standardised features with a little L2 converge in far fewer


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


# --- features over a data set -------------------------------------------------------------------


@dataclass
class BlockFeatures:
    """Per block, the global average pool of ``y`` (N, C); the head applied to ``y`` where widths allow
    (N, classes); and the network's logits (N, classes). All float32 on the CPU, in block order."""

    pooled: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None


@torch.inference_mode()
def block_features(
    model: nn.Module,
    images: torch.Tensor,
    *,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dist: Dist | None = None,
    batch_size: int = DEFAULT_BATCH,
    with_head: bool = False,
) -> BlockFeatures:
    """Pooled block outputs (and, with ``with_head``, the head's readout of every block as wide as the
    head) of ``images``, in data order.

    Args:
        model: in eval mode, on its device (it is not modified).
        images: (N, C, H, W) uint8 images, turned into model input by ``normalise``; or float images,
            taken as model input already.
        dist: the data-parallel job (:class:`~resnet_demo.core.distributed.Dist`): each process runs its
            shard in whole batches of ``batch_size``, as one process would, and every process gets all
            the features. One process by default.

    Raises:
        ValueError: no images, or uint8 images without ``normalise``.
    """
    if len(images) == 0:
        raise ValueError("no images to compute block features from")
    if images.dtype == torch.uint8 and normalise is None:
        raise ValueError("uint8 images need a normalise function (uint8 batch -> model input)")
    dist = dist or Dist()
    device = next(model.parameters()).device
    head, width = (head_of(model), head_width(model)) if with_head else (None, 0)
    index = dist.shard(len(images), block=batch_size)
    pooled: dict[str, list[torch.Tensor]] = {}
    heads: dict[str, list[torch.Tensor]] = {}
    logits = []
    # A process whose shard is empty still runs one image (and keeps none of it), so that every process
    # knows every tensor's shape and gathers the same tensors in the same order.
    for idx in [index[s : s + batch_size] for s in range(0, len(index), batch_size)] or [None]:
        x, keep = (images[:1], 0) if idx is None else (images[idx], len(idx))
        # contiguous: a freshly decoded data set is channels-last in memory, its cached copy is not, and
        # the convolutions' last bits depend on the layout
        x = (normalise(x) if normalise is not None else x).to(device).contiguous()
        out, records = capture_forward(model, x)
        for r in records:
            pooled.setdefault(r.name, []).append(r.y[:keep].float().mean(dim=(2, 3)).cpu())  # (B, C, H, W) -> (B, C)
            if head is not None and r.y.shape[1] == width:
                heads.setdefault(r.name, []).append(head(r.y[:keep]).float().cpu())
        logits.append(out[:keep].float().cpu())
    return BlockFeatures(
        {k: dist.gather(torch.cat(v), index) for k, v in pooled.items()},
        {k: dist.gather(torch.cat(v), index) for k, v in heads.items()},
        dist.gather(torch.cat(logits), index),
    )


# --- fitting ----------------------------------------------------------------------------------------


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    return mean, torch.where(std > STD_FLOOR, std, torch.ones_like(std))


def fit_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, *, max_iter: int = MAX_ITER
) -> Probe:
    """Multinomial logistic regression on standardised ``features`` (N, C), by full-batch L-BFGS.

    Minimises ``mean cross-entropy + l2 / 2 * ||W||²`` from a zero start in float64, on one thread: the
    same data give the same probe, however many threads or processes computed the features.

    Raises:
        ValueError: no samples, labels out of range, a negative or non-finite ``l2``.
    """
    if features.ndim != 2 or len(features) == 0 or len(features) != len(labels):
        raise ValueError(f"need (N, C) features with one label each, got {tuple(features.shape)} and {len(labels)}")
    if not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    labels = labels.long().cpu()
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    threads = torch.get_num_threads()
    try:  # one thread: every sum in one order, whatever the machine
        torch.set_num_threads(1)
        return _fit(features, labels, num_classes, l2, max_iter)
    finally:
        torch.set_num_threads(threads)


def _fit(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, max_iter: int) -> Probe:
    mean, std = _standardise(features)
    z = (features.double().cpu() - mean) / std
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, labels) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(w.detach().float(), b.detach().float(), mean.float(), std.float())


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
