"""A labelled image set the user gives: a ZIP (or, on the command line, a folder) with one folder per class.

``cat/0001.png``, ``dog/0002.jpg``: an image's label is the folder it sits in (as the project's ImageFolder
reader has it, so ``myset/cat/0001.png`` works too), matched to the model's classes by name, case and ``_``
versus space ignored. Each image goes through the project's preprocessing for the model's card (decoding
within ``preprocess``'s limits, EXIF, photos resized and cropped, drawings centred as MNIST's) and is kept
as uint8 ``(C, H, W)`` at the model's input size: exactly what an evaluation set holds, so the same scan
reads both.

A ZIP from a visitor is untrusted. Before anything is inflated: the archive's size, its number of entries
(counted from the central-directory signatures in its bytes, before :mod:`zipfile` parses them), every
name (no absolute path, no ``..``), every entry's type (no links, devices, pipes or sockets), encryption,
and each image's declared size, its compression ratio and their total are checked. While reading, the
bytes that actually come out are counted against the same bounds, and a member whose header lies about
its size fails its size or checksum test. Members are read into memory one at a time and decoded at
once: nothing is written to disk. Nested archives are never opened; other files are skipped and counted.
Every refusal is a :class:`DataError` that says what was wrong.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, InputError
from ..preprocess import MAX_PIXELS, drawing_array, load_image, photo_array
from ..weights.cards import ModelCard

__all__ = [
    "IMAGE_EXTENSIONS",
    "LIMITS",
    "SKIP_ARCHIVE",
    "SKIP_LINK",
    "SKIP_NOT_IMAGE",
    "SKIP_OUTSIDE",
    "SKIP_SYSTEM",
    "SKIP_UNKNOWN",
    "SKIP_UNREADABLE",
    "LabelledSet",
    "Limits",
    "read_labelled",
    "read_labelled_folder",
    "read_labelled_zip",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".jar", ".whl")
# Why a file was skipped: the keys of LabelledSet.skipped.
SKIP_NOT_IMAGE = "not an image"
SKIP_ARCHIVE = "nested archive (not opened)"
SKIP_SYSTEM = "hidden or system file"
SKIP_OUTSIDE = "not in a class folder"
SKIP_UNKNOWN = "in a folder that is none of the model's classes"
SKIP_UNREADABLE = "unreadable image"
SKIP_LINK = "link (not followed)"
_CHUNK = 1 << 20  # bytes read from a member at a time, each counted against the bounds
_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket"}
_MB = 1 << 20


def _mb(n: float) -> str:
    return f"{n / _MB:.3g} MB"


@dataclass(frozen=True)
class Limits:
    """Bounds on a labelled set. A ZIP of 2,000 CIFAR-sized PNGs is ~5 MB; of 2,000 phone photos, far more
    than anyone should upload to a demo. ``max_ratio`` applies to members that inflate beyond ``ratio_floor``
    (a small flat BMP compresses 100× and harms nobody; 50 MB of zeros compresses 1,000×)."""

    max_images: int = 2000
    max_entries: int = 10_000  # every entry of the archive, images or not, folders included
    max_archive_bytes: int = 64 * _MB  # the ZIP as uploaded
    max_member_bytes: int = 16 * _MB  # one image, inflated
    max_total_bytes: int = 512 * _MB  # all images, inflated
    max_ratio: float = 200.0  # inflated / compressed size of one member
    ratio_floor: int = 1 * _MB
    max_total_pixels: int = 1_000_000_000  # all images as decoded (before resizing): bounds the decoding time
    max_set_bytes: int = 256 * _MB  # the set as kept, at the model's input size (2,000 at 224×224 RGB: 287 MB)


LIMITS = Limits()


@dataclass
class LabelledSet:
    """A labelled set, decoded: like an :class:`~.evalsets.EvalSet`, with what was left out and why."""

    images: torch.Tensor  # (N, C, H, W) uint8 at the model's input size; C = 1 for gray / drawing models
    labels: torch.Tensor  # (N,) int64, indices into ``classes``
    classes: list[str]  # the model's classes
    name: str
    files: list[str]  # each image's name in the archive or folder
    skipped: dict[str, int] = field(default_factory=dict)  # reason (SKIP_*) -> how many files
    problems: list[str] = field(default_factory=list)  # the first few unreadable images, "name: why"


@dataclass
class _Item:
    name: str  # as shown to the user
    folder: str  # the class folder's name, as written
    size: int  # declared (ZIP) or on-disk bytes


class _Tally:
    """What was skipped, and the first few reasons an image could not be read."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.problems: list[str] = []

    def skip(self, reason: str, problem: str | None = None) -> None:
        self.skipped[reason] += 1
        if problem is not None and len(self.problems) < 5:
            self.problems.append(problem)


