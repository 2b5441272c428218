"""The one reader of checkpoint files: bounded, and never unpickling anything but tensors (and a short allow-list).

Every checkpoint goes through :func:`read_checkpoint`: a visitor's upload, a file given on the command line,
and the project's own ``weights/*.safetensors`` (whose card is checked against the file's sha256 first). The
file may come from a stranger, so nothing in it is trusted until it has been checked, and every check that
can be made from sizes alone is made before any tensor data is read:

- files over ``max_bytes`` are refused before they are opened for reading;
- a safetensors header is parsed here (bounded) and every entry, the parameter count and the classifier
  width are checked before the library reads any data;
- a ``torch.save`` file is read with ``weights_only=True`` and ``mmap=True`` (a huge tensor costs no memory
  until touched) after checking its zip directory (no compressed entries: no zip bombs), then the same
  bounds apply before anything touches a tensor. A training checkpoint's harmless extras (an
  ``argparse.Namespace`` of its arguments, epoch numbers, an optimizer's state dict) are allowed
  (:data:`SAFE_GLOBALS`); any other Python object is refused, and a pickle that would run code never runs.

Every refusal is a :class:`~..errors.WeightsError` with one sentence that names the file.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import pickletools
import re
import struct
import threading
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError

__all__ = [
    "MAX_BYTES",
    "MAX_CLASSES",
    "MAX_HEADER_BYTES",
    "MAX_PARAMS",
    "MAX_PICKLE_BYTES",
    "SAFE_GLOBALS",
    "read_checkpoint",
    "strip_prefixes",
]

# --- limits --------------------------------------------------------------------------------------------

# The largest supported network, wide_resnet101_2, has 126,886,696 parameters: 484 MiB in float32. 512 MiB
# takes it with room for its BN statistics and a wider classifier, and bounds what one upload can cost.
MAX_BYTES = 512 * 2**20
# Again above wide_resnet101_2 (127 M) with headroom; bounds the model's memory (800 MB in float32).
MAX_PARAMS = 200_000_000
# ImageNet-21k has 21,841 classes; the page lists the classes and the card names every one of them.
MAX_CLASSES = 100_000
# The safetensors library's own cap on the JSON header (MAX_HEADER_SIZE in its Rust source).
MAX_HEADER_BYTES = 100_000_000
# A state dict's pickled index (data.pkl) holds names and shapes, not data: resnet152's is 113 KiB. The
# unpickler builds Python objects from it, so its size bounds the memory that unpickling can take.
MAX_PICKLE_BYTES = 16 * 2**20
# No ResNet weight has more than 4 dimensions; a margin, and a bound on work per declared shape.
MAX_DIMS = 8
_LARGEST = "wide_resnet101_2"
_LARGEST_PARAMS = 126_886_696

# safetensors' dtype names -> (bytes per element, floating point). Complex and sub-byte types are refused:
# no ResNet weight uses them and the model could not take them.
_ST_DTYPES: dict[str, tuple[int, bool]] = {
    "F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True),
    "F8_E4M3": (1, True), "F8_E4M3FNUZ": (1, True), "F8_E5M2": (1, True), "F8_E5M2FNUZ": (1, True),
    "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
    "U64": (8, False), "U32": (4, False), "U16": (2, False), "U8": (1, False), "BOOL": (1, False),
}  # fmt: skip

_WRAPPERS = ("state_dict", "model_state_dict", "model")
# What a training checkpoint holds besides its weights, and the unpickler may build: the arguments of the run
# that saved it (timm's train.py, many research scripts save ``args``). Nothing on this list can run code: a
# Namespace only takes keyword attributes, and its values are themselves built by the weights-only unpickler.
SAFE_GLOBALS = (argparse.Namespace,)
_SAFE_GLOBALS_LOCK = threading.Lock()  # torch's allow-list is process-wide: one reader at a time changes it
_PREFIXES = ("module.", "_orig_mod.")
_SAVE_ADVICE = "save its weights with torch.save(model.state_dict(), 'weights.pth') and load that file instead"


def _size(n: int) -> str:
    """``n`` bytes for a person: '100 bytes', '12 KiB', '612.4 MiB'."""
    if n < 1024:
        return f"{n:,} bytes"
    for unit, scale in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)):
        if n < scale * 1024 or unit == "GiB":
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    raise AssertionError("unreachable")


def _shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --- reading ---------------------------------------------------------------------------------------------


def read_checkpoint(
    path: str | Path,
    *,
    max_bytes: int = MAX_BYTES,
    max_params: int = MAX_PARAMS,
    max_classes: int = MAX_CLASSES,
    source: str | None = None,
) -> dict[str, torch.Tensor]:
    """Read an untrusted ``.safetensors`` or ``torch.save`` state dict, refusing before memory is spent.

    The format is told by the content, not the name: a safetensors file starts with its header's length
    (a little-endian u64) and ``{``; a ``torch.save`` file is a zip archive (or, before PyTorch 1.6, a
    pickle). A ``.safetensors`` name is always read as safetensors. Wrappers (``{"state_dict": ...}``,
    ``{"model_state_dict": ...}``, ``{"model": ...}``) and the ``module.`` / ``_orig_mod.`` prefixes of
    DataParallel and compiled models are removed. Tensors from a zip checkpoint are memory-mapped: they
    cost memory only when touched, and keep the file mapped while they live (deleting the file meanwhile
    is safe; rewriting it in place is not).

    Args:
        path: the file.
        max_bytes: largest file accepted.
        max_params: most values in floating-point tensors (and in any one tensor of another type).
        max_classes: widest classifier: the first dim of ``fc.weight``, else of the last 2-D weight.
        source: what the messages call the file; ``"checkpoint <file name>"`` by default (a visitor's upload
            must never learn the server's paths), the path as typed on the command line.

    Returns:
        The state dict: names -> dense CPU tensors (floating, integer or bool).

    Raises:
        WeightsError: one sentence naming the file: missing, empty, too large, neither format, truncated or
            damaged, a safetensors header that lies about its sizes, Python objects other than tensors (a
            pickle that could run code is never run), a whole pickled model or TorchScript archive (with
            how to save a state dict instead), or over a bound.
    """
    path = Path(path)
    name = source or f"checkpoint {path.name}"
    try:
        regular = path.is_file()
        if regular:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(16)
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        raise WeightsError(f"{name} could not be opened ({getattr(exc, 'strerror', None) or 'unreadable'})") from None
    if not regular:
        raise WeightsError(f"{name} was not found (or is not a regular file)")
    if size == 0:
        raise WeightsError(f"{name} is empty (0 bytes)")
    if size > max_bytes:
        raise WeightsError(f"{name} is {_size(size)}, over the limit of {_size(max_bytes)} for a checkpoint")
    limits = (max_params, max_classes)
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path, name, size, limits)
    # A zip's first 8 bytes would declare an 86 GB header, so "PK" decides; a safetensors header of 128 (or
    # 384 ...) bytes starts with 0x80 like a pickle, so the '{' is looked for before the pickle's 0x80.
    if head.startswith(b"PK\x03\x04"):
        return _read_torch(path, name, limits, zipped=True)
    if head[8:9] == b"{":
        return _read_safetensors(path, name, size, limits)
    if head.startswith(b"\x80"):  # a pickle: the legacy torch.save format, or a bare pickle
        return _read_torch(path, name, limits, zipped=False)
    raise WeightsError(
        f"{name} is neither a safetensors file nor a PyTorch checkpoint written by torch.save "
        "(its first bytes match neither format)"
    )


def _check_bounds(name: str, entries: list[tuple[str, tuple[int, ...], bool]], limits: tuple[int, int]) -> None:
    """Refuse a state dict over the parameter or class bound, from names, shapes and dtypes alone.

    Args:
        name: the file, for messages.
        entries: ``(key, shape, is_floating)`` in file order.
        limits: ``(max_params, max_classes)``.

    Raises:
        WeightsError: too many dimensions, parameters, values in one tensor, or classes.
    """
    max_params, max_classes = limits
    for key, shape, _ in entries:
        if len(shape) > MAX_DIMS:
            raise WeightsError(
                f"{name}: tensor '{key}' has {len(shape)} dimensions; weights have at most {MAX_DIMS}"
            )
    params = sum(math.prod(shape) for _, shape, floating in entries if floating)
    if params > max_params:
        raise WeightsError(
            f"{name} holds {params:,} parameters, over the limit of {max_params:,} "
            f"(the largest supported network, {_LARGEST}, has {_LARGEST_PARAMS:,})"
        )
    for key, shape, floating in entries:
        # Integer tensors are not parameters, but one of them can still be huge (e.g. a stride-0 view).
        if not floating and math.prod(shape) > max_params:
            raise WeightsError(
                f"{name}: tensor '{key}' holds {math.prod(shape):,} values, over the limit of {max_params:,}"
            )
    heads = [(k, s) for k, s, _ in entries if k == "fc.weight" and len(s) == 2]
    heads = heads or [(k, s) for k, s, _ in entries if k.endswith("weight") and len(s) == 2][-1:]
    if heads and heads[0][1][0] > max_classes:
        key, shape = heads[0]
        raise WeightsError(
            f"{name} has a classifier for {shape[0]:,} classes ('{key}' has shape {_shape_str(shape)}), "
            f"over the limit of {max_classes:,}"
        )


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json keeps the last of two equal names silently; a header that names a tensor twice is lying.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_safetensors(path: Path, name: str, size: int, limits: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Check a safetensors header entry by entry, then the bounds, then the offsets; only then load it.

    Raises:
        WeightsError: see :func:`read_checkpoint`.
    """
    header_len, header = _st_header(path, name, size)
    # 1. Each entry's form: dtype, shape, offsets. Nothing is compared with the file yet.
    entries = _st_entries(name, header)
    # 2. The bounds, from the declared shapes: a header may declare a billion parameters in a tiny file.
    _check_bounds(name, [(e.key, e.shape, e.floating) for e in entries], limits)
    # 3. The offsets against the file: every byte of data belongs to exactly one tensor.
    _st_offsets(name, entries, size - 8 - header_len)
    # 4. Only now is any tensor data read.
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "unreadable"
        raise WeightsError(f"{name} is not a readable safetensors file ({detail})") from None
    return _clean_state_dict(name, sd, limits)


@dataclass(frozen=True)
class _Entry:
    """One tensor as a safetensors header declares it."""

    key: str
    itemsize: int
    floating: bool
    shape: tuple[int, ...]
    begin: int
    end: int


def _st_header(path: Path, name: str, size: int) -> tuple[int, dict]:
    """The header's length and its table of tensors (``__metadata__`` checked and removed)."""
    if size < 8:
        raise WeightsError(f"{name} is {_size(size)} long, too short for a safetensors file (its length field is 8)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise WeightsError(
                f"{name} declares a safetensors header of {header_len:,} bytes, over the format's limit of "
                f"{MAX_HEADER_BYTES:,}, so it is damaged or not a safetensors file"
            )
        if header_len > size - 8:
            raise WeightsError(
                f"{name} declares a safetensors header of {header_len:,} bytes but holds only {size - 8:,} "
                "after the length, so it is truncated or not a safetensors file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        raise WeightsError(f"{name} has a safetensors header that names '{exc}' twice") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WeightsError(
            f"{name} has a safetensors header that is not valid JSON, so it is damaged or not a safetensors file"
        ) from None
    if not isinstance(header, dict):
        raise WeightsError(f"{name} has a safetensors header that is not a table of tensors")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise WeightsError(f"{name} has a safetensors '__metadata__' entry that is not a table of strings")
    if not header:
        raise WeightsError(f"{name} holds no tensors")
    return header_len, header


def _st_entries(name: str, header: dict) -> list[_Entry]:
    """Each entry's dtype, shape and offsets, checked for their form only."""
    entries = []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise WeightsError(f"{name}: safetensors entry '{key}' is not a description of a tensor")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise WeightsError(
                f"{name}: tensor '{key}' has dtype {json.dumps(dtype)[:40]}, which is not a supported tensor type"
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise WeightsError(f"{name}: tensor '{key}' has a shape that is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise WeightsError(f"{name}: tensor '{key}' has data_offsets that are not two non-negative integers")
        itemsize, floating = _ST_DTYPES[dtype]
        entries.append(_Entry(key, itemsize, floating, tuple(shape), offsets[0], offsets[1]))
    return entries


def _st_offsets(name: str, entries: list[_Entry], data_len: int) -> None:
    """Every tensor's bytes inside the data and of its size, and every byte of data in exactly one tensor."""
    for e in entries:
        if e.begin > e.end:
            raise WeightsError(f"{name}: tensor '{e.key}' has data_offsets [{e.begin}, {e.end}] that end before "
                               "they begin")
        if e.end > data_len:
            raise WeightsError(
                f"{name}: tensor '{e.key}' lies at bytes [{e.begin}, {e.end}) of the data but the file holds only "
                f"{data_len:,} bytes of data, so it is truncated or its header is wrong"
            )
        if e.end - e.begin != math.prod(e.shape) * e.itemsize:
            raise WeightsError(
                f"{name}: tensor '{e.key}' of shape {_shape_str(e.shape)} needs {math.prod(e.shape) * e.itemsize:,} "
                f"bytes but its data_offsets span {e.end - e.begin:,}"
            )
    previous: _Entry | None = None  # the last non-empty tensor
    covered = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin == e.end:
            continue
        if previous is not None and e.begin < previous.end:
            raise WeightsError(f"{name}: tensors '{previous.key}' and '{e.key}' overlap in the file's data")
        if e.begin > covered:
            raise WeightsError(f"{name}: bytes [{covered}, {e.begin}) of the data belong to no tensor")
        previous, covered = e, e.end
    if covered != data_len:
        raise WeightsError(
            f"{name} has {data_len - covered:,} bytes after its last tensor that belong to no tensor"
        )


def _read_torch(path: Path, name: str, limits: tuple[int, int], *, zipped: bool) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` (and ``mmap=True`` for zip checkpoints), after checking the zip.

    Raises:
        WeightsError: see :func:`read_checkpoint`.
    """
    if zipped:
        _check_zip(path, name)
    try:
        with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, name, exc, zipped=zipped) from None
    except Exception:  # noqa: BLE001 - torch raises many types for a damaged file; none is for a person
        raise WeightsError(
            f"{name} could not be read as a PyTorch checkpoint (torch.save): the file is damaged or truncated"
        ) from None
    return _clean_state_dict(name, _unwrap(name, obj), limits)


def _check_zip(path: Path, name: str) -> None:
    """The zip directory of a ``torch.save`` file, checked before torch reads anything from it.

    torch.save writes every entry uncompressed; a compressed entry could expand to any size when torch reads
    it (a zip bomb), so it is refused, and so is a pickled index too large to be a state dict's.

    Raises:
        WeightsError: truncated or damaged, a TorchScript archive, compressed entries, no or an oversized
            ``data.pkl``.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except Exception:  # noqa: BLE001 - BadZipFile, struct.error, EOFError, ValueError ... for a damaged file
        raise WeightsError(
            f"{name} is a truncated or damaged zip archive, so it is not a complete torch.save checkpoint"
        ) from None
    names = [i.filename for i in infos]
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise WeightsError(f"{name} is a TorchScript archive (torch.jit.save), not a state dict; {_SAVE_ADVICE}")
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise WeightsError(
            f"{name} holds compressed zip entries, which torch.save never writes; "
            "re-save it with torch.save(model.state_dict(), 'weights.pth')"
        )
    pickles = [i for i in infos if i.filename.endswith("data.pkl")]
    if not pickles:
        raise WeightsError(f"{name} is a zip archive without the data.pkl that every torch.save checkpoint has")
    if max(i.file_size for i in pickles) > MAX_PICKLE_BYTES:
        raise WeightsError(
            f"{name} has a pickled index (data.pkl) of {_size(max(i.file_size for i in pickles))}, over the limit of "
            f"{_size(MAX_PICKLE_BYTES)} (a state dict's is far smaller: resnet152's is 113 KiB)"
        )


# Globals that only a pickle meant to run code refers to. Used only to word the message: the file is never
# unpickled unsafely, whatever it refers to.
_DANGEROUS_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty",
                      "ctypes", "code", "webbrowser", "pickle", "_pickle", "marshal", "multiprocessing", "signal"}
_DANGEROUS_BUILTINS = {"eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals",
                       "locals", "vars", "input", "breakpoint", "exit", "quit"}


def _refusal(path: Path, name: str, exc: pickle.UnpicklingError, *, zipped: bool) -> WeightsError:
    """The sentence for a pickle that the weights-only unpickler refused.

    torch's own text advises retrying with unrestricted unpickling: exactly what must not be done with a
    stranger's file, so none of it is passed on. The pickle is read statically (never run) to tell a whole
    pickled ``nn.Module`` (the common mistake) from a pickle that would run code.
    """
    found = re.search(r"GLOBAL (\S+)", str(exc))
    refs = _pickle_globals(path, zipped=zipped)
    dangerous = [r for r in refs if _is_dangerous(r)]
    # A name mangled by damage ("torch.", "tq") is not a reference to anything: the file is damaged.
    named = found is not None and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", found.group(1)) is not None
    if dangerous or named:
        refused = dangerous[0] if dangerous else found.group(1)
        if not dangerous and any(r.startswith(("torch.nn.modules.", "torchvision.models.")) for r in refs):
            return WeightsError(f"{name} holds a whole pickled model ({refused}); {_SAVE_ADVICE}")
        return WeightsError(
            f"{name} holds Python objects, not only tensors (it refers to {refused}), and was not loaded "
            "(only tensors are accepted; unsafe pickles are refused)"
        )
    # Refused for its form (truncated, garbled, an opcode torch does not take), not for what it refers to.
    return WeightsError(
        f"{name} could not be read as a PyTorch checkpoint (torch.save): the file is damaged or truncated"
    )


def _is_dangerous(ref: str) -> bool:
    module, _, attr = ref.rpartition(".")
    top = module.split(".")[0]
    return top in _DANGEROUS_MODULES or (top in ("builtins", "__builtin__") and attr in _DANGEROUS_BUILTINS)


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_globals(path: Path, *, zipped: bool) -> list[str]:
    """The globals a checkpoint's pickle refers to, in order, read with ``pickletools`` (nothing is executed).

    Best effort, for the wording of a refusal: a damaged pickle yields what was read before the damage.
    """
    try:
        if zipped:
            with zipfile.ZipFile(path) as zf:
                info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
                stream = io.BytesIO(zf.read(info))  # stored and at most MAX_PICKLE_BYTES: _check_zip saw to it
        else:
            # A legacy file is four pickles (magic, protocol, system info, the object) before raw data; read
            # from a bounded copy, so a declared length can never make a read allocate more than this.
            with open(path, "rb") as f:
                stream = io.BytesIO(f.read(MAX_PICKLE_BYTES))
    except Exception:  # noqa: BLE001 - best effort only
        return []
    found: list[str] = []
    for _ in range(1 if zipped else 4):
        memo: dict[object, object] = {}
        recent: list[object] = []  # the last two values pushed, for STACK_GLOBAL
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(recent) == 2 and all(isinstance(s, str) for s in recent):
                    found.append(f"{recent[0]}.{recent[1]}")
                if op.name in _STRING_OPS:
                    recent = [*recent[-1:], arg]
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = recent[-1] if recent else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    recent = [*recent[-1:], memo.get(arg)]
                else:
                    recent = [*recent[-1:], None]
        except Exception:  # noqa: BLE001 - the end of the readable part
            break
    return list(dict.fromkeys(found))


def _unwrap(name: str, obj: object) -> dict:
    """The state dict inside what ``torch.load`` returned (a training checkpoint's wrappers removed).

    Raises:
        WeightsError: not a dict of tensors.
    """
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            # {"net": state_dict, "epoch": 3}: one table of tensors among other entries is the state dict.
            tables = [v for v in obj.values() if isinstance(v, dict) and v and
                      all(isinstance(t, torch.Tensor) for t in v.values())]
            if len(tables) == 1 and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                inner = tables[0]
        if inner is None:
            break
        obj = inner
    if isinstance(obj, torch.Tensor):
        raise WeightsError(f"{name} holds a single tensor, not a state dict (a table of named tensors)")
    if not isinstance(obj, dict):
        raise WeightsError(f"{name} holds a {type(obj).__name__}, not a state dict (a table of named tensors)")
    return obj


def _clean_state_dict(name: str, sd: Mapping, limits: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Names checked, prefixes removed, every tensor dense, real and on the CPU, and the bounds applied.

    Only tensor metadata is read here: nothing touches the data of a memory-mapped tensor.

    Raises:
        WeightsError: an empty table, a name that is not a string, an entry that is not a plain dense tensor,
            or over a bound.
    """
    if not sd:
        raise WeightsError(f"{name} holds no tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(key, str):
            raise WeightsError(f"{name} has an entry named {key!r:.40}, not a string: it is not a state dict")
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{name}: entry '{key}' is not a tensor (it holds a Python {type(value).__name__})")
        what = None
        if value.layout != torch.strided or value.is_sparse:
            what = "a sparse tensor"
        elif value.is_nested:
            what = "a nested tensor"
        elif value.is_quantized:
            what = "a quantized tensor"
        elif value.is_complex():
            what = "a complex tensor"
        elif value.device.type != "cpu":
            what = f"a tensor without data (device '{value.device.type}')"
        elif type(value) not in (torch.Tensor, nn.Parameter):
            what = f"a tensor subclass ({type(value).__name__})"
        if what:
            raise WeightsError(f"{name}: entry '{key}' is {what}; only plain dense tensors are accepted")
        out[key] = value.detach()
    out = strip_prefixes(out)
    _check_bounds(name, [(k, tuple(v.shape), v.is_floating_point()) for k, v in out.items()], limits)
    return out


def strip_prefixes(sd: dict) -> dict:
    """``sd`` without the ``module.`` / ``_orig_mod.`` prefix that every key of a DataParallel or compiled model has."""
    # Checkpoints saved from a DataParallel or compiled model carry a prefix on every key (both, nested).
    for _ in range(4):
        prefix = next((p for p in _PREFIXES if sd and all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd
