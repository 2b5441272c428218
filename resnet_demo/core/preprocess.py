"""From whatever the user gives (file, bytes, PIL image, array, sketch) to the model's input tensor.

:func:`normalise_batch` is the one step from uint8 pixels to the model's input, for one image here and for
every batch elsewhere (an evaluation set, a training batch, a feature-visualisation image).

Two input kinds, chosen by the model card's ``input_kind``:

- ``photo``: decode, honour EXIF orientation, any PIL mode -> RGB (transparency composited over
  white), resize the short side to ``card.resize``, centre-crop ``card.input_size``, normalise.
- ``drawing``: MNIST-style. Dark strokes on a light background (or strokes on a transparent layer)
  are inverted to a light digit on black, cropped to the ink, scaled so the longer side is 20/28 of
  the digit box, placed so the centre of mass is at the centre (as LeCun et al. prepared MNIST),
  padded to ``card.input_size`` and replicated to the model's input channels.

Every failure is an :class:`InputError` (a ``ValueError``) with a sentence a person understands.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .weights.cards import ModelCard

__all__ = [
    "InputError",
    "MAX_PIXELS",
    "Prepared",
    "drawing_array",
    "load_image",
    "normalise_batch",
    "photo_array",
    "prepare",
]

# Largest image we decode: 50 megapixels covers every phone and DSLR photo, and bounds memory
# (50 MP RGB is 150 MB decoded) and time. Anything larger is refused before decoding.
MAX_PIXELS = int(os.environ.get("RESNET_DEMO_MAX_PIXELS", 50_000_000))
# Ink threshold on a [0, 1] intensity: lighter marks are paper noise or antialiasing.
INK_THRESHOLD = 0.1


@dataclass
class Prepared:
    """The model's input for one image: ``tensor`` is normalised (1, C, H, W) float32."""

    tensor: torch.Tensor
    kind: str


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"The image has zero size ({width}×{height}); there is nothing to analyse.")
    if width * height > MAX_PIXELS:
        raise InputError(
            f"The image is {width}×{height} pixels ({width * height / 1e6:.0f} MP); "
            f"the limit is {MAX_PIXELS / 1e6:.0f} MP. Please use a smaller image."
        )


def _too_large(name: str, exc: Exception) -> InputError:
    """PIL refuses images over 2 × ``Image.MAX_IMAGE_PIXELS`` (179 MP) before we see their size: say our limit."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f" ({int(found.group(1)) / 1e6:.0f} MP)" if found else ""
    return InputError(
        f"{name} is too large{size}; the limit is {MAX_PIXELS / 1e6:.0f} MP. Please use a smaller image."
    )


def _flatten_modes(img: Image.Image) -> Image.Image:
    """Any PIL mode -> ``RGB`` or ``L`` (8 bit), transparency composited over white."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated GIF / APNG / multi-page TIFF: analyse the first frame
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        if mode.startswith("I;16") or (mode == "I" and arr.min() >= 0 and arr.max() <= 65535 and arr.max() > 255):
            arr = arr / 65535.0
        elif mode == "F" and arr.min() >= 0 and arr.max() <= 1:
            pass
        else:  # unknown range: stretch to [0, 1]
            lo, hi = arr.min(), arr.max()
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _from_array(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InputError(f"An image array must be H×W, H×W×3 or H×W×4; got shape {tuple(arr.shape)}.")
    _check_size(arr.shape[1], arr.shape[0])
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2] if arr.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(arr), mode)


def load_image(source: Any, *, draft_size: int | None = None) -> Image.Image:
    """Decode ``source`` (path, bytes, file object, PIL image or array) to an ``RGB`` or ``L`` image.

    EXIF orientation is applied. ``draft_size`` lets JPEG decoding skip detail the model will not see.

    Raises:
        InputError: not an image, truncated or corrupt, zero-sized, or larger than ``MAX_PIXELS``.
    """
    if source is None:
        raise InputError("No image was given.")
    if isinstance(source, np.ndarray):
        return _flatten_modes(_from_array(source))
    if isinstance(source, Image.Image):
        img = source
    else:
        name = "the upload"
        if isinstance(source, (str, Path)):
            name = Path(source).name
            if not Path(source).is_file():
                raise InputError(f"{name}: file not found.")
            if Path(source).stat().st_size == 0:
                raise InputError(f"{name} is empty (0 bytes), not an image.")
        elif isinstance(source, (bytes, bytearray)):
            if not source:
                raise InputError("The upload is empty (0 bytes), not an image.")
            source = io.BytesIO(source)
        try:
            img = Image.open(source)
        except UnidentifiedImageError:
            raise InputError(
                f"{name} is not an image in a format we can read (PNG, JPEG, GIF, WebP, BMP, TIFF…)."
            ) from None
        except Image.DecompressionBombError as exc:
            raise _too_large(name, exc) from None
        except (OSError, ValueError) as exc:  # a damaged header: PIL's plugins raise ValueError too (found by fuzzing)
            raise InputError(f"{name} could not be read ({exc}).") from None
        _check_size(*img.size)
        try:
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
        except Image.DecompressionBombError as exc:
            raise _too_large(name, exc) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{name} is truncated or corrupt and could not be decoded ({exc}).") from None
    _check_size(*img.size)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block should not cost the user the image
        pass
    return _flatten_modes(img)


def photo_array(img: Image.Image, card: ModelCard) -> np.ndarray:
    """Resize the short side to ``card.resize``, centre-crop ``card.input_size``; returns (H, W, 3) uint8."""
    img = img.convert("RGB")
    w, h = img.size
    scale = card.resize / min(w, h)
    new = (max(card.input_size, round(w * scale)), max(card.input_size, round(h * scale)))
    img = img.resize(new, Image.BICUBIC, reducing_gap=3.0)
    left, top = (new[0] - card.input_size) // 2, (new[1] - card.input_size) // 2
    img = img.crop((left, top, left + card.input_size, top + card.input_size))
    return np.asarray(img, dtype=np.uint8)