# --- names and classes --------------------------------------------------------------------------------------


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def _class_lookup(classes: list[str]) -> dict[str, int]:
    lookup: dict[str, int] = {}
    for i, c in enumerate(classes):
        lookup.setdefault(_key(c), i)
    return lookup


def _classify(parts: tuple[str, ...]) -> str | None:
    """Why a file at ``parts`` is not an image to read (a SKIP_* reason), or ``None`` when it is one."""
    if any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1].casefold() == "thumbs.db":
        return SKIP_SYSTEM  # macOS resource forks ("__MACOSX/._x.png"), .DS_Store, Windows thumbnails
    suffix = parts[-1].casefold()
    if suffix.endswith(ARCHIVE_EXTENSIONS):
        return SKIP_ARCHIVE
    if not suffix.endswith(IMAGE_EXTENSIONS):
        return SKIP_NOT_IMAGE
    if len(parts) < 2:
        return SKIP_OUTSIDE
    return None


def _listing(classes: list[str], most: int = 30) -> str:
    shown = ", ".join(classes[:most])
    return shown + (f", … ({len(classes)} in all)" if len(classes) > most else "")


def _match_classes(items: list[_Item], classes: list[str], unknown: str, what: str, tally: _Tally) -> list[int]:
    """Each item's class index; items in unknown folders are refused (``unknown="error"``) or dropped (-1)."""
    lookup = _class_lookup(classes)
    labels = [lookup.get(_key(item.folder), -1) for item in items]
    strays = sorted({item.folder for item, label in zip(items, labels) if label < 0})
    if strays and unknown == "error":
        names = ", ".join(f"'{s}'" for s in strays[:20]) + (f" and {len(strays) - 20} more" if len(strays) > 20 else "")
        raise DataError(
            f"{what} has image folder(s) {names} that match none of the model's {len(classes)} classes: "
            f"{_listing(classes)}. Name each folder after a class (case does not matter), or remove it."
        )
    for label in labels:
        if label < 0:
            tally.skip(SKIP_UNKNOWN)
    return labels


def _check_count(n: int, card: ModelCard, limits: Limits, what: str) -> None:
    """Refuse a set with too many images, or one that would be too large at the model's input size."""
    if n > limits.max_images:
        raise DataError(f"{what} holds {n} images; the limit is {limits.max_images}")
    channels = 1 if card.input_kind == "drawing" or card.colour_mode == "gray" else 3
    size = n * channels * card.input_size**2
    if size > limits.max_set_bytes:
        raise DataError(f"{what}: {n} images at {card.input_size}×{card.input_size} would take {_mb(size)}; the "
                        f"limit is {_mb(limits.max_set_bytes)}. Use fewer images")


# --- decoding -------------------------------------------------------------------------------------------------


