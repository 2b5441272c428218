"""Forward-hook capture of every residual block's x, F(x), s(x) and y.

Blocks are found by walking ``named_modules()`` and asking :mod:`.blocks` about each module: the project's
:class:`~resnet_demo.core.model.ResidualBlock`, torchvision's ``BasicBlock`` / ``Bottleneck``, timm's ResNet and
ResNetV2 blocks and transformers' ResNet layers. For each block three hooks are registered:

- on the module whose output is F(x) (the project's ``branch``; torchvision's last BN; timm's last of BN, SE and
  drop-path; transformers' ``layer``). Most libraries add the shortcut to that tensor *in place*, so the hook
  copies it at once, before the add;
- on the projection shortcut, when there is one (otherwise s(x) is x);
- on the block itself, for x (its input) and y (its output).

Hooks exist only inside :func:`capture`, are removed in ``finally``, and act only for the thread that
opened the capture: another thread running the same model at the same time is neither recorded nor
lesioned, so concurrent requests on one shared model never mix.

The same branch hook makes interventions: a *lesion* removes a block's branch (``y = relu(s(x))``, Veit
et al. 2016) and a *graded* one scales it, ``y = relu(alpha * F(x) + s(x))``. ``alpha = 0`` is the lesion
exactly (the branch becomes zeros, not ``F * 0``, which would keep a NaN or infinity) and ``alpha = 1``
leaves the tensor untouched, so its logits are the intact model's bit for bit. A pre-activation block (timm's
``resnetv2``, :attr:`BlockSpec.activation` ``None``) has no ReLU after the sum: there the lesion is ``y = s(x)``.

A capture keeps only the parts asked for (``keep``, e.g. ``("y",)``): hooks for the other parts are not
registered, so a study that reads only block outputs never holds a block's input or branch. ``reduce``
goes further: each kept tensor is handed to it the moment the model produces it and only its result is
kept (a Gram matrix, per-channel means), so the full activation is freed as the forward pass moves on.

Recorded tensors are copies wherever the model could change them in place later in the pass
(torchvision's blocks add the shortcut into F and apply an in-place ReLU). The project's own
:class:`~resnet_demo.core.model.ResNet` never writes into a tensor it has produced, so for it the hooks
keep the activations themselves: each pass allocates fresh outputs, and skipping 20 copies is a
third of what capturing costs.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from .blocks import BlockTypes, TorchvisionBlocks
from .model import ResNet

__all__ = [
    "PARTS", "BlockRecord", "BlockSpec", "Capture", "activation_sizes", "block_shapes", "capture", "capture_forward",
    "find_blocks",
]

PARTS = ("x", "f", "s", "y")  # a block's input, branch F(x), shortcut s(x) and output


@dataclass(frozen=True)
class BlockSpec:
    """Where a block's parts are. ``shortcut`` is ``None`` for an identity shortcut; ``activation`` is what follows
    the sum (``"relu"``), ``None`` for a pre-activation block (``y = F(x) + s(x)``; see :mod:`.blocks` for how its
    metrics read)."""

    name: str
    stage: int
    path: str
    module: nn.Module
    branch_end: nn.Module
    shortcut: nn.Module | None
    activation: str | None = "relu"


@dataclass
class BlockRecord:
    """One block's tensors, detached, each (B, C, H, W); the model never writes into them again."""

    name: str
    stage: int
    x: torch.Tensor | None = None
    f: torch.Tensor | None = None
    s: torch.Tensor | None = None
    y: torch.Tensor | None = None


def _torchvision_block_types() -> tuple[type, ...]:
    """torchvision's block classes, if torchvision's ResNet module is loaded in this process (nothing is imported:
    a model built by torchvision cannot exist before its module is)."""
    return TorchvisionBlocks().classes()


def find_blocks(model: nn.Module) -> list[BlockSpec]:
    """All residual blocks of ``model`` in forward order, named as the model names them."""
    return _scan(model)[0]


def _scan(model: nn.Module) -> tuple[list[BlockSpec], bool]:
    """The blocks, and whether any module of ``model`` works in place (one walk over the modules:
    a capture needs both, and walking ~100 modules costs ~0.1 ms)."""
    types = BlockTypes()
    specs = []
    inplace = False
    for path, module in model.named_modules():
        # ``inplace`` as ReLU & co. keep it (instance attribute) or as a class attribute; getattr on the
        # module itself would go through Module.__getattr__, slow for a missing name
        inplace = inplace or module.__dict__.get("inplace", getattr(type(module), "inplace", False)) is True
        parts = types.parts_of(path, module)
        if parts is not None:
            specs.append(BlockSpec(parts.name, parts.stage, path, module, parts.branch_end, parts.shortcut,
                                   parts.activation))
    return specs, inplace