def drawing_array(img: Image.Image, card: ModelCard) -> np.ndarray:
    """MNIST-style centring of a drawing; returns (H, W) uint8, light digit on black.

    Raises:
        InputError: the drawing has no ink.
    """
    gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 1.0 - gray if np.median(border) > 0.5 else gray  # dark-on-light paper vs MNIST's light-on-dark
    rows, cols = np.nonzero(ink > INK_THRESHOLD)
    if rows.size == 0:
        raise InputError("The drawing is empty: draw a digit (dark strokes on the white pad) and try again.")
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    inner = card.input_size * 28 // 32  # MNIST: a 28×28 box padded to 32×32
    digit = inner * 20 // 28  # MNIST: the digit's longer side is 20 px of the 28
    h, w = ink.shape
    scale = digit / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(ink, "F").resize(size, Image.LANCZOS), dtype=np.float32).clip(0, 1)
    total = small.sum()
    ys, xs = np.indices(small.shape)
    cy, cx = ((ys * small).sum() / total, (xs * small).sum() / total) if total > 0 else (h / 2, w / 2)
    top = int(np.clip(round(card.input_size / 2 - cy), 0, card.input_size - small.shape[0]))
    left = int(np.clip(round(card.input_size / 2 - cx), 0, card.input_size - small.shape[1]))
    out = np.zeros((card.input_size, card.input_size), dtype=np.float32)
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def sketch_image(value: Any) -> Image.Image:
    """The flattened image of a Gradio sketchpad value (``{"background", "layers", "composite"}``)."""
    if not isinstance(value, dict):
        return load_image(value)
    composite = value.get("composite")
    if composite is not None:
        return load_image(composite) if not isinstance(composite, np.ndarray) else _composite_rgba([composite])
    parts = [p for p in [value.get("background"), *(value.get("layers") or [])] if p is not None]
    if not parts:
        raise InputError("The drawing is empty: the sketch has no background, layers or composite image.")
    return _composite_rgba(parts)


def _composite_rgba(parts: list) -> Image.Image:
    base = None
    for part in parts:
        img = part if isinstance(part, Image.Image) else _from_array(np.asarray(part))
        img = img.convert("RGBA")
        if base is None:
            base = Image.new("RGBA", img.size, (255, 255, 255, 255))
        if img.size != base.size:
            img = img.resize(base.size)
        base = Image.alpha_composite(base, img)
    return base.convert("RGB")


def normalise_batch(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    channels: int,
    *,
    size: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Images (N, C, H, W) -> the model's input (N, channels, H', W'): ``(x / 255 - mean) / std``.

    Args:
        images: uint8, or floating point already in [0, 1] (then nothing is done in place, so gradients
            flow through).
        mean, std: one entry, or one per input channel, as in the model card. Tensors are used where
            they are (a training loop keeps them on its device instead of copying them every batch).
        channels: the model's input channels. A one-channel batch is replicated; a batch of another
            channel count is averaged to grey first (an RGB set into a grey model).
        size: the model's input side; a batch of another size is resized to it (bilinear, antialiased).
            ``None`` keeps the size.
        device: where the result is; the batch is moved there before conversion (uint8: a quarter of
            the bytes of float32). ``None`` leaves it where it is.

    Raises:
        ValueError: not a (N, C, H, W) batch, or mean/std with neither 1 nor ``channels`` entries.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a (N, C, H, W) batch, got shape {list(images.shape)}")
    x = images if device is None else images.to(device, non_blocking=True)
    x = x if x.is_floating_point() else x.float().div_(255)  # a new tensor: dividing in place is safe
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    if mean_t.numel() not in (1, channels) or std_t.numel() not in (1, channels):
        raise ValueError(f"mean/std have {mean_t.numel()}/{std_t.numel()} entries for {channels} input channels; "
                         "give one value, or one per channel")
    if x.shape[1] not in (1, channels):
        x = x.mean(dim=1, keepdim=True)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1)
    return (x - mean_t.view(1, -1, 1, 1)) / std_t.view(1, -1, 1, 1)


def to_tensor(arr: np.ndarray, card: ModelCard, channels: int) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) -> normalised (1, channels, H, W) float32, gray replicated."""
    t = torch.from_numpy(np.array(arr, dtype=np.uint8))  # a copy: PIL's arrays are read-only
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)  # (C, H, W)
    try:
        return normalise_batch(t.unsqueeze(0), card.mean, card.std, channels).contiguous()
    except ValueError as exc:
        raise ValueError(f"model card '{card.name}': {exc}") from None


def prepare(source: Any, card: ModelCard, *, kind: str | None = None, channels: int = 3) -> Prepared:
    """Decode and preprocess ``source`` for the model described by ``card``.

    Args:
        source: a path, bytes, PIL image, array, or a sketchpad dict.
        kind: ``"photo"`` or ``"drawing"``; defaults to the card's ``input_kind``.
        channels: the model's input channels.
    """
    kind = kind or card.input_kind
    if kind not in ("photo", "drawing"):
        raise ValueError(f"kind must be 'photo' or 'drawing', got {kind!r}")
    if isinstance(source, dict):
        img = sketch_image(source)
    else:
        img = load_image(source, draft_size=card.resize * 2 if kind == "photo" else None)
    if kind == "drawing":
        arr = drawing_array(img, card)
    elif card.colour_mode == "gray":
        arr = np.asarray(Image.fromarray(photo_array(img, card)).convert("L"))
    else:
        arr = photo_array(img, card)
    return Prepared(to_tensor(arr, card, channels), kind)