def _pixels(data: bytes) -> int:
    """The image's size from its header alone (0 when PIL cannot tell: decoding will say why)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size[0] * img.size[1]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 0


def _model_array(data: bytes, card: ModelCard) -> np.ndarray:
    """One encoded image -> (C, H, W) uint8 as :func:`~.preprocess.prepare` makes it, before normalisation."""
    if card.input_kind == "drawing":
        arr = drawing_array(load_image(data), card)
    else:
        arr = photo_array(load_image(data, draft_size=card.resize * 2), card)
        if card.colour_mode == "gray":
            arr = np.asarray(Image.fromarray(arr).convert("L"))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class _Decoder:
    """Decodes images one at a time within the set's pixel budget; unreadable ones are skipped and counted."""

    def __init__(self, card: ModelCard, limits: Limits, tally: _Tally) -> None:
        self.card, self.limits, self.tally = card, limits, tally
        self.pixels = 0
        self.arrays: list[np.ndarray] = []
        self.labels: list[int] = []
        self.files: list[str] = []

    def add(self, name: str, data: bytes, label: int) -> None:
        pixels = _pixels(data)
        self.pixels += pixels if pixels <= MAX_PIXELS else 0  # larger ones are refused before decoding
        if self.pixels > self.limits.max_total_pixels:
            raise DataError(
                f"the images hold more than {self.limits.max_total_pixels / 1e6:.3g} megapixels in all (the limit, "
                f"reached at {name}); use smaller images or fewer of them"
            )
        try:
            arr = _model_array(data, self.card)
        except InputError as exc:
            self.tally.skip(SKIP_UNREADABLE, f"{name}: {exc}")
            return
        self.arrays.append(arr)
        self.labels.append(label)
        self.files.append(name)

    def result(self, name: str, what: str) -> LabelledSet:
        if not self.arrays:
            skipped = "; ".join(f"{n} {reason}" for reason, n in self.tally.skipped.items())
            raise DataError(
                f"{what} holds no image the model can read in a class folder (one folder per class, e.g. "
                f"cat/0001.png){'; skipped: ' + skipped if skipped else ''}"
                f"{'. ' + ' | '.join(self.tally.problems) if self.tally.problems else ''}"
            )
        c = max(a.shape[0] for a in self.arrays)
        arrays = [np.repeat(a, c, axis=0) if a.shape[0] != c else a for a in self.arrays]
        return LabelledSet(
            torch.from_numpy(np.stack(arrays)), torch.tensor(self.labels, dtype=torch.int64), list(self.card.classes),
            name, self.files, dict(self.tally.skipped), list(self.tally.problems),
        )


# --- ZIP ---------------------------------------------------------------------------------------------------------


