"""Data-set exemplars: for every channel of every block's x, F(x) and y, the evaluation images that excite it most.

One scan over a labelled evaluation set (:mod:`.evalsets`, 500 images for the shipped models) with the
block capture (:mod:`.capture`), in batches. For each block, part (x, F(x), y) and channel, the channel's mean over its
map is one number per image; the scan keeps the ``k`` (9) images with the largest, and for F(x), which
is signed (the branch both adds to and removes from its input), also the ``k`` with the most negative.
For each kept image it keeps where on the map the channel peaks (argmax; argmin for the negative ones).

**Where a peak is in the image.** A map of side ``h`` over an input of side ``H`` has stride ``H / h``; its
unit ``(i, j)`` looks at input pixels around ``(i, j) * stride + offset``. The crop shown around it is
the channel-summed *effective receptive field* (Luo, Li, Urtasun and Zemel, "Understanding the effective
receptive field in deep convolutional neural networks", NIPS 2016) of the map's centre unit, measured
once per block and part: the gradient of that unit with respect to the input, in absolute value, summed
over channels and over :data:`ERF_IMAGES` evaluation images. ``offset`` is the gradient mass's centroid
less ``centre * stride``; the crop's side is that of the smallest square around the centroid holding
:data:`ERF_MASS` of the mass, at least a quarter of the input side (so a crop shows some context), at
most the whole input. For the shipped CIFAR-10 model that is 8 pixels (of 32) in stage 1 (the floor;
the mass itself fits in 3-7), 8-14 in stage 2 and 15-26 in stage 3, where the theoretical receptive field
is 3-15, 17-41 and 45-93 pixels: most of its area barely contributes. A crop near the border is shifted
to stay inside the image.

The shipped models' exemplars are computed by ``python -m resnet_demo.training.exemplars`` and stored
beside the weights as ``weights/<name>.exemplars.npz`` (indices into the evaluation set, values, peak
positions, the crop geometry, the evaluation set's name and the weights' sha256, so that a file left
over from other weights or another set is refused), with an entry ``studies["exemplars"]`` in the card.
Any other model is scanned on demand (:func:`exemplars_for`, with progress and a cache per model).
"""

from __future__ import annotations

import threading
import weakref
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..capture import BlockRecord, capture_forward
from ..errors import DataError, InputError, WeightsError
from ..explorer import Explorer
from ..weights.cards import WEIGHTS_DIR, ModelCard
from .budget import budgeted, footprint
from .distributed import Dist
from .evalsets import EvalSet, evalset_for, load_evalset
from .featurevis import SHOWN_PARTS, block_parts

__all__ = [
    "DEFAULT_K",
    "ERF_MASS",
    "STUDY",
    "ChannelExemplars",
    "Exemplar",
    "Exemplars",
    "exemplars_file",
    "exemplars_for",
    "load_exemplars",
    "scan_exemplars",
]

STUDY = "exemplars"  # the card's studies[...] key and the file's middle name: weights/<name>.exemplars.npz
FORMAT = 1  # version of the stored file's layout
DEFAULT_K = 9  # exemplars kept per channel (and negative ones per F(x) channel)
DEFAULT_BATCH = 50  # images per forward pass of the scan, at most (the server's study budget may ask for fewer)
ERF_IMAGES = 8  # evaluation images the effective receptive fields are measured on
ERF_MASS = 0.8  # share of the gradient mass a crop must hold
SIGNED = ("f",)  # parts with negative exemplars too: the branch is signed, x and y are after a ReLU


@dataclass(frozen=True)
class Exemplar:
    """One evaluation image kept for a channel: its index in the set, the channel's mean on it, where the
    channel peaks on its map, and the crop of the input around that peak."""

    index: int
    value: float
    peak: tuple[int, int]  # (row, column) on the block's feature map
    box: tuple[int, int, int]  # (top, left, side) in the model's input pixels


