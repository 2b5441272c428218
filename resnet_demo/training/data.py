"""Image data sets as one uint8 tensor, and the uint8 batch -> model input step shared by training and evaluation.

A data set is decoded once into ``images`` ``(N, C, H, W)`` uint8 and ``labels`` ``(N,)`` int64, which is
what the training loop keeps on the device (the airbench layout). Sources, by ``spec`` string:

- a directory holding an ImageFolder tree ``<split>/<class>/<image>``;
- a ``.tar``/``.tar.gz``/``.tgz`` archive of such a tree (the format of ``../shared/datasets/``), read in place;
- ``torchvision:cifar10`` or ``torchvision:mnist`` (torchvision's copies; downloading needs ``download=True``);
- ``evalset:<name>`` or an ``.npz`` path: the small evaluation sets shipped in ``weights/evalset/``.

Images smaller than ``size`` in both sides are zero-padded around the centre (MNIST's 28x28 digits become
32x32 with 2 pixels of black on each side, as the digits were centred); larger ones are resized on the short
side and centre-cropped. Grayscale stays one channel in storage; :class:`Normalise` replicates it to the
model's input channels on the device. Class order is the sorted folder names, which is the standard label
order of CIFAR-10 and MNIST.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..core.errors import DataError
from ..core.preprocess import normalise_batch
from ..core.studies import evalsets

__all__ = [
    "DEFAULT_CACHE_DIR",
    "EVALSET_DIR",
    "DataError",
    "ImageSet",
    "Normalise",
    "list_imagefolder",
    "load_data",
    "load_evalset",
    "load_imagefolder",
    "load_torchvision",
    "subset",
]

REPO_DIR = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_DIR / "data" / "cache"
TORCHVISION_ROOT = REPO_DIR / "data" / "torchvision"
EVALSET_DIR = evalsets.EVALSET_DIR
IMAGE_SIZE = 32
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TORCHVISION_SETS = ("cifar10", "mnist")
# Bump when the decoded layout changes, so stale caches are not reused.
_CACHE_VERSION = 1
# Below this many files a process pool costs more than it saves (one 32x32 decode is ~50 us).
_POOL_MIN_FILES = 8000
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class ImageSet(NamedTuple):
    images: Tensor  # (N, C, H, W) uint8, C = 1 (gray) or 3 (RGB)
    labels: Tensor  # (N,) int64
    classes: list[str]


# --- decoding -----------------------------------------------------------------------------------


def _fit(img, size: int):
    from PIL import Image, ImageOps

    w, h = img.size
    if (w, h) == (size, size):
        return img
    if w <= size and h <= size:
        canvas = Image.new(img.mode, (size, size), 0)
        canvas.paste(img, ((size - w) // 2, (size - h) // 2))
        return canvas
    return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)


def _decode(item: bytes | str, size: int) -> np.ndarray:
    """One encoded image (bytes or a file path) -> (C, size, size) uint8, C = 1 for grayscale files."""
    from PIL import Image

    with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as img:
        gray = img.mode in _GRAY_MODES
        arr = np.asarray(_fit(img.convert("L" if gray else "RGB"), size), dtype=np.uint8)
    return arr[None] if gray else arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


def _decode_chunk(args: tuple[list, int]) -> list[np.ndarray]:
    items, size = args
    return [_decode(item, size) for item in items]


def _decode_all(items: list, size: int, workers: int | None, what: str) -> np.ndarray:
    n = len(items)
    workers = (
        workers
        if workers is not None
        else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )
    chunk = 1000
    jobs = [(items[i : i + chunk], size) for i in range(0, n, chunk)]
    try:
        if workers > 1 and n >= _POOL_MIN_FILES:
            # fork: workers only run PIL and numpy, and start without re-importing torch.
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers) as pool:
                parts = pool.map(_decode_chunk, jobs)
        else:
            parts = [_decode_chunk(job) for job in jobs]
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
        raise DataError(f"could not decode an image of {what}: {exc}") from None
    arrays = [a for part in parts for a in part]
    if any(a.shape[0] == 3 for a in arrays):  # a few gray files in a colour set: replicate them
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    # The decoded (C, H, W) arrays are views of (H, W, C) pixels, and np.stack keeps their memory order: made
    # C-contiguous here, as the cache gives them back, so a first run and later ones feed identical tensors
    # (convolutions on channels-last memory differ from contiguous ones in the last bit).
    return np.ascontiguousarray(np.stack(arrays))


# --- ImageFolder trees and archives ----------------------------------------------------------------


def _is_archive(path: Path) -> bool:
    return path.name.endswith((".tar", ".tar.gz", ".tgz"))


def _class_of(name: str, split: str | None) -> str | None:
    """Class of an archive member ``[prefix/]<split>/<class>/<file>``, or None when it is not one of split's images."""
    parts = PurePosixPath(name).parts
    if any(p.startswith(".") for p in parts) or not parts[-1].lower().endswith(IMG_EXTENSIONS):
        return None  # hidden files, e.g. macOS "._x.jpg" resource forks, are not images
    if split is None:
        return parts[-2] if len(parts) >= 2 else None
    return parts[-2] if len(parts) >= 3 and parts[-3] == split else None