def _archive_bytes(source: str | Path | bytes | BinaryIO, limits: Limits) -> tuple[bytes, str]:
    """The archive's bytes (never more than the limit is read) and a name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, what = bytes(source), "the upload"
    elif isinstance(source, (str, Path)):
        path = Path(source)
        what = path.name
        try:
            if path.stat().st_size > limits.max_archive_bytes:
                raise DataError(f"{what} is {_mb(path.stat().st_size)}; the limit is "
                                f"{_mb(limits.max_archive_bytes)}")
            with open(path, "rb") as f:
                data = f.read(limits.max_archive_bytes + 1)
        except OSError as exc:
            raise DataError(f"{what} could not be read ({exc.strerror or exc})") from None
    else:
        data, what = source.read(limits.max_archive_bytes + 1), "the upload"
    if len(data) > limits.max_archive_bytes:
        raise DataError(f"{what} is larger than the limit of {_mb(limits.max_archive_bytes)}")
    if not data:
        raise DataError(f"{what} is empty (0 bytes), not a ZIP file")
    return data, what


def _open_zip(data: bytes, what: str, limits: Limits) -> zipfile.ZipFile:
    # Every entry zipfile parses starts with this signature: counting it bounds the parse before it happens.
    if data.count(b"PK\x01\x02") > limits.max_entries:
        raise DataError(f"{what} holds more than {limits.max_entries} entries (the limit)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise DataError(f"{what} is not a ZIP file (or it is truncated or damaged)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged directory raises struct.error, ValueError, EOFError ...
        raise DataError(f"{what} is damaged and could not be opened ({type(exc).__name__}: {exc})") from None
    if len(zf.infolist()) > limits.max_entries:
        zf.close()
        raise DataError(f"{what} holds {len(zf.infolist())} entries; the limit is {limits.max_entries}")
    return zf


def _check_entry(info: zipfile.ZipInfo, what: str) -> tuple[str, ...]:
    """The entry's path parts, after refusing names that leave the archive's folder and entries that are no files."""
    if not info.filename:
        raise DataError(f"{what} is damaged: an entry has no name")
    name = info.filename.replace("\\", "/")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if name.startswith("/") or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        raise DataError(f"{what} is refused: the entry '{info.filename}' has an absolute path")
    if ".." in parts:
        raise DataError(f"{what} is refused: the entry '{info.filename}' points outside the archive's folder ('..')")
    kind = _KINDS.get(stat.S_IFMT(info.external_attr >> 16))
    if kind is not None:
        raise DataError(f"{what} is refused: the entry '{info.filename}' is {kind}, not a file")
    if info.flag_bits & 0x1:
        raise DataError(f"{what} is refused: the entry '{info.filename}' is encrypted")
    return parts


def _check_sizes(info: zipfile.ZipInfo, total: int, what: str, limits: Limits) -> None:
    """Refuse a member by its declared sizes, before it is inflated."""
    name, size = info.filename, info.file_size
    if size > limits.max_member_bytes:
        raise DataError(f"{what} is refused: '{name}' would inflate to {_mb(size)}; the limit per file is "
                        f"{_mb(limits.max_member_bytes)}")
    if size > limits.ratio_floor and size > limits.max_ratio * max(info.compress_size, 1):
        raise DataError(f"{what} is refused: '{name}' would inflate {size / max(info.compress_size, 1):.0f}-fold "
                        f"(a zip bomb?); the limit is {limits.max_ratio:.0f}-fold")
    if total > limits.max_total_bytes:
        raise DataError(f"{what} is refused: its images would inflate to more than "
                        f"{_mb(limits.max_total_bytes)} in all (the limit)")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int, what: str, limits: Limits) -> bytes:
    """A member's bytes, counted as they come out: never more than its declared size, the limits or ``budget``."""
    cap = min(info.file_size, limits.max_member_bytes, budget)
    chunks, n = [], 0
    try:
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                n += len(chunk)
                if n > cap or (n > limits.ratio_floor and n > limits.max_ratio * max(info.compress_size, 1)):
                    raise DataError(f"{what} is refused: '{info.filename}' inflates beyond what its header says "
                                    "or beyond the limits (a zip bomb?)")
                chunks.append(chunk)
    except DataError:
        raise
    except zipfile.BadZipFile as exc:
        raise DataError(f"{what} is damaged: '{info.filename}' does not match its header ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - zlib.error, EOFError, NotImplementedError (method), lzma errors ...
        raise DataError(
            f"{what} is damaged: '{info.filename}' could not be read ({type(exc).__name__}: {exc})"
        ) from None
    return b"".join(chunks)


def _zip_items(zf: zipfile.ZipFile, what: str, limits: Limits, tally: _Tally) -> list[tuple[_Item, zipfile.ZipInfo]]:
    """The images to read, every entry checked and every other file counted as skipped."""
    entries = [(info, _check_entry(info, what)) for info in zf.infolist()]
    files = [(info, parts) for info, parts in entries if parts and not info.filename.endswith(("/", "\\"))]
    if not files:
        raise DataError(f"{what} is an empty ZIP file (no files in it)")
    items = []
    for info, parts in files:
        reason = _classify(parts)
        if reason is not None:
            tally.skip(reason)
            continue
        items.append((_Item("/".join(parts), parts[-2], info.file_size), info))
    return items


def read_labelled_zip(
    source: str | Path | bytes | BinaryIO,
    card: ModelCard,
    *,
    limits: Limits = LIMITS,
    unknown: str = "error",
    name: str | None = None,
) -> LabelledSet:
    """Read a visitor's ZIP of class folders into a labelled set for the model of ``card``.

    Args:
        source: the archive as a path, bytes or a binary file object.
        limits: the bounds it is held to (:class:`Limits`).
        unknown: ``"error"`` (the default: a folder name that is none of the model's classes is far more
            often a typo than a wish to leave those images out, and a silently smaller set misleads) or
            ``"skip"`` (leave those images out and count them in ``skipped``).
        name: the set's name; the archive's file name by default.

    Raises:
        DataError: the archive or one of its entries is refused, damaged or over a limit, a folder names no
            class (``unknown="error"``), or no image could be read; the message says which.
    """
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    data, what = _archive_bytes(source, limits)
    default = Path(source).stem if isinstance(source, (str, Path)) else "upload"
    tally = _Tally()
    with _open_zip(data, what, limits) as zf:
        del data  # the ZipFile holds its own reference; this one would only outlive it
        items = _zip_items(zf, what, limits, tally)
        _check_count(len(items), card, limits, what)
        labels = _match_classes([item for item, _ in items], list(card.classes), unknown, what, tally)
        total = 0
        for (_, info), label in zip(items, labels):
            if label >= 0:
                total += info.file_size
                _check_sizes(info, total, what, limits)
        decoder, used = _Decoder(card, limits, tally), 0
        for (item, info), label in zip(items, labels):
            if label >= 0:
                blob = _read_member(zf, info, limits.max_total_bytes - used, what, limits)
                used += len(blob)
                decoder.add(item.name, blob, label)
    return decoder.result(name or default, what)


# --- folder (command line) -----------------------------------------------------------------------------------


def _folder_items(root: Path, limits: Limits, tally: _Tally) -> list[_Item]:
    """Regular files under ``root``; links are not followed and other special files are skipped."""
    items, seen = [], 0
    for here, dirs, files in os.walk(root, followlinks=False):
        for d in [d for d in dirs if (Path(here) / d).is_symlink()]:
            tally.skip(SKIP_LINK)
            dirs.remove(d)
        for f in sorted(files):
            seen += 1
            if seen > limits.max_entries:
                raise DataError(f"the folder {root} holds more than {limits.max_entries} files (the limit)")
            path = Path(here) / f
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
                tally.skip(SKIP_LINK if stat.S_ISLNK(st.st_mode) else SKIP_SYSTEM)
                continue
            parts = PurePosixPath(path.relative_to(root).as_posix()).parts
            reason = _classify(parts)
            if reason is not None:
                tally.skip(reason)
                continue
            items.append(_Item("/".join(parts), parts[-2], st.st_size))
    items.sort(key=lambda item: item.name)
    return items


def read_labelled_folder(
    path: str | Path,
    card: ModelCard,
    *,
    limits: Limits = LIMITS,
    unknown: str = "error",
    name: str | None = None,
) -> LabelledSet:
    """Read a folder of class folders (``<path>/cat/0001.png``) for the model of ``card``: as
    :func:`read_labelled_zip`, with the same bounds on count and sizes; symbolic links are not followed."""
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    root = Path(path)
    what = f"the folder {root}"
    if not root.is_dir():
        raise DataError(f"{what} does not exist or is not a folder")
    tally = _Tally()
    items = _folder_items(root, limits, tally)
    _check_count(len(items), card, limits, what)
    labels = _match_classes(items, list(card.classes), unknown, what, tally)
    decoder, total = _Decoder(card, limits, tally), 0
    for item, label in zip(items, labels):
        if label < 0:
            continue
        if item.size > limits.max_member_bytes:
            raise DataError(f"{what}: '{item.name}' is {_mb(item.size)}; the limit per file is "
                            f"{_mb(limits.max_member_bytes)}")
        total += item.size
        if total > limits.max_total_bytes:
            raise DataError(f"{what}: the images are more than {_mb(limits.max_total_bytes)} in all (the limit)")
        try:
            with open(root / item.name, "rb") as f:
                blob = f.read(limits.max_member_bytes + 1)
        except OSError as exc:
            tally.skip(SKIP_UNREADABLE, f"{item.name}: {exc.strerror or exc}")
            continue
        decoder.add(item.name, blob, label)
    return decoder.result(name or root.name, what)


def read_labelled(
    source: str | Path | bytes | BinaryIO,
    card: ModelCard,
    *,
    limits: Limits = LIMITS,
    unknown: str = "error",
    name: str | None = None,
) -> LabelledSet:
    """A labelled set from a folder (a path to a directory) or a ZIP archive (anything else)."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return read_labelled_folder(source, card, limits=limits, unknown=unknown, name=name)
    return read_labelled_zip(source, card, limits=limits, unknown=unknown, name=name)