@dataclass(frozen=True)
class ChannelExemplars:
    """What one channel of one part of one block responds to in the evaluation set."""

    block: str
    part: str
    channel: int
    evalset: str
    top: tuple[Exemplar, ...]  # most excited first
    bottom: tuple[Exemplar, ...]  # most negative first; F(x) only, else empty
    mean: float  # the channel's mean activation over the whole set
    input_size: tuple[int, int]  # the model's input (H, W), which the boxes are in

    def crops(self, images: torch.Tensor, *, negative: bool = False) -> list[np.ndarray]:
        """The crops of :attr:`top` (or :attr:`bottom`) from the evaluation set's uint8 ``images`` (N, C, H, W),
        each (side, side, C) uint8, or (side, side) for one channel. Boxes are scaled to the images' size
        when the model resizes them to another input size."""
        sy, sx = images.shape[-2] / self.input_size[0], images.shape[-1] / self.input_size[1]
        out = []
        for e in self.bottom if negative else self.top:
            top, left, side = e.box
            out.append(_crop(images[e.index], round(top * sy), round(left * sx), max(1, round(side * sy)),
                             max(1, round(side * sx))))
        return out


@dataclass(frozen=True)
class _Geometry:
    fmap: tuple[int, int]  # (h, w) of the part's map
    crop: int  # side of the crop in input pixels
    offset: tuple[float, float]  # receptive-field centre of unit (0, 0), input pixels


class Exemplars:
    """Every channel's exemplars for one model over one evaluation set.

    Arrays per part ``v`` (channels of all blocks concatenated in forward order): ``top_index[v]``
    (channels, k) int, ``top_value[v]`` float32, ``top_pos[v]`` (channels, k, 2) (row, column), and for
    F(x) ``bottom_*`` likewise; ``mean[v]`` (channels,) the mean over the set.
    """

    def __init__(self, *, blocks: list[str], widths: np.ndarray, geometry: np.ndarray, arrays: dict[str, np.ndarray],
                 evalset: str, n_images: int, k: int, input_size: tuple[int, int], weights_sha256: str = "") -> None:
        self.blocks, self.widths, self.arrays = list(blocks), np.asarray(widths, dtype=np.int64), arrays
        self.geometry = np.asarray(geometry, dtype=np.float64)  # (blocks, parts, 5): h, w, crop, offset y, x
        self.evalset, self.n_images, self.k = evalset, int(n_images), int(k)
        self.input_size, self.weights_sha256 = (int(input_size[0]), int(input_size[1])), weights_sha256
        self._first = {v: np.concatenate([[0], np.cumsum(self.widths[:, i])]) for i, v in enumerate(SHOWN_PARTS)}

    def width(self, block: str, part: str) -> int:
        """Channels of ``part`` of ``block``."""
        return int(self.widths[self._block(block), SHOWN_PARTS.index(self._part(part))])

    def channel(self, block: str, part: str, channel: int) -> ChannelExemplars:
        """One channel's exemplars.

        Raises:
            InputError: an unknown block or part, or a channel out of range.
        """
        b, v = self._block(block), self._part(part)
        width = self.width(block, v)
        if not 0 <= channel < width:
            raise InputError(f"{v} of block {block} has {width} channels (0 to {width - 1}); got {channel}")
        row = int(self._first[v][b]) + int(channel)
        geo = self._geometry(b, v)
        top = self._row("top", v, row, geo)
        bottom = self._row("bottom", v, row, geo) if v in SIGNED else ()
        mean = float(self.arrays[f"{v}_mean"][row])
        return ChannelExemplars(block, v, int(channel), self.evalset, top, bottom, mean, self.input_size)

    def _row(self, which: str, part: str, row: int, geo: _Geometry) -> tuple[Exemplar, ...]:
        idx, val, pos = (self.arrays[f"{part}_{which}_{a}"][row] for a in ("index", "value", "pos"))
        return tuple(Exemplar(int(i), float(x), (int(p[0]), int(p[1])), _box(p, geo, self.input_size))
                     for i, x, p in zip(idx, val, pos))

    def _geometry(self, b: int, part: str) -> _Geometry:
        h, w, crop, oy, ox = self.geometry[b, SHOWN_PARTS.index(part)]
        return _Geometry((int(h), int(w)), int(crop), (float(oy), float(ox)))

    def crop_side(self, block: str, part: str) -> int:
        """Side of the crops of ``part`` of ``block``, in input pixels."""
        return self._geometry(self._block(block), self._part(part)).crop

    def _block(self, block: str) -> int:
        if block not in self.blocks:
            raise InputError(f"unknown block {block!r}; the exemplars cover blocks {self.blocks}")
        return self.blocks.index(block)

    @staticmethod
    def _part(part: str) -> str:
        if part not in SHOWN_PARTS:
            raise InputError(f"unknown part {part!r}; choose one of {list(SHOWN_PARTS)}")
        return part

    # --- the stored file ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the ``.npz`` (compressed; no pickled objects)."""
        np.savez_compressed(
            Path(path), format=np.int64(FORMAT), evalset=np.str_(self.evalset),
            weights_sha256=np.str_(self.weights_sha256), n_images=np.int64(self.n_images), k=np.int64(self.k),
            input_size=np.asarray(self.input_size, np.int64), blocks=np.asarray(self.blocks, dtype=np.str_),
            widths=self.widths, geometry=self.geometry.astype(np.float32), **self.arrays,
        )

    @classmethod
    def load(cls, path: str | Path, *, evalset: str | None = None, weights_sha256: str | None = None) -> Exemplars:
        """Read a stored file, refusing one that is missing, unreadable, malformed, or made for another
        evaluation set or other weights (``evalset`` / ``weights_sha256``, when given).

        Raises:
            WeightsError: the message names the file and what is wrong with it.
        """
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"exemplars file {path} not found (python -m resnet_demo.training.exemplars makes it)")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {name: z[name] for name in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise WeightsError(f"exemplars file {path} is not a readable .npz file ({exc})") from None
        try:
            result = cls._from_arrays(data)
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise WeightsError(f"exemplars file {path} is malformed ({exc})") from None
        if evalset is not None and result.evalset != evalset:
            raise WeightsError(
                f"exemplars file {path} was computed over {result.evalset!r}, not {evalset!r}: it is stale"
            )
        if weights_sha256 is not None and result.weights_sha256 != weights_sha256:
            raise WeightsError(
                f"exemplars file {path} was computed for other weights (sha256 {result.weights_sha256[:12]}…, "
                f"these are {weights_sha256[:12]}…): it is stale; run python -m resnet_demo.training.exemplars again"
            )
        return result

    @classmethod
    def _from_arrays(cls, d: dict[str, np.ndarray]) -> Exemplars:
        if int(d["format"]) != FORMAT:
            raise ValueError(f"format {int(d['format'])}, this code reads format {FORMAT}")
        blocks = [str(b) for b in d["blocks"]]
        widths, geometry, k, n = d["widths"], d["geometry"], int(d["k"]), int(d["n_images"])
        if widths.shape != (len(blocks), len(SHOWN_PARTS)) or geometry.shape != (len(blocks), len(SHOWN_PARTS), 5):
            raise ValueError(f"widths {widths.shape} / geometry {geometry.shape} do not fit {len(blocks)} blocks")
        arrays = {}
        for v, total in zip(SHOWN_PARTS, widths.sum(axis=0)):
            for which in ("top", "bottom") if v in SIGNED else ("top",):
                index, value, pos = (d[f"{v}_{which}_{a}"] for a in ("index", "value", "pos"))
                if index.shape != (total, k) or value.shape != (total, k) or pos.shape != (total, k, 2):
                    raise ValueError(f"{v}_{which} arrays have shapes {index.shape}, {value.shape}, {pos.shape}")
                if index.size and not (0 <= index.min() and index.max() < n):
                    raise ValueError(f"{v}_{which}_index holds indices outside the {n} images")
                arrays.update({f"{v}_{which}_index": index, f"{v}_{which}_value": value, f"{v}_{which}_pos": pos})
            if d[f"{v}_mean"].shape != (total,):
                raise ValueError(f"{v}_mean has shape {d[f'{v}_mean'].shape}, expected ({total},)")
            arrays[f"{v}_mean"] = d[f"{v}_mean"]
        return cls(blocks=blocks, widths=widths, geometry=geometry, arrays=arrays, evalset=str(d["evalset"]),
                   n_images=n, k=k, input_size=tuple(d["input_size"]), weights_sha256=str(d["weights_sha256"]))


# --- crops ---------------------------------------------------------------------------------------------


def _box(pos, geo: _Geometry, input_size: tuple[int, int]) -> tuple[int, int, int]:
    """(top, left, side) of the crop around map unit ``pos`` (row, column), inside the input."""
    side = geo.crop
    corner = []
    for p, n, size, off in zip(pos, geo.fmap, input_size, geo.offset):
        centre = float(p) * size / n + off
        corner.append(int(min(max(round(centre - (side - 1) / 2), 0), size - side)))
    return corner[0], corner[1], side


def _crop(image: torch.Tensor, top: int, left: int, height: int, width: int) -> np.ndarray:
    arr = image.permute(1, 2, 0).cpu().numpy()  # (H, W, C) uint8
    out = arr[top : top + height, left : left + width]
    return np.ascontiguousarray(out[:, :, 0] if out.shape[2] == 1 else out)


# --- the scan --------------------------------------------------------------------------------------------


def _receptive_fields(explorer: Explorer, images: torch.Tensor, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, parts, 5): map h, w, crop side, offset y, x from the effective receptive field of each
    part's centre unit (see the module's docstring); and (blocks, parts) the channel counts. The gradients
    are taken ``chunk`` images at a time (their masses add up)."""
    x0 = explorer.batch_input(images)
    size = x0.shape[-2:]
    rows, widths = [], []
    for name in explorer.block_names:
        mass: dict[str, torch.Tensor] = {}
        shape: dict[str, tuple[int, int, int]] = {}
        with block_parts(explorer.model, name) as run:
            for start in range(0, len(x0), chunk):
                x = x0[start : start + chunk].detach().clone().requires_grad_(True)
                out = run(x)
                for v in SHOWN_PARTS:
                    t = out[v]
                    h, w = t.shape[-2:]
                    (grad,) = torch.autograd.grad(t[:, :, h // 2, w // 2].sum(), x, retain_graph=v != SHOWN_PARTS[-1])
                    m = grad.abs().sum(dim=(0, 1)).double().cpu()
                    mass[v] = m if v not in mass else mass[v] + m
                    shape[v] = (t.shape[1], h, w)
                del out
        rows.append([_erf_geometry(mass[v], shape[v][1:], (shape[v][1] // 2, shape[v][2] // 2), size)
                     for v in SHOWN_PARTS])
        widths.append([shape[v][0] for v in SHOWN_PARTS])
    return np.asarray(rows, dtype=np.float64), np.asarray(widths, dtype=np.int64)


def _erf_geometry(mass: torch.Tensor, fmap: tuple[int, int], centre: tuple[int, int], size) -> list[float]:
    H, W = int(size[0]), int(size[1])
    total = float(mass.sum())
    if total <= 0:  # no gradient reaches the input (dead units): the stride's grid and the smallest crop
        return [fmap[0], fmap[1], max(1, min(H, W) // 4), 0.0, 0.0]
    ys = torch.arange(H, dtype=torch.float64)[:, None]
    xs = torch.arange(W, dtype=torch.float64)[None, :]
    cy, cx = float((mass * ys).sum() / total), float((mass * xs).sum() / total)
    lo, hi = max(1, min(H, W) // 4), min(H, W)
    side = hi
    for s in range(lo, hi + 1):
        top = min(max(round(cy - (s - 1) / 2), 0), H - s)
        left = min(max(round(cx - (s - 1) / 2), 0), W - s)
        if float(mass[top : top + s, left : left + s].sum()) >= ERF_MASS * total:
            side = s
            break
    return [fmap[0], fmap[1], side, cy - centre[0] * H / fmap[0], cx - centre[1] * W / fmap[1]]


def _stat_keys() -> list[str]:
    return [f"{v}_{stat}" for v in SHOWN_PARTS for stat in ("mean", "argmax", *(("argmin",) if v in SIGNED else ()))]


def _empty(key: str, widths: np.ndarray) -> torch.Tensor:
    """No images yet: (0, channels) of the statistic's dtype (a process whose shard is empty has only this)."""
    part = key.split("_")[0]
    dtype = torch.float32 if key.endswith("_mean") else torch.int64
    return torch.zeros((0, int(widths[:, SHOWN_PARTS.index(part)].sum())), dtype=dtype)