def _scan_archive(path: Path, split: str | None, read: bool) -> list[tuple[str, str, bytes | None]]:
    """(class, member name, bytes) for every image of ``split``, sorted by class then name."""
    found = []
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                cls = _class_of(member.name, split)
                if cls is None:
                    continue
                data = tf.extractfile(member).read() if read else None
                found.append((cls, member.name, data))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"archive {path} could not be read ({exc})") from None
    found.sort(key=lambda t: (t[0], t[1]))
    return found


def _scan_dir(path: Path, split: str | None) -> list[tuple[str, str, str]]:
    root = path / split if split else path
    if not root.is_dir():
        raise DataError(f"{path} has no '{split}' folder: expected an ImageFolder tree {path}/{split}/<class>/<image>")
    found = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for f in sorted(class_dir.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(IMG_EXTENSIONS):
                found.append((class_dir.name, str(f.relative_to(path)), str(f)))
    return found


def list_imagefolder(path: str | Path, split: str | None = "train") -> list[tuple[str, str]]:
    """(class, file name inside the tree) of every image, in the order :func:`load_imagefolder` returns them."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data set {path} not found")
    found = _scan_archive(path, split, read=False) if _is_archive(path) else _scan_dir(path, split)
    return [(cls, name) for cls, name, _ in found]


def _cache_file(cache_dir: Path, path: Path, split: str | None, size: int, fingerprint: str) -> Path:
    key = hashlib.sha1(f"{_CACHE_VERSION}|{path.resolve()}|{split}|{size}|{fingerprint}".encode()).hexdigest()[:16]
    stem = path.name.split(".")[0] or "data"
    return cache_dir / f"{stem}-{split or 'all'}-{size}px-{key}.npz"


def _read_cache(file: Path) -> ImageSet | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            return ImageSet(
                torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]).long(), [str(c) for c in z["classes"]]
            )
    except (OSError, KeyError, ValueError):
        return None  # missing or damaged: decode again


def _write_cache(file: Path, data: ImageSet) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=data.images.numpy(), labels=data.labels.numpy(), classes=np.array(data.classes))
        os.replace(tmp, file)
    except OSError:
        pass  # a read-only cache only costs time


def load_imagefolder(
    path: str | Path,
    split: str | None = "train",
    *,
    size: int = IMAGE_SIZE,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    workers: int | None = None,
) -> ImageSet:
    """Decode an ImageFolder tree or archive into uint8 tensors.

    Args:
        path: a directory ``<split>/<class>/<image>`` or a ``.tar[.gz]`` archive of one (read in place).
        split: the split folder (``"train"``, ``"test"``); ``None`` when the class folders sit at the top.
        size: output side in pixels (smaller images are zero-padded centrally, larger ones resized and cropped).
        cache_dir: where decoded arrays are kept, keyed by the source's size and mtime; ``None`` disables it.
        workers: decoding processes (default: the CPUs available; a pool is used only for many files).

    Returns:
        ``ImageSet(images (N, C, size, size) uint8, labels (N,) int64, classes)`` with classes the sorted
        folder names and samples ordered by class, then file name.

    Raises:
        DataError: the source is missing, unreadable, or holds no images for ``split``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data set {path} not found")
    archive = _is_archive(path)
    if archive:
        st = path.stat()
        found = None
        fingerprint = f"{st.st_size}|{st.st_mtime_ns}"
    else:
        found = _scan_dir(path, split)
        stats = [os.stat(f) for _, _, f in found]
        fingerprint = f"{len(found)}|{sum(s.st_size for s in stats)}|{max((s.st_mtime_ns for s in stats), default=0)}"
    cache = _cache_file(Path(cache_dir), path, split, size, fingerprint) if cache_dir is not None else None
    if cache is not None and cache.is_file():
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    if found is None:
        found = _scan_archive(path, split, read=True)
    if not found:
        where = f"{split}/<class>/<image>" if split else "<class>/<image>"
        raise DataError(f"no images found in {path} under {where} (extensions {', '.join(IMG_EXTENSIONS)})")
    classes = sorted({cls for cls, _, _ in found})
    index = {c: i for i, c in enumerate(classes)}
    images = _decode_all([item for _, _, item in found], size, workers, str(path))
    labels = np.array([index[cls] for cls, _, _ in found], dtype=np.int64)
    data = ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes)
    if cache is not None:
        _write_cache(cache, data)
    return data


# --- torchvision's downloads and the shipped evaluation sets ---------------------------------------