def _select(specs: list[BlockSpec], names: Iterable[str] | None, what: str) -> list[BlockSpec]:
    if names is None:
        return specs
    names = list(names)
    known = {s.name for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown block(s) {unknown} for {what}; this model's blocks are {sorted(known)}")
    return [s for s in specs if s.name in names]


@dataclass
class Capture:
    """What a capture recorded; filled in during the forward pass."""

    specs: list[BlockSpec]
    records: dict[str, BlockRecord] = field(default_factory=dict)
    reached: set[str] = field(default_factory=set)  # blocks a forward pass in this context completed

    @property
    def blocks(self) -> list[BlockRecord]:
        """Records in forward order, only for blocks the forward pass reached."""
        return [self.records[s.name] for s in self.specs if s.name in self.reached]


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def _parts(keep: Iterable[str]) -> frozenset[str]:
    keep = (keep,) if isinstance(keep, str) else tuple(keep)
    unknown = [p for p in keep if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown} to keep; a block's parts are {list(PARTS)}")
    return frozenset(keep)


def _scales(specs: list[BlockSpec], lesion: Iterable[str], scale: Mapping[str, float]) -> dict[str, float]:
    """Block name -> the factor its branch is multiplied by (0 for a lesion); blocks left at 1 are absent.

    Raises:
        KeyError: an unknown block name. ValueError: a factor that is not a finite number, or a block
        both lesioned and scaled by something other than 0.
    """
    lesioned = {s.name for s in _select(specs, lesion, "lesion")}
    _select(specs, scale, "scale")
    factors = dict.fromkeys(lesioned, 0.0)
    for name, alpha in scale.items():
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"the scale of block {name} must be a finite number, got {alpha!r}")
        if name in lesioned and alpha != 0:
            raise ValueError(f"block {name} is both lesioned and scaled by {alpha:g}: give one or the other")
        if alpha != 1:
            factors[name] = float(alpha)
    return factors


