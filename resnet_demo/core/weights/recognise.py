"""A visitor's own checkpoint: read it safely within bounds, recognise its architecture, build and fit the model.

The file comes from a stranger, so nothing in it is trusted until it has been checked, and every check that
can be made from sizes alone is made before any tensor data is read:

- :func:`read_checkpoint` refuses files over ``max_bytes``; parses a safetensors header itself (bounded) and
  checks every entry, the parameter count and the classifier width before the library reads any data; reads
  a ``torch.save`` file with ``weights_only=True`` and ``mmap=True`` (a huge tensor costs no memory until
  touched) after checking its zip directory, then applies the same bounds before anything touches a tensor.
- :func:`recognise` infers the architecture from key names and shapes only, comparing them with candidates
  built on the meta device (no memory, no initialisation): the tutorial's ``Net``, this project's
  :class:`~.model.ResNet` in either layout, and torchvision's ResNets, wide ResNets and ResNeXts.
- :func:`build_recognised` and :func:`fit_recognised` make the model and copy the weights in, refusing
  non-finite weights.

A caller does::

    sd = read_checkpoint(path)
    arch = recognise(sd)
    model = build_recognised(arch)
    fit_recognised(model, sd, arch, f"checkpoint {path.name}")

Every refusal is a :class:`~.errors.WeightsError` with one sentence that names the file (or ``source``).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from ..model import TUTORIAL_CONFIG, ResNetConfig, build_model
from .files import load_weights_into, tutorial_key_map
from .torchvision_resnets import SUPPORTED_ARCHS, build_torchvision, fit_torchvision_weights

__all__ = [
    "MAX_BYTES",
    "MAX_CLASSES",
    "MAX_HEADER_BYTES",
    "MAX_PARAMS",
    "MAX_PICKLE_BYTES",
    "Architecture",
    "build_recognised",
    "fit_recognised",
    "read_checkpoint",
    "recognise",
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
# A bound on the candidates built on the meta device from the keys: resnet152 has 50 blocks in 4 stages.
MAX_STAGES = 16
MAX_BLOCKS = 1000

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
_PREFIXES = ("module.", "_orig_mod.")
_SAVE_ADVICE = "save its weights with torch.save(model.state_dict(), 'weights.pth') and upload that"


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


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


# --- reading ---------------------------------------------------------------------------------------------


def read_checkpoint(
    path: str | Path,
    *,
    max_bytes: int = MAX_BYTES,
    max_params: int = MAX_PARAMS,
    max_classes: int = MAX_CLASSES,
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

    Returns:
        The state dict: names -> dense CPU tensors (floating, integer or bool).

    Raises:
        WeightsError: one sentence naming the file: missing, empty, too large, neither format, truncated or
            damaged, a safetensors header that lies about its sizes, Python objects other than tensors (a
            pickle that could run code is never run), a whole pickled model or TorchScript archive (with
            how to save a state dict instead), or over a bound.
    """
    path = Path(path)
    name = f"checkpoint {path.name}"
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
        raise WeightsError(f"{name} is {_size(size)}, over the limit of {_size(max_bytes)} for an uploaded checkpoint")
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
    out = _strip_prefixes(out)
    _check_bounds(name, [(k, tuple(v.shape), v.is_floating_point()) for k, v in out.items()], limits)
    return out


