"""Feature visualisation: an input image optimised to excite one channel of a block's x, F(x) or y (its *part*).

The method of Olah, Mordvintsev and Schubert, "Feature Visualization" (Distill, 2017), as Lucid does it:

- the image is parametrised in a **decorrelated space**: a 2-D Fourier spectrum per colour channel,
  each frequency scaled by 1/frequency (so that all frequencies are learnt at a similar rate, and the
  result is not dominated by high-frequency noise), mixed to RGB by the square root of the colour
  covariance (of the model's evaluation set when it has one, else Lucid's ImageNet matrix), then
  squashed into [0, 1] with a sigmoid. One-channel (grey) models get one grey channel;
- **transformation robustness**: each step the network sees the image under a random jitter, scale
  and small rotation (one affine resampling), so the image must excite the channel wherever it is;
- Adam ascends the channel's mean activation, with Lucid's *redirected ReLU gradient*: where a ReLU
  passes no gradient at all (a post-ReLU channel that the starting noise leaves at zero everywhere), the
  gradient is let through its negative units anyway, so the optimisation does not stall on a dead start.

The chosen tensor is read with a forward hook that acts only for the calling thread and stops the
forward pass as soon as the tensor exists (later blocks are not computed); the ReLU redirection is a
forward hook of the same kind on each ``nn.ReLU``. Gradients are taken with
:func:`torch.autograd.grad` with respect to the image parameters only, so nothing is ever written
into a parameter's ``.grad``; the model's mode and ``requires_grad`` flags are not touched, and the
hooks are removed in ``finally``. Other threads may run forward passes on the same model meanwhile.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..capture import BlockSpec, find_blocks
from ..errors import InputError
from ..explorer import Explorer
from ..preprocess import normalise_batch
from ..weights.cards import ModelCard
from .evalsets import evalset_for, load_evalset

__all__ = [
    "DEFAULT_STEPS",
    "LUCID_COLOUR_SQRT",
    "SHOWN_PARTS",
    "FeatureVis",
    "block_activation",
    "block_parts",
    "cached_visualise",
    "visualise_channel",
    "colour_sqrt",
    "visualise",
]

# The parts of a block whose channels the page shows, visualises and finds exemplars for: its input x, its
# residual branch F(x) and its output y (of capture.PARTS, all but the shortcut s(x), which is x itself or a
# 1x1 projection of it). The order is that of the stored exemplars files' columns.
SHOWN_PARTS = ("x", "f", "y")
VIEWS = SHOWN_PARTS  # the former name, still imported by training/exemplars.py
DEFAULT_STEPS = 160  # Adam steps; the activation has levelled off by then for the shipped models
LEARNING_RATE = 0.1  # twice Lucid's 0.05: with 160 steps (not 512) the activation ends ~50% higher, still readable
INIT_STD = 0.01  # std of the starting spectrum (Lucid's): a nearly uniform grey image with faint noise
DECAY_POWER = 1.0  # spectrum scaled by 1 / frequency ** DECAY_POWER
JITTER = 1 / 16  # random shift, as a share of the image side (2 pixels of 32)
SCALES = (0.9, 1.1)  # random zoom range
MAX_ROTATION = 10.0  # degrees, either way
CACHE_PER_MODEL = 256  # visualisations kept per model

# Lucid's square root of ImageNet's colour covariance (lucid/optvis/param/color.py), as RGB columns.
LUCID_COLOUR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


@dataclass(frozen=True)
class FeatureVis:
    """An image optimised to excite ``channel`` of ``part`` (``x``, ``f`` or ``y``) of ``block``.

    ``activation`` is the channel's mean over its map for ``image`` itself (as stored, in uint8, without
    the random transforms); ``start_activation`` the same for the starting noise.
    """

    block: str
    part: str
    channel: int
    seed: int
    steps: int
    image: np.ndarray  # (H, W, 3) uint8, or (H, W) for a grey model; read-only
    activation: float
    start_activation: float
    seconds: float

    @property
    def gain(self) -> float:
        """How much the optimisation raised the channel's mean activation over the starting noise."""
        return self.activation - self.start_activation


# --- reading one block's tensor with gradients ------------------------------------------------------


class _Reached(Exception):
    """Raised by the probe hook once the chosen tensor exists: the rest of the network is not needed."""


def _spec(model: nn.Module, block: str) -> BlockSpec:
    specs = find_blocks(model)
    for spec in specs:
        if spec.name == block:
            return spec
    raise InputError(f"unknown block {block!r}; this model's blocks are {[s.name for s in specs]}")


_ORDER = {"x": 0, "f": 1, "y": 2}  # the order a block's tensors appear in during the forward pass


@contextmanager
def block_parts(
    model: nn.Module, block: str, parts: tuple[str, ...] = SHOWN_PARTS
) -> Iterator[Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    """A function input -> {part: tensor (B, C, H, W)} for ``parts`` of ``block``, differentiable, valid
    inside this context.

    Forward hooks on the block (and on its branch's last module, for F(x)) take the tensors for the
    thread that opened the context only, and end the forward pass as soon as the last one wanted exists
    (later blocks are not computed); they are removed on exit. The caller decides about gradients
    (``torch.no_grad`` or not); nothing here touches the parameters.

    Raises:
        InputError: an unknown block or part.
    """
    unknown = [p for p in parts if p not in SHOWN_PARTS]
    if unknown or not parts:
        raise InputError(f"unknown part(s) {unknown}; choose from {list(SHOWN_PARTS)} (block input, branch F(x), "
                         "output)")
    spec = _spec(model, block)
    owner = threading.get_ident()
    last = max(parts, key=_ORDER.__getitem__)
    found: dict[str, torch.Tensor] = {}

    def take(part: str, t: torch.Tensor) -> None:
        if threading.get_ident() != owner or part not in parts:
            return
        # torchvision adds the shortcut into F(x) in place: a copy (which keeps the graph) when y is wanted too
        found[part] = t.clone() if part == "f" and last == "y" else t
        if part == last:
            raise _Reached

    handles = [
        spec.module.register_forward_pre_hook(lambda _m, inputs: take("x", inputs[0])),
        spec.branch_end.register_forward_hook(lambda _m, _i, output: take("f", output)),
        spec.module.register_forward_hook(lambda _m, _i, output: take("y", output)),
    ]

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        found.clear()
        try:
            model(x)
        except _Reached:
            out = dict(found)
            found.clear()
            return out
        raise InputError(f"the forward pass never reached block {block!r}")

    try:
        yield run
    finally:
        for h in handles:
            h.remove()


@contextmanager
def block_activation(model: nn.Module, block: str, part: str) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """:func:`block_parts` for one part: a function input -> that tensor (B, C, H, W)."""
    with block_parts(model, block, (part,)) as run:
        yield lambda x: run(x)[part]


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose gradient is redirected where it would be zero everywhere (Lucid's ``redirected_relu_grad``).

    When no unit of an image passes any gradient (every unit the objective reads is at or below zero, as
    a post-ReLU channel often is for the starting noise), the gradient is let through to the negative
    units too, except where it would push them lower still: the optimisation can leave a dead start.
    The forward value is the plain ReLU's.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        positive = x > 0
        relu_grad = grad * positive
        passes = relu_grad.flatten(1).ne(0).any(dim=1)
        if bool(passes.all()):  # the usual case, once the image excites the channel at all
            return relu_grad
        # grad > 0 would lower the unit (the optimiser steps against the gradient): keep those at zero
        redirected = grad * (positive | (grad <= 0))
        return torch.where(passes.view(-1, *([1] * (grad.ndim - 1))), relu_grad, redirected)


@contextmanager
def _redirected_relus(model: nn.Module) -> Iterator[None]:
    """Every (not in-place) ``nn.ReLU`` of ``model`` computes :class:`_RedirectedReLU` for this thread's
    forward passes inside the context (the same values; only the gradient differs). An in-place ReLU has
    overwritten its input by the time a hook runs, so it keeps its own gradient."""
    owner = threading.get_ident()

    def hook(_module, inputs, _output):
        if threading.get_ident() == owner and torch.is_grad_enabled():
            return _RedirectedReLU.apply(inputs[0])
        return None

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU) and not m.inplace]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- the image parametrisation ----------------------------------------------------------------------