def _channel_stats(t: torch.Tensor) -> torch.Tensor:
    """What the scan keeps of one block tensor (B, C, h, w): per image and channel the mean over the map and
    the flat positions of its maximum and minimum, (B, C, 3) float64 (exact for both)."""
    t = t.float().flatten(2)
    return torch.stack([t.mean(dim=2).double(), t.argmax(dim=2).double(), t.argmin(dim=2).double()], dim=2)


def _batch_stats(records: list[BlockRecord]) -> dict[str, torch.Tensor]:
    """Per image and channel (all blocks concatenated): the mean over the map, and the flat position of
    the map's maximum (and minimum, for F(x)); each (B, channels). ``records`` hold :func:`_channel_stats`."""
    out: dict[str, list[torch.Tensor]] = {}
    for v in SHOWN_PARTS:
        stats = [getattr(r, v) for r in records]
        out.setdefault(f"{v}_mean", []).extend(t[:, :, 0].float() for t in stats)
        out.setdefault(f"{v}_argmax", []).extend(t[:, :, 1].long() for t in stats)
        if v in SIGNED:
            out.setdefault(f"{v}_argmin", []).extend(t[:, :, 2].long() for t in stats)
    return {key: torch.cat(parts, dim=1).cpu() for key, parts in out.items()}