@contextmanager
def capture(
    model: nn.Module,
    *,
    blocks: Iterable[str] | None = None,
    lesion: Iterable[str] = (),
    record: bool = True,
    scale: Mapping[str, float] = MappingProxyType({}),
    keep: Iterable[str] = PARTS,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[Capture]:
    """Record x, F(x), s(x), y of every block (or of ``blocks``) during forward passes in this context.

    Args:
        model: any module containing residual blocks.
        blocks: names of the blocks to record; all by default.
        lesion: names of blocks whose branch is removed for passes in this context (y = relu(s(x)),
            Veit et al. 2016). The model itself is not changed.
        record: set ``False`` to lesion or scale without copying tensors.
        scale: block name -> alpha: that block computes ``y = relu(alpha * F(x) + s(x))`` for passes in
            this context. 0 is the lesion, 1 the intact block (its tensor is not touched). A scaled or
            lesioned block's record holds the branch as it was added (``alpha * F(x)``, zeros).
        keep: the parts to record (of :data:`PARTS`); the others stay ``None`` and no hook records them.
            An identity shortcut's ``s`` is the block's input, taken without keeping ``x``.
        reduce: applied to each kept tensor when the model produces it (detached, before anything can write
            into it); the record holds its result instead of the tensor, e.g. ``gram`` for a Gram matrix.

    Raises:
        KeyError: a name in ``blocks``, ``lesion`` or ``scale`` is not a block of ``model``.
        ValueError: ``model`` has no residual blocks; a scale is not a finite number, or a lesioned block
            is also scaled by something other than 0; a part to keep that is not one of :data:`PARTS`.
    """
    specs, inplace = _scan(model)
    if not specs:
        raise ValueError(f"{type(model).__name__} has no residual blocks to capture")
    parts = _parts(keep)
    recorded = _select(specs, blocks, "capture") if record else []
    factors = _scales(specs, lesion, scale)
    # The project's ResNet itself (not a subclass, whose forward could differ) with no in-place module
    # creates a new tensor at every step, so its activations can be kept; anything else gets copies.
    result = Capture(recorded, {s.name: BlockRecord(s.name, s.stage) for s in recorded})
    hooks = _Hooks(threading.get_ident(), _keep if type(model) is ResNet and not inplace else _copy, parts, reduce,
                   result.reached)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for spec in specs:
            rec = result.records.get(spec.name)
            alpha = factors.get(spec.name)
            identity = spec.shortcut is None
            if alpha is not None or (rec is not None and "f" in parts):
                branch_rec = rec if "f" in parts else None
                handles.append(spec.branch_end.register_forward_hook(hooks.on_branch(branch_rec, alpha)))
            if rec is None:
                continue
            if not identity and "s" in parts:
                handles.append(spec.shortcut.register_forward_hook(hooks.on_shortcut(rec)))
            wants_x = "x" in parts or (identity and "s" in parts)
            if wants_x and not hooks.share:
                handles.append(spec.module.register_forward_pre_hook(hooks.on_block_input(rec, identity)))
            handles.append(spec.module.register_forward_hook(hooks.on_block(rec, identity, wants_x)))
        yield result
    finally:
        hooks.previous.clear()
        for h in handles:
            h.remove()


class _Hooks:
    """The hooks of one capture: they act only in the thread that opened it (``owner``).

    ``copy`` keeps a tensor as it is (``_keep``) or copies it (``_copy``); with ``reduce`` the tensor is reduced
    at once instead and only the result kept. Without in-place modules a block's input is usually the previous
    block's output tensor, unchanged: it is shared (``share``). With them, something between two blocks may
    have written into it (an in-place ReLU on the previous output), so the input is taken as the block
    receives it, in a pre-hook.
    """

    def __init__(self, owner: int, copy: Callable[[torch.Tensor], torch.Tensor], parts: frozenset[str],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None, reached: set[str]) -> None:
        self.owner, self.copy, self.parts, self.reduce, self.reached = owner, copy, parts, reduce, reached
        self.share = copy is _keep
        self.previous: list = [None, None]  # [output tensor of the last recorded block, its record]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.reduce is None:
            return self.copy(t)
        out = self.reduce(t.detach())
        # a reduction that returns a view of its input (a slice, a reshape) would be written into later
        same = isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        return out.clone() if same else out

    def _set_input(self, rec: BlockRecord, value: torch.Tensor, identity: bool) -> None:
        if "x" in self.parts:
            rec.x = value
        if identity and "s" in self.parts:
            rec.s = value

    def on_branch(self, rec: BlockRecord | None, alpha: float | None):
        def hook(_module, _inputs, output):
            if threading.get_ident() != self.owner:
                return None
            if alpha is not None:
                output = torch.zeros_like(output) if alpha == 0 else output * alpha
            if rec is not None:
                rec.f = self.take(output)
            return None if alpha is None else output

        return hook

    def on_shortcut(self, rec: BlockRecord):
        def hook(_module, _inputs, output):
            if threading.get_ident() == self.owner:
                rec.s = self.take(output)

        return hook

    def on_block_input(self, rec: BlockRecord, identity: bool):
        def hook(_module, inputs):
            if threading.get_ident() == self.owner:
                self._set_input(rec, self.take(inputs[0]), identity)

        return hook

    def on_block(self, rec: BlockRecord, identity: bool, wants_x: bool):
        keep_y = "y" in self.parts

        def hook(_module, inputs, output):
            if threading.get_ident() != self.owner:
                return
            if wants_x and self.share:
                x = inputs[0]
                self._set_input(rec, self.previous[1] if x is self.previous[0] else self.take(x), identity)
            if keep_y:
                rec.y = self.take(output)
                self.previous[:] = [output, rec.y]
            self.reached.add(rec.name)

        return hook


def block_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Block name -> (shape of its input, shape of its output), per example (without the batch dimension),
    for input ``x``; one forward pass that keeps no activation (F(x) and s(x) have the output's shape)."""
    return activation_sizes(model, x)[0]


def activation_sizes(
    model: nn.Module, x: torch.Tensor
) -> tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...]]], int]:
    """:func:`block_shapes`, and the number of elements per example of the largest tensor any module outputs
    (a stem's convolution can be larger than every block), in one forward pass that keeps no activation."""
    owner = threading.get_ident()
    largest = [x[0].numel() if x.shape[0] else 0]

    def on_output(_module, _inputs, output):
        if threading.get_ident() == owner and isinstance(output, torch.Tensor) and output.ndim and output.shape[0]:
            largest[0] = max(largest[0], output[0].numel())

    handles = []
    try:
        handles = [m.register_forward_hook(on_output) for m in model.modules() if not next(m.children(), None)]
        with torch.inference_mode(), capture(model, keep=("x", "y"),
                                             reduce=lambda t: torch.tensor(t.shape[1:])) as cap:
            model(x)
    finally:
        for h in handles:
            h.remove()
    shapes = {r.name: (tuple(r.x.tolist()), tuple(r.y.tolist())) for r in cap.blocks}
    return shapes, largest[0]


def capture_forward(
    model: nn.Module,
    x: torch.Tensor,
    *,
    blocks: Iterable[str] | None = None,
    lesion: Iterable[str] = (),
    scale: Mapping[str, float] = MappingProxyType({}),
    keep: Iterable[str] = PARTS,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[BlockRecord]]:
    """One forward pass under ``torch.inference_mode`` with capture; returns (logits, records).
    ``keep`` and ``reduce`` as for :func:`capture`."""
    with torch.inference_mode(), capture(model, blocks=blocks, lesion=lesion, scale=scale, keep=keep,
                                         reduce=reduce) as cap:
        logits = model(x)
    return logits, cap.blocks