def _strip_prefixes(sd: dict) -> dict:
    # Checkpoints saved from a DataParallel or compiled model carry a prefix on every key (both, nested).
    for _ in range(4):
        prefix = next((p for p in _PREFIXES if sd and all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


# --- recognising ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint is, as far as its key names and shapes say.

    Attributes:
        kind: ``"resnet"`` for this project's :class:`~.model.ResNet` (the tutorial's ``Net`` included),
            else a torchvision architecture name from :data:`~.tv.SUPPORTED_ARCHS`.
        config: the :class:`~.model.ResNetConfig` for ``"resnet"``, else ``None``.
        num_classes: the classifier's width.
        in_channels: the first conv's input channels.
        description: one line for the page.
    """

    kind: str
    config: ResNetConfig | None
    num_classes: int
    in_channels: int
    description: str


@dataclass(frozen=True)
class _Candidate:
    """An architecture to compare a checkpoint with: its expected keys and shapes in state_dict order."""

    kind: str
    label: str  # "torchvision resnet18", "the tutorial's Net", "this project's ResNet"
    short: str  # "resnet18", "the tutorial's Net", "this project's ResNet"
    expected: dict[str, tuple[int, ...]]
    config: ResNetConfig | None
    summary: str  # "3 stages of 3 blocks at 64/128/256 channels"
    note: str = ""


_RES_KEY = re.compile(r"^res(\d{1,6})\.")
_STAGE_KEY = re.compile(r"^stages\.(\d{1,6})\.")
_BLOCK_KEY = re.compile(r"^stages\.(\d{1,6})\.blocks\.res(\d{1,6})\.")
_OVERRIDES = ("tutorial", "resnet", *SUPPORTED_ARCHS)


def recognise(
    sd_or_shapes: Mapping[str, torch.Tensor | tuple[int, ...]],
    override: str | None = None,
    *,
    source: str = "the checkpoint",
) -> Architecture:
    """The architecture a state dict fits exactly, read from its key names and shapes only.

    Candidates are built on the meta device (no memory, no initialisation) and compared key by key and
    shape by shape. BN ``num_batches_tracked`` counters may be absent (older checkpoints lack them; eval
    never reads them). The first conv's input channels and the classifier's width are read from the
    checkpoint for every family; the first stage's stride cannot be read from weights and is taken as 1
    (as 2, and said so, when the first stage downsamples).

    Args:
        sd_or_shapes: a state dict, or its keys with shapes (tuples); ``module.`` / ``_orig_mod.`` prefixes
            are removed.
        override: ``"tutorial"`` (the tutorial's key names), ``"resnet"`` (this project's ResNet, either key
            naming) or a torchvision architecture name: only that family is considered.
        source: what the messages call the checkpoint, e.g. ``"checkpoint net.pth"``.

    Returns:
        The :class:`Architecture`.

    Raises:
        ValueError: ``override`` is not one of the names above.
        WeightsError: one sentence: nothing fits, with the closest candidate and its first key or shape that
            does not fit; or the ``override`` does not fit, with its first key or shape that does not fit; or
            a classifier without classes or a first conv without input channels.
    """
    family = _normalise_override(override)
    shapes = _shapes_of(sd_or_shapes, source)
    if not shapes:
        raise WeightsError(f"{source} holds no tensors")
    if family is None:
        # Try the family the key names point to first: building all twelve candidates is the slow path.
        for candidate in _candidates(shapes, _sniff(shapes)):
            if _compare(candidate.expected, shapes)[1] is None:
                return _architecture(candidate, source)
    candidates = list(_candidates(shapes, family or "all"))
    scored = [(_compare(c.expected, shapes), c) for c in candidates]
    for (_, problem), candidate in scored:
        if problem is None:
            return _architecture(candidate, source)
    (_, problem), best = max(scored, key=lambda s: s[0][0])  # max keeps the first of equal scores
    what = _problem_text(problem, best.short)
    if family is None:
        raise WeightsError(f"{source} fits no supported architecture: closest is {best.label}, but {what}")
    raise WeightsError(f"{source} does not fit {best.label} (as asked): {what}")


def _normalise_override(override: str | None) -> str | None:
    if override is None:
        return None
    key = str(override).strip().lower().replace("-", "").replace(" ", "")
    if key not in _OVERRIDES:
        raise ValueError(f"unknown architecture {override!r}; choose one of {', '.join(_OVERRIDES)}")
    return key


def _shapes_of(sd: Mapping, source: str) -> dict[str, tuple[int, ...]]:
    """Keys -> shapes as int tuples, prefixes removed.

    Raises:
        WeightsError: a key that is not a string or a shape that is not non-negative integers.
    """
    out: dict[str, tuple[int, ...]] = {}
    for key, value in sd.items():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
        if not isinstance(key, str) or not isinstance(shape, (tuple, list)) or not all(_is_count(d) for d in shape):
            raise WeightsError(f"{source} has an entry {str(key)[:80]!r} that is not a named tensor shape")
        out[key] = tuple(int(d) for d in shape)
    return _strip_prefixes(out)


def _sniff(shapes: Mapping[str, tuple[int, ...]]) -> str:
    if "res1.conv1.weight" in shapes and "conv1.weight" in shapes:
        return "tutorial"
    if "stem.conv.weight" in shapes:
        return "resnet"
    if "layer1.0.conv1.weight" in shapes:
        return "torchvision"
    return "none"


def _candidates(shapes: Mapping[str, tuple[int, ...]], family: str) -> Iterator[_Candidate]:
    """The candidates of ``family``: "all", "tutorial", "resnet" (both namings), "torchvision" or an arch.

    Lazily, so that the first fit ends the search; torchvision's networks come in the order of how well
    their blocks per stage agree with the keys, so the one that fits is usually the first one built.
    """
    if family in ("all", "tutorial", "resnet"):
        yield _tutorial_candidate(shapes)
    if family in ("all", "resnet"):
        yield _project_candidate(shapes)
    if family in ("all", "torchvision"):
        per_stage = [len({k.split(".")[1] for k in shapes if k.startswith(f"layer{s}.")}) for s in range(1, 5)]
        for arch in sorted(SUPPORTED_ARCHS, key=lambda a: _TV_BLOCKS[a] != tuple(per_stage)):
            yield _torchvision_candidate(shapes, arch)
    elif family in SUPPORTED_ARCHS:
        yield _torchvision_candidate(shapes, family)


# Blocks per stage of each torchvision network, to try the likely ones first (checked against torchvision
# by the tests, which recognise every one of them).
_TV_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3),
              "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3), "wide_resnet50_2": (3, 4, 6, 3),
              "wide_resnet101_2": (3, 4, 23, 3), "resnext50_32x4d": (3, 4, 6, 3),
              "resnext101_32x8d": (3, 4, 23, 3), "resnext101_64x4d": (3, 4, 23, 3)}


def _compare(
    expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[int, tuple | None]:
    """(matching key+shape pairs, the first problem or ``None``).

    The first problem is the first expected key (in state_dict order) that is missing or has another shape,
    else the first key of ``shapes`` the candidate does not have.
    """
    score, problem = 0, None
    for key, want in expected.items():
        got = shapes.get(key)
        if got is None:
            if not key.endswith("num_batches_tracked") and problem is None:
                problem = ("missing", key, want)
        elif got != want:
            problem = problem or ("shape", key, got, want)
        else:
            score += 1
    if problem is None:
        extra = next((k for k in shapes if k not in expected), None)
        if extra is not None:
            problem = ("unexpected", extra)
    return score, problem


def _problem_text(problem: tuple, short: str) -> str:
    """The first key or shape that does not fit, as a clause: "key 'x' has shape [..] where resnet18 has [..]"."""
    if problem[0] == "missing":
        return f"key '{problem[1]}' is missing (where {short} has {_shape_str(problem[2])})"
    if problem[0] == "shape":
        return f"key '{problem[1]}' has shape {_shape_str(problem[2])} where {short} has {_shape_str(problem[3])}"
    return f"key '{problem[1]}' is not part of {short}"


def _dim(shapes: Mapping[str, tuple[int, ...]], key: str, axis: int, ndim: int, default: int) -> int:
    shape = shapes.get(key)
    return shape[axis] if shape is not None and len(shape) == ndim else default


def _num_classes(shapes: Mapping[str, tuple[int, ...]], default: int) -> int:
    return _dim(shapes, "fc.weight", 0, 2, _dim(shapes, "fc.bias", 0, 1, default))


@lru_cache(maxsize=64)  # bounded: every odd checkpoint brings a config of its own
def _meta_resnet_shapes(config: ResNetConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Key -> shape pairs of this project's ResNet for ``config``, built on the meta device."""
    with torch.device("meta"):
        model = build_model(config)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


@cache
def _meta_torchvision_shapes(arch: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Key -> shape pairs of torchvision ``arch`` with 1000 classes, built on the meta device."""
    with torch.device("meta"):
        model = build_torchvision(arch)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _widths_blocks(widths: list[int], blocks: list[int]) -> str:
    stages = _plural(len(widths), "stage")
    per = f"{blocks[0]}" if len(set(blocks)) == 1 else "/".join(map(str, blocks))
    return f"{stages} of {per} block{'s' if max(blocks) > 1 else ''} at {'/'.join(map(str, widths))} channels"


def _resnet_candidate(
    config: ResNetConfig | None, *, tutorial_names: bool, label: str, note: str = ""
) -> _Candidate:
    """A candidate of this project's ResNet for ``config`` (the tutorial's when ``None``), in either naming."""
    short = "the tutorial's Net" if tutorial_names else "this project's ResNet"
    if config is None:  # nothing to infer from: compare with the tutorial's Net as it is
        config, note = TUTORIAL_CONFIG, ""
    try:
        pairs = _meta_resnet_shapes(config)
    except (RuntimeError, ValueError, OverflowError):  # absurd widths from a hostile table of shapes
        config, note = TUTORIAL_CONFIG, ""
        pairs = _meta_resnet_shapes(config)
    expected = dict(pairs)
    if tutorial_names:
        mapping = tutorial_key_map(config)
        expected = {f"{mapping.get(p, p)}.{leaf}": s for p, leaf, s in ((*k.rsplit(".", 1), s) for k, s in pairs)}
    summary = _widths_blocks(list(config.widths), list(config.blocks))
    return _Candidate("resnet", label, short, expected, config, summary, note)


def _tutorial_candidate(shapes: Mapping[str, tuple[int, ...]]) -> _Candidate:
    """The tutorial's key names: ``conv1``/``bn1`` stem, ``res{k}`` blocks numbered across stages, ``conv{s}``/``bn{s}``
    transitions between stages, ``fc``. The key names do not say which stage a block is in: block widths do."""
    config, note = _infer_tutorial(shapes)
    same = config is not None and (config.widths, config.blocks) == (TUTORIAL_CONFIG.widths, TUTORIAL_CONFIG.blocks)
    label = "the tutorial's Net" if config is None or same else "the tutorial's Net, resized"
    return _resnet_candidate(config, tutorial_names=True, label=label, note=note)


def _infer_tutorial(shapes: Mapping[str, tuple[int, ...]]) -> tuple[ResNetConfig | None, str]:
    if len(shapes.get("conv1.weight", ())) != 4:
        return None, ""
    in_channels, w0 = shapes["conv1.weight"][1], shapes["conv1.weight"][0]
    widths = [w0]
    while len(widths) < MAX_STAGES and len(shapes.get(f"conv{len(widths) + 1}.weight", ())) == 4:
        widths.append(shapes[f"conv{len(widths) + 1}.weight"][0])
    ids = sorted({int(m.group(1)) for k in shapes if (m := _RES_KEY.match(k))})
    if not ids or len(ids) > MAX_BLOCKS:
        return None, ""
    block_widths = [_dim(shapes, f"res{k}.conv1.weight", 0, 4, -1) for k in ids]
    blocks, ambiguous = _split_blocks(shapes, widths, ids, block_widths)
    if blocks is None:
        return None, ""
    note = ""
    if ambiguous:
        note = ("stages of equal width: which blocks belong to which is not in the weights "
                f"and was taken as {'/'.join(map(str, blocks))}")
    try:
        config = ResNetConfig(in_channels=in_channels, num_classes=_num_classes(shapes, 10), widths=tuple(widths),
                              blocks=tuple(blocks), downsample="transition", name="tutorial")
    except ValueError:
        return None, ""
    return config, note


def _split_blocks(
    shapes: Mapping[str, tuple[int, ...]], widths: list[int], ids: list[int], block_widths: list[int]
) -> tuple[list[int] | None, bool]:
    """Blocks per stage for the tutorial's naming, and whether the weights left the split undecided.

    Consecutive blocks of a stage have its width, so the split is unique unless two neighbouring stages have
    the same width. Then the order of the keys decides when it interleaves transitions and blocks (as
    ``torch.save`` of ``Net.state_dict()`` does), else the blocks are shared out evenly.
    """
    n = len(widths)
    if len(ids) < n:
        return None, False
    # The key order: the blocks whose first key comes after transition conv{s+1} (and before the next).
    order = {k: i for i, k in enumerate(shapes)}
    marks = [order.get(f"conv{s + 1}.weight", -1) for s in range(1, n)]
    first_of: dict[int, int] = {}
    for i, k in enumerate(shapes):
        if m := _RES_KEY.match(k):
            first_of.setdefault(int(m.group(1)), i)
    first = [first_of[b] for b in ids]
    by_order = [sum(1 for f in first if (s == 0 or f > marks[s - 1]) and (s == n - 1 or f < marks[s]))
                for s in range(n)]
    if sum(by_order) == len(ids) and min(by_order) >= 1 and _fits_widths(by_order, widths, block_widths):
        return by_order, False
    # The widths: runs of neighbouring stages with one width, each run taking the blocks of that width.
    runs: list[list[int]] = []  # [width, stages, blocks]
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1, 0])
    r = 0
    for bw in block_widths:
        if bw != runs[r][0] and r + 1 < len(runs) and bw == runs[r + 1][0]:
            r += 1
        runs[r][2] += 1
    blocks: list[int] = []
    for _, n_stages, n_blocks in runs:
        blocks += [n_blocks // n_stages + (1 if i < n_blocks % n_stages else 0) for i in range(n_stages)]
    if min(blocks) < 1:  # a width that no block has: share the blocks out evenly, for the comparison
        blocks = [len(ids) // n + (1 if i < len(ids) % n else 0) for i in range(n)]
    return blocks, any(n_stages > 1 for _, n_stages, _ in runs)


def _fits_widths(blocks: list[int], widths: list[int], block_widths: list[int]) -> bool:
    stage_of = [s for s, count in enumerate(blocks) for _ in range(count)]
    return all(widths[s] == bw for s, bw in zip(stage_of, block_widths))


def _project_candidate(shapes: Mapping[str, tuple[int, ...]]) -> _Candidate:
    """This project's key names: ``stem.*``, ``stages.{s}.transition.*``, ``stages.{s}.blocks.res{k}.*``, ``fc.*``."""
    config, note = _infer_project(shapes)
    layout = "projection shortcuts" if config is not None and config.downsample == "projection" else "transitions"
    return _resnet_candidate(config, tutorial_names=False, label=f"this project's ResNet ({layout})", note=note)


def _infer_project(shapes: Mapping[str, tuple[int, ...]]) -> tuple[ResNetConfig | None, str]:
    if len(shapes.get("stem.conv.weight", ())) != 4:
        return None, ""
    in_channels, w0 = shapes["stem.conv.weight"][1], shapes["stem.conv.weight"][0]
    stage_ids = sorted({int(m.group(1)) for k in shapes if (m := _STAGE_KEY.match(k))})
    if not stage_ids or len(stage_ids) > MAX_STAGES:
        return None, ""
    blocks_of: dict[int, set[int]] = {s: set() for s in stage_ids}
    for k in shapes:
        if (m := _BLOCK_KEY.match(k)) and int(m.group(1)) in blocks_of:
            blocks_of[int(m.group(1))].add(int(m.group(2)))
    if sum(len(b) for b in blocks_of.values()) > MAX_BLOCKS:
        return None, ""
    widths, blocks = [], []
    for s in stage_ids:
        first = min(blocks_of[s], default=None)
        prefix = f"stages.{s}."
        width = next(
            (shapes[k][0] for k in (f"{prefix}blocks.res{first}.branch.conv1.weight", f"{prefix}transition.conv.weight",
                                   f"{prefix}blocks.res{first}.shortcut.conv.weight")
             if len(shapes.get(k, ())) == 4),
            widths[-1] if widths else w0,
        )
        widths.append(width)
        blocks.append(len(blocks_of[s]))
    projection = any(".shortcut." in k for k in shapes)
    # A first stage that downsamples has a transition (or a projection) of its own: its stride is not in the
    # weights, only that it is not 1.
    strided = any(k.startswith(("stages.0.transition.", f"stages.0.blocks.res{min(blocks_of[0], default=1)}.shortcut."))
                  for k in shapes) if 0 in blocks_of else False
    try:
        config = ResNetConfig(in_channels=in_channels, num_classes=_num_classes(shapes, 10), widths=tuple(widths),
                              blocks=tuple(blocks), downsample="projection" if projection else "transition",
                              first_stride=2 if strided else 1, name="custom")
    except ValueError:
        return None, ""
    return config, "the first stage downsamples: its stride is not in the weights and was taken as 2" if strided else ""


def _torchvision_candidate(shapes: Mapping[str, tuple[int, ...]], arch: str) -> _Candidate:
    """torchvision ``arch`` with the checkpoint's input channels and classifier width."""
    expected = dict(_meta_torchvision_shapes(arch))
    out_c, _, kh, kw = expected["conv1.weight"]
    expected["conv1.weight"] = (out_c, _dim(shapes, "conv1.weight", 1, 4, 3), kh, kw)
    classes = _num_classes(shapes, 1000)
    expected["fc.weight"] = (classes, expected["fc.weight"][1])
    expected["fc.bias"] = (classes,)
    per_stage = [len({k.split(".")[1] for k in expected if k.startswith(f"layer{s}.")}) for s in range(1, 5)]
    block = "Bottleneck" if "layer1.0.conv3.weight" in expected else "BasicBlock"
    summary = f"4 stages of {'/'.join(map(str, per_stage))} {block}s"
    return _Candidate(arch, f"torchvision {arch}", arch, expected, None, summary)


def _architecture(candidate: _Candidate, source: str) -> Architecture:
    """The :class:`Architecture` of a candidate the checkpoint fits.

    Raises:
        WeightsError: a classifier without classes or a first conv without input channels.
    """
    first = "conv1.weight" if "conv1.weight" in candidate.expected else "stem.conv.weight"
    in_channels = candidate.expected[first][1]
    num_classes = candidate.expected["fc.weight"][0]
    if num_classes < 1:
        raise WeightsError(f"{source} has a classifier without classes ('fc.weight' has shape "
                           f"{_shape_str(candidate.expected['fc.weight'])})")
    if in_channels < 1:
        raise WeightsError(f"{source} has a first convolution without input channels ('{first}' has shape "
                           f"{_shape_str(candidate.expected[first])})")
    params = sum(math.prod(s) for k, s in candidate.expected.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    description = (
        f"{candidate.label}: {candidate.summary}, {_plural(in_channels, 'input channel')}, "
        f"{_plural(num_classes, 'class', 'classes')}, {params:,} parameters"
        + (f" ({candidate.note})" if candidate.note else "")
    )
    return Architecture(candidate.kind, candidate.config, num_classes, in_channels, description)


# --- building and fitting -----------------------------------------------------------------------------------


def build_recognised(arch: Architecture) -> nn.Module:
    """A randomly initialised model of ``arch``, in eval mode, on the CPU.

    A torchvision ResNet with other than 3 input channels gets a first conv of that many (torchvision
    always builds 3), with torchvision's kernel, stride and padding.

    Raises:
        ValueError: ``arch.kind`` is neither ``"resnet"`` nor a supported torchvision name, or ``"resnet"``
            without a config.
    """
    with torch.device("cpu"):  # whatever the process's default device: the model starts on the CPU
        if arch.kind == "resnet":
            if arch.config is None:
                raise ValueError("an Architecture of kind 'resnet' needs a config")
            return build_model(arch.config).eval()
        model = build_torchvision(arch.kind, num_classes=arch.num_classes)
        if arch.in_channels != model.conv1.in_channels:
            conv = model.conv1
            model.conv1 = nn.Conv2d(arch.in_channels, conv.out_channels, kernel_size=conv.kernel_size,
                                    stride=conv.stride, padding=conv.padding, bias=conv.bias is not None)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    return model.eval()


def _expected_shapes(arch: Architecture, sd_keys: Iterable[str] = ()) -> dict[str, tuple[int, ...]]:
    """The keys and shapes a checkpoint of ``arch`` has, in the tutorial's naming when ``sd_keys`` use it."""
    keys = set(sd_keys)
    if arch.kind == "resnet":
        if arch.config is None:
            raise ValueError("an Architecture of kind 'resnet' needs a config")
        tutorial = "res1.conv1.weight" in keys and "conv1.weight" in keys
        return _resnet_candidate(arch.config, tutorial_names=tutorial, label="").expected
    shapes = {"conv1.weight": (64, arch.in_channels, 7, 7), "fc.weight": (arch.num_classes, 0)}
    return _torchvision_candidate(shapes, arch.kind).expected


def fit_recognised(model: nn.Module, sd: Mapping[str, torch.Tensor], arch: Architecture, source: str) -> nn.Module:
    """Copy ``sd`` into ``model`` (built by :func:`build_recognised` for ``arch``), every key and shape checked.

    Non-finite weights are refused: a model with a NaN or an infinity in its weights gives no meaningful
    prediction, and the file is damaged or its training diverged. Missing BN ``num_batches_tracked``
    counters are filled in with zeros (eval never reads them).

    Args:
        model: the model to fill, in place.
        sd: the state dict from :func:`read_checkpoint` (either key naming for ``"resnet"``).
        arch: what :func:`recognise` said ``sd`` is.
        source: what the messages call the checkpoint, e.g. ``"checkpoint net.pth"``.

    Returns:
        ``model``, in eval mode.

    Raises:
        WeightsError: a key or shape that does not fit ``arch``, or non-finite values.
    """
    sd = _strip_prefixes(dict(sd))
    expected = _expected_shapes(arch, sd)
    short = "torchvision " + arch.kind if arch.kind != "resnet" else "this ResNet"
    _, problem = _compare(expected, _shapes_of(sd, source))
    if problem is not None:
        raise WeightsError(f"{source} does not fit {short}: {_problem_text(problem, short)}")
    for key, value in sd.items():
        if value.is_floating_point():
            # float8 types lack isfinite; their values fit in float32 exactly.
            exotic = value.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            finite = torch.isfinite(value.float() if exotic else value)
            if not finite.all():
                bad = value.numel() - int(finite.sum())
                raise WeightsError(
                    f"{source} was refused because key '{key}' holds {_plural(bad, 'NaN or infinite value')} "
                    f"(of {value.numel():,}): a model with non-finite weights cannot give a meaningful prediction"
                )
    for key, shape in expected.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros(shape, dtype=torch.long)
    if arch.kind == "resnet":
        load_weights_into(model, sd, source=source)
    else:
        fit_torchvision_weights(model, sd, arch.kind, source)
    return model.eval()