def _top(values: torch.Tensor, flat_pos: torch.Tensor, widths: list[int], fmaps: list[tuple[int, int]], k: int,
         descending: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every channel (column of ``values``, (N, channels)): its k extreme images, ties to the lower
    index (a stable sort); returns (channels, k) indices, values and (channels, k, 2) map positions."""
    order = torch.sort(values, dim=0, descending=descending, stable=True).indices[:k].T  # (channels, k)
    chosen = torch.gather(values.T, 1, order)
    flat = torch.gather(flat_pos.T, 1, order)
    map_w = torch.cat([torch.full((c,), fw, dtype=torch.int64) for c, (_, fw) in zip(widths, fmaps)])[:, None]
    pos = torch.stack([flat // map_w, flat % map_w], dim=2)
    index = order.numpy().astype(np.int16 if len(values) < 2**15 else np.int32)
    return index, chosen.numpy(), pos.numpy().astype(np.int16)


def scan_exemplars(
    explorer: Explorer,
    evalset: EvalSet,
    *,
    k: int = DEFAULT_K,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[float], None] | None = None,
    dist: Dist | None = None,
) -> Exemplars:
    """Scan ``evalset`` once and keep every channel's ``k`` exemplars (see the module's docstring).

    Args:
        explorer: the model and its preprocessing (:meth:`Explorer.batch_input`).
        evalset: uint8 images in the model's training format.
        batch_size: images per forward pass, at most: fewer when the server's study budget asks for it
            (:mod:`~.budget`); the result does not depend on it.
        progress: called with the share of this process's batches done, after each.
        dist: under ``torchrun``, this process's place (:class:`~.distributed.Dist`): it scans its shard in
            whole batches, and the per-image statistics are gathered back into data order, so every
            process gets exactly the single-process result.

    Raises:
        InputError: fewer than ``k`` images, or ``k`` < 1.
        StudyTooLarge: not even one image fits the server's study budget.
    """
    n = len(evalset.images)
    if k < 1 or n < k:
        raise InputError(f"keeping {k} exemplars per channel needs at least {k} images; the set has {n}")
    dist = dist or Dist()
    with torch.inference_mode():
        sample = explorer.batch_input(evalset.images[:1])
        with_grad, scan_pass = footprint(explorer.model, sample, grad=True), footprint(explorer.model, sample)
    what = f"The exemplar scan of {explorer.card.name}"
    with budgeted(with_grad, min(ERF_IMAGES, n), what=what) as chunk:
        geometry, widths = _receptive_fields(explorer, evalset.images[:ERF_IMAGES], chunk)
    # the capture keeps x, F(x) and y of every block only as per-channel means and peak positions
    with budgeted(scan_pass, min(batch_size, n), what=what) as batch_size:
        mine = dist.shard(n, block=batch_size)
        starts = list(range(0, len(mine), batch_size))
        stats: dict[str, list[torch.Tensor]] = {key: [_empty(key, widths)] for key in _stat_keys()}
        for i, s in enumerate(starts):
            batch = evalset.images[mine[s : s + batch_size]]
            with torch.inference_mode():
                _, records = capture_forward(explorer.model, explorer.batch_input(batch), keep=SHOWN_PARTS,
                                             reduce=_channel_stats)
                for key, t in _batch_stats(records).items():
                    stats[key].append(t)
            if progress is not None:
                progress((i + 1) / len(starts))
    # every process's per-image numbers, back in data order: the top-k below is then the single process's
    full = {key: dist.gather(torch.cat(parts).to(dist.device), mine.to(dist.device)).cpu()
            for key, parts in stats.items()}
    arrays = {}
    for j, v in enumerate(SHOWN_PARTS):
        fmaps = [(int(h), int(w)) for h, w in geometry[:, j, :2]]
        which = [("top", "argmax", True)] + ([("bottom", "argmin", False)] if v in SIGNED else [])
        for name, pos_key, descending in which:
            idx, val, pos = _top(full[f"{v}_mean"], full[f"{v}_{pos_key}"], list(widths[:, j]), fmaps, k, descending)
            arrays.update({f"{v}_{name}_index": idx, f"{v}_{name}_value": val, f"{v}_{name}_pos": pos})
        arrays[f"{v}_mean"] = full[f"{v}_mean"].double().mean(dim=0).float().numpy()
    size = explorer.card.input_size
    return Exemplars(blocks=explorer.block_names, widths=widths, geometry=geometry, arrays=arrays, evalset=evalset.name,
                     n_images=n, k=k, input_size=(size, size), weights_sha256=explorer.card.weights_sha256)


# --- stored and on-demand ---------------------------------------------------------------------------------


def exemplars_file(card: ModelCard, weights_dir: str | Path = WEIGHTS_DIR) -> Path:
    """Where a model's exemplars are stored: ``<weights_dir>/<name>.exemplars.npz``."""
    return Path(weights_dir) / f"{card.name}.{STUDY}.npz"


def load_exemplars(card: ModelCard, weights_dir: str | Path = WEIGHTS_DIR) -> Exemplars:
    """The stored exemplars its card names (``studies["exemplars"]``), checked against the card's weights
    sha256 and evaluation set.

    Raises:
        WeightsError: the card has no such entry, or the file is missing, corrupt or stale.
    """
    entry = card.studies.get(STUDY)
    if not isinstance(entry, dict) or "file" not in entry:
        raise WeightsError(f"the card of {card.name} names no stored exemplars (studies[{STUDY!r}])")
    return Exemplars.load(Path(weights_dir) / entry["file"], evalset=entry.get("evalset"),
                          weights_sha256=card.weights_sha256)


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Exemplars
_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the lock its first scan holds
_cache_lock = threading.Lock()


def exemplars_for(
    explorer: Explorer,
    *,
    weights_dir: str | Path = WEIGHTS_DIR,
    progress: Callable[[float], None] | None = None,
) -> Exemplars:
    """The model's exemplars: the stored file when its card names one, else a scan of its shipped evaluation
    set (``progress`` is called as it goes); either is remembered per model object, and requests arriving
    during a model's scan wait for it rather than scan again.

    Raises:
        WeightsError: the card names a stored file that is missing, corrupt or stale.
        DataError: no stored file, and no shipped evaluation set fits the model's classes and input.
    """
    model = explorer.model
    with _cache_lock:
        lock = _locks.setdefault(model, threading.Lock())
    with lock:
        if model in _cache:
            return _cache[model]
        if STUDY in explorer.card.studies:
            result = load_exemplars(explorer.card, weights_dir)
        else:
            name = evalset_for(explorer.card)
            if name is None:
                raise DataError(f"no shipped evaluation set fits {explorer.card.name} (its classes and kind of "
                                "input): exemplars need a model of CIFAR-10's or MNIST's classes")
            result = scan_exemplars(explorer, load_evalset(name), progress=progress)
        _cache[model] = result
    return result