def load_torchvision(
    name: str,
    split: str = "train",
    *,
    root: str | Path = TORCHVISION_ROOT,
    download: bool = False,
    size: int = IMAGE_SIZE,
) -> ImageSet:
    """CIFAR-10 or MNIST from torchvision's files under ``root``; fetches them only when ``download`` is set."""
    import torchvision.datasets as tvd

    name = name.lower().replace("-", "")
    if name not in TORCHVISION_SETS:
        raise DataError(f"unknown torchvision data set {name!r}: choose one of {', '.join(TORCHVISION_SETS)}")
    if split not in ("train", "test"):
        raise DataError(f"torchvision's {name} has the splits 'train' and 'test', not {split!r}")
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.MNIST
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except RuntimeError as exc:
        hint = "" if download else "; pass --download on a machine with internet access"
        raise DataError(f"torchvision {name} not available under {root} ({exc}){hint}") from None
    if name == "cifar10":
        images = (
            torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        )  # (N, H, W, C) -> (N, C, H, W)
        classes = list(ds.classes)
    else:
        images = ds.data.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
        classes = [str(d) for d in range(10)]  # the ImageFolder copy's folder names, not "0 - zero"
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        if h > size or w > size:
            raise DataError(f"torchvision {name} images are {h}x{w}, larger than size={size}")
        top, left = (size - h) // 2, (size - w) // 2
        images = torch.nn.functional.pad(images, (left, size - w - left, top, size - h - top))
    return ImageSet(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64), classes)


def load_evalset(name: str | Path) -> ImageSet:
    """A shipped evaluation set, by name (``"cifar10_test500"``, ``"mnist_test500"``) or ``.npz`` path."""
    images, labels, classes, _ = evalsets.load_evalset(name)
    return ImageSet(images, labels, classes)


def load_data(
    spec: str | Path,
    split: str = "train",
    *,
    size: int = IMAGE_SIZE,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    download: bool = False,
    workers: int | None = None,
) -> ImageSet:
    """Load the data set named by ``spec``: a directory, an archive, ``torchvision:<name>``, ``evalset:<name>``."""
    spec = str(spec)
    if spec.startswith("torchvision:"):
        root = Path(cache_dir).parent / "torchvision" if cache_dir is not None else TORCHVISION_ROOT
        return load_torchvision(spec.split(":", 1)[1], split, root=root, download=download, size=size)
    if spec.startswith("evalset:") or spec.endswith(".npz"):
        if split != "test":
            raise DataError(f"{spec} is an evaluation set: it has only a 'test' split, not {split!r}")
        return load_evalset(spec.split(":", 1)[1] if spec.startswith("evalset:") else spec)
    path = Path(spec)
    if path.is_dir() or _is_archive(path):
        return load_imagefolder(path, split, size=size, cache_dir=cache_dir, workers=workers)
    if not path.exists():
        raise DataError(
            f"data set {spec} not found: give an ImageFolder directory, a .tar.gz of one, "
            f"torchvision:cifar10, torchvision:mnist or evalset:<name>"
        )
    raise DataError(f"data set {spec} is neither a directory nor a .tar/.tar.gz/.tgz archive")


def subset(data: ImageSet, n: int | None, seed: int = 0) -> ImageSet:
    """``n`` samples drawn without replacement by a fixed seed (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(data.labels):
        return data
    idx = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return ImageSet(data.images[idx], data.labels[idx], data.classes)


# --- uint8 batch -> model input --------------------------------------------------------------------


class Normalise:
    """uint8 ``(B, C, H, W)`` -> float ``(B, in_channels, H, W)`` on ``device``: ``(x / 255 - mean) / std``,
    by the core's :func:`~resnet_demo.core.preprocess.normalise_batch` (the page's own step, so a model is
    trained on exactly the inputs it is later shown).

    A one-channel batch is replicated to ``in_channels`` (MNIST digits into the 3-channel tutorial ``Net``).
    ``mean``/``std`` have one entry or one per input channel, as in the model card. Unlike the page, training
    refuses a colour batch for a grey model instead of averaging it: a wrong data set should stop a run.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        in_channels: int = 3,
        device: str | torch.device = "cpu",
        *,
        channels_last: bool = True,
    ) -> None:
        if len(mean) != len(std) or len(mean) not in (1, in_channels):
            raise ValueError(f"mean {list(mean)} and std {list(std)} need 1 or {in_channels} entries each")
        self.device = torch.device(device)
        self.in_channels = in_channels
        self.channels_last = channels_last
        # on the device once, not copied there every batch
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=self.device)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {list(x.shape)}")
        if x.shape[1] not in (1, self.in_channels):
            raise ValueError(f"a {x.shape[1]}-channel batch does not fit a model with {self.in_channels} input "
                             "channels")
        x = normalise_batch(x, self.mean, self.std, self.in_channels, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