def colour_sqrt(images: torch.Tensor) -> torch.Tensor:
    """The square root of the colour covariance of uint8 images (N, 3, H, W), as Lucid builds its matrix:
    ``U sqrt(S)`` from the SVD of the 3x3 covariance of pixel values in [0, 1] (columns are RGB directions)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"colour covariance needs RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255  # (3, N*H*W)
    u, s, _ = torch.linalg.svd(torch.cov(pixels))
    return (u * s.sqrt()).float()


@lru_cache(maxsize=4)
def _evalset_colour(name: str) -> torch.Tensor:
    return colour_sqrt(load_evalset(name).images)


def _colour_matrix(card: ModelCard) -> torch.Tensor:
    """The model's data's colour square root when its evaluation set is shipped, else Lucid's; columns
    normalised so the largest has norm 1, as Lucid does."""
    name = evalset_for(card)
    m = _evalset_colour(name) if name is not None and card.colour_mode != "gray" else LUCID_COLOUR_SQRT
    return m / m.norm(dim=0).max()


def _spectrum_scale(h: int, w: int) -> torch.Tensor:
    """1 / frequency (floored at the lowest non-zero one), times sqrt(h w) as in Lucid: (h, w // 2 + 1)."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    freqs = torch.sqrt(fx * fx + fy * fy)
    return (1.0 / freqs.clamp_min(1.0 / max(h, w)) ** DECAY_POWER) * math.sqrt(h * w)


class _Image:
    """Fourier-space parameters -> an image in [0, 1], (1, C, H, W), C = 3 (decorrelated colour) or 1."""

    def __init__(self, channels: int, size: int, colour: torch.Tensor | None, generator: torch.Generator):
        self.channels, self.size, self.colour = channels, size, colour
        shape = (channels, size, size // 2 + 1, 2)
        self.spectrum = (torch.randn(shape, generator=generator) * INIT_STD).requires_grad_(True)
        self.scale = _spectrum_scale(size, size)

    def __call__(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        t = torch.fft.irfft2(spectrum, s=(self.size, self.size)) / 4.0  # (C, H, W), Lucid's / 4
        if self.colour is not None:
            t = torch.einsum("ij,jhw->ihw", self.colour, t)  # decorrelated -> RGB
        return torch.sigmoid(t).unsqueeze(0)


def _affine(generator: torch.Generator) -> torch.Tensor:
    """A random jitter, scale and rotation as a (1, 2, 3) matrix for ``affine_grid`` (output -> input)."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    scale = SCALES[0] + (SCALES[1] - SCALES[0]) * u[0]
    angle = math.radians(MAX_ROTATION * (2 * u[1] - 1))
    tx, ty = 2 * JITTER * (2 * u[2] - 1), 2 * JITTER * (2 * u[3] - 1)  # grid units: the side is 2
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    return torch.tensor([[[c, -s, tx], [s, c, ty]]], dtype=torch.float32)


def _transform(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    grid = F.affine_grid(_affine(generator), list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# --- the optimisation -------------------------------------------------------------------------------


def _quantised(image: torch.Tensor) -> torch.Tensor:
    """The [0, 1] image as it will be stored (uint8), back in [0, 1]."""
    return torch.round(image.detach().clamp(0, 1) * 255) / 255


def _to_array(image: torch.Tensor) -> np.ndarray:
    arr = (torch.round(image.detach().clamp(0, 1) * 255)).to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
    arr = arr[:, :, 0] if arr.shape[2] == 1 else arr
    arr = np.ascontiguousarray(arr)
    arr.flags.writeable = False
    return arr


def visualise(
    model: nn.Module,
    card: ModelCard,
    block: str,
    part: str,
    channel: int,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
) -> FeatureVis:
    """Optimise an image to maximise the mean of ``channel`` of ``part`` of ``block``.

    Args:
        model: the model in eval mode, on any device; it is not changed (no gradient, hook, mode or flag
            is left on it), and other threads may use it meanwhile.
        card: its card: input size, mean/std, colour mode (``gray`` gives a grey image).
        block, part, channel: which channel (``part`` is ``x``, ``f`` for F(x), or ``y``).
        seed: the starting noise and the random transforms; the same seed gives the same image (on one
            machine with the same number of CPU threads: a float sum's order depends on them).
        steps: Adam steps (one forward and one backward pass each, as far as ``block`` only).

    Raises:
        InputError: an unknown block or part, a channel out of range, fewer than 1 step, or a model in
            training mode (its BatchNorm would update its statistics from the optimised image).
    """
    if steps < 1:
        raise InputError(f"the optimisation needs at least 1 step, got {steps}")
    if any(m.training for m in model.modules()):
        raise InputError("feature visualisation needs the model in eval mode; in training mode its BatchNorm "
                         "statistics would change")
    start = time.perf_counter()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    device = first.weight.device
    grey = card.colour_mode == "gray" or first.in_channels == 1
    gen = torch.Generator().manual_seed(int(seed))
    image = _Image(1 if grey else 3, card.input_size, None if grey else _colour_matrix(card), gen)
    mean = torch.as_tensor(card.mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(card.std, dtype=torch.float32, device=device)

    def normalise(img: torch.Tensor) -> torch.Tensor:  # an image in [0, 1] -> the model's input, differentiably
        return normalise_batch(img, mean, std, first.in_channels, device=device)

    def objective(run: Callable, img: torch.Tensor) -> torch.Tensor:
        return run(normalise(img))[0, channel].mean()

    with block_activation(model, block, part) as run:
        with torch.no_grad():
            width = run(normalise(image())).shape[1]
            if not 0 <= channel < width:
                raise InputError(f"{part} of block {block} has {width} channels (0 to {width - 1}); got {channel}")
            start_act = float(objective(run, _quantised(image())))
        opt = torch.optim.Adam([image.spectrum], lr=LEARNING_RATE)
        with _redirected_relus(model):
            for _ in range(steps):
                act = objective(run, _transform(image(), gen))
                (grad,) = torch.autograd.grad(-act, [image.spectrum])
                image.spectrum.grad = grad  # the image's own parameter; the model's .grad stay untouched
                opt.step()
        image.spectrum.grad = None
        with torch.no_grad():
            final = _quantised(image())
            reached = float(objective(run, final))
    return FeatureVis(block, part, int(channel), int(seed), int(steps), _to_array(final), reached, start_act,
                      time.perf_counter() - start)


# --- cache --------------------------------------------------------------------------------------------

_cache: weakref.WeakKeyDictionary[nn.Module, OrderedDict] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def cached_visualise(
    model: nn.Module,
    card: ModelCard,
    block: str,
    part: str,
    channel: int,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
) -> FeatureVis:
    """:func:`visualise`, remembered per model object (dropped with it) by (block, part, channel, seed, steps),
    the :data:`CACHE_PER_MODEL` most recently used kept."""
    key = (block, part, int(channel), int(seed), int(steps))
    with _cache_lock:
        entries = _cache.setdefault(model, OrderedDict())
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
    result = visualise(model, card, block, part, channel, seed=seed, steps=steps)
    with _cache_lock:
        entries = _cache.setdefault(model, OrderedDict())
        entries[key] = result
        while len(entries) > CACHE_PER_MODEL:
            entries.popitem(last=False)
    return result


def visualise_channel(explorer: Explorer, block: str, part: str, channel: int, *, seed: int = 0,
                      steps: int = DEFAULT_STEPS) -> FeatureVis:
    """:func:`cached_visualise` of an explorer's model: what the page asks for (it never touches the model)."""
    return cached_visualise(explorer.model, explorer.card, block, part, channel, seed=seed, steps=steps)
