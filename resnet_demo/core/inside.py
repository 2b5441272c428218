"""Inside one residual block: every step of F(x), the shortcut and the sum, for one output channel.

What it computes, for block ``y = relu(F(x) + s(x))`` and a chosen output channel ``c``:

- the block's real layers, in the order its forward pass calls them (read from the model, never from a
  hard-coded list): name, kind, input and output shape, parameter count, and whether each is on the
  branch F, on the shortcut s, or after the sum. A 1x1 projection shortcut appears as its own layers;
  an identity shortcut has none (``Inside.shortcut == "identity"``);
- the map after every step. The steps after the branch's last convolution live in the block's output
  channel space and show channel ``c``: the last conv, its BN (= F), s, F + s before the ReLU, y. The
  steps before it (conv1, BN, ReLU; and conv2, BN, ReLU in a bottleneck) live in channel spaces of
  their own, so they show **the channel that feeds ``c`` most**, followed backward one conv at a time:
  the last conv's input channel whose contribution to ``c`` is largest (in sum of absolute value over
  positions), then the previous conv's input channel that feeds *that* channel most, down to the
  block's input x. Ranking every mid channel of every step would be 64 to 512 maps per step; one
  followed path is the answer to "where does this channel come from", and the full ranking is given
  once, where it is exact and readable: at the last conv;
- the ranked contributions of the last conv's input channels to channel ``c`` (its kernel's slice for
  each input channel convolved with that incoming map). They are a decomposition: their maps plus the
  conv's bias are the conv's output map for ``c``;
- how much each ReLU removed (share of units set to zero, share of the absolute mass cut), for the
  channel shown and for the whole layer;
- where y comes from: ``|F| / (|F| + |s|)`` per position, and one number for the sentence a learner
  reads, the shortcut's share of y over the positions y keeps (``y > 0``):
  ``sum |s| / (sum |F| + sum |s|)`` there;
- one position's numbers (:func:`unit`): F, s, F + s, y.

How it is computed (the choice, and why). The analysis already holds each block's input x (every
capture records it, for every supported model, on every path including the CUDA-graph replay). Opening
this view re-runs **only the chosen block** on that x, with thread-scoped hooks on its inner layers
(acting only for the calling thread, like :mod:`.capture`'s, and removed in ``finally``). That is:

- exact: the same module, on the same input and device, computes the same tensors the analysis's pass
  computed (tests check F and y against the captured ones to 1e-6);
- cheap: one block, not the network. Measured on 2 CPU threads (``torch.set_num_threads(2)``, median of
  20, interleaved with a bare forward pass of the same model so both saw the same load, on a machine
  shared with other jobs, over three runs): 0.2 to 0.45 of a bare forward on the tutorial's Net (res9 to
  res1), 0.11 to 0.25 on ResNet-50 at 224 (layer4.2 to layer1.0). And nothing at all for visitors who
  never open the view: the analysis's capture is not touched, so the CUDA-graph replay and the
  per-request cost stay as they are;
- general: the hooks observe the block's own forward, so the step list is whatever the block calls
  (5 layers in the tutorial's block and in torchvision's BasicBlock, 8 in a Bottleneck, the projection
  when there is one), and torchvision's in-place ReLU and ``out += identity`` cannot corrupt a step
  (every output is copied as it is made; an input is the previous layer's copy only while its version
  counter says nothing wrote into it since, else it is copied in a pre-hook).

Supported: blocks whose branch is a chain of convolutions, batch norms and ReLUs, with a ReLU after the
sum: the project's :class:`~resnet_demo.core.model.ResidualBlock`, torchvision's ``BasicBlock`` and
``Bottleneck``, timm's ResNet blocks (resnet*, the ``d``/``t`` variants with their avg-pool shortcut,
``drop_path``) and transformers' ``ResNetBasicLayer`` / ``ResNetBottleNeckLayer``. Anything else raises
:class:`UnsupportedBlockError` saying why: another block type, a pre-activation block (timm's ResNetV2,
nothing after the sum), or a branch with more than that chain (timm's SE and ECA attention).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import FAMILIES, ProjectBlocks, TimmBlocks, TorchvisionBlocks, TransformersBlocks
from .capture import BlockSpec
from .model import ResidualBlock

__all__ = [
    "Contribution",
    "Inside",
    "Layer",
    "ReluCut",
    "Step",
    "Unit",
    "UnsupportedBlockError",
    "look_inside",
    "unit",
]

# Leaves the branch may hold: convolutions change the channel space, the rest act channel by channel.
_CHANNELWISE = (nn.BatchNorm2d, nn.ReLU, nn.Identity)


class UnsupportedBlockError(ValueError):
    """The block is not one whose inner steps this module can read."""


@dataclass(frozen=True)
class Layer:
    """One call of one of the block's layers (torchvision calls one ReLU module two or three times).

    ``path`` is ``"F"`` (the residual branch), ``"shortcut"`` (the projection) or ``"out"`` (after the sum).
    Shapes are (C, H, W). ``params`` counts the module's parameters (0 for a second call of a module).
    ``name`` is the layer's path in the block; ``label`` its short name (the steps' labels are the same).
    """

    name: str
    type: str
    kind: str
    path: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    call: int = 1
    label: str = ""


@dataclass(frozen=True)
class Step:
    """The map after one step, for one channel of that step's channel space.

    ``space`` names the channel space: ``"x"`` (the block's input), a conv's name for the steps from that
    conv up to the next one, and ``"out"`` for the block's output space (the last conv onwards, s, F+s, y).
    ``comparable`` marks the maps that add up to y (F, s, F+s, y): they share one colour scale.
    """

    label: str
    layer: str | None
    path: str
    space: str
    channel: int
    map: np.ndarray
    comparable: bool = False


@dataclass(frozen=True)
class Contribution:
    """One input channel of the last conv, as a contribution to the chosen output channel.

    ``total`` is the signed sum of its contribution map over positions, ``magnitude`` the sum of its
    absolute value, ``share`` its magnitude over all channels' magnitudes.
    """

    channel: int
    total: float
    magnitude: float
    share: float


@dataclass(frozen=True)
class ReluCut:
    """What one ReLU call removed: for the channel shown (``channel``) and over its whole layer (``_all``).

    ``zeroed`` is the share of units it set to zero (they were negative), ``removed`` the share of the
    absolute mass it cut (sum of the negative parts' magnitude over the sum of all magnitudes).
    """

    layer: str
    path: str
    channel: int
    zeroed: float
    removed: float
    zeroed_all: float
    removed_all: float


@dataclass(frozen=True)
class Unit:
    """One position of the chosen channel: its sum, ``y = relu(f + s)``; ``f_share = |f| / (|f| + |s|)``."""

    block: str
    channel: int
    row: int
    col: int
    f: float
    s: float
    pre: float
    y: float
    f_share: float


@dataclass
class Inside:
    """One block, one output channel, one image: see the module's docstring for what each part means.

    ``steps`` run from x to y; :attr:`f_step` (the branch's last BN) is F(x). ``contributions`` rank the input
    channels of ``last_conv`` (named inside the block); ``contribution_maps`` holds their maps in float64 by
    input-channel index (within the conv's group), and with ``bias`` they add up to ``conv_out``. ``f_share``
    is 0.5 where F and s are both zero; ``shortcut_share`` is ``None`` where y is zero everywhere. ``scale``
    is the largest |value| of the maps that add up to y (F, s, F+s, y), for one colour scale.
    """

    block: str
    block_type: str
    family: str
    channel: int
    channels: int
    shortcut: str
    layers: list[Layer]
    steps: list[Step]
    last_conv: str
    conv_out: np.ndarray
    bias: float
    contributions: list[Contribution]
    contribution_maps: np.ndarray = field(repr=False)
    relus: list[ReluCut] = field(default_factory=list)
    f_share: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32), repr=False)
    shortcut_share: float | None = None
    scale: float = 0.0

    def step(self, label: str) -> Step:
        """The step called ``label``: a layer's (``"conv1"``, ``"bn2"``), ``"x"``, ``"s(x)"``, ``"F(x)+s(x)"``,
        ``"y"``."""
        for s in self.steps:
            if s.label == label:
                return s
        raise KeyError(f"no step {label!r}; the steps are {[s.label for s in self.steps]}")

    @property
    def f_step(self) -> Step:
        """The branch's last step (the last BN): its map is F(x)."""
        return [s for s in self.steps if s.path == "F"][-1]

    @property
    def f(self) -> np.ndarray:
        return self.f_step.map

    @property
    def s(self) -> np.ndarray:
        return self.step("s(x)").map

    @property
    def pre(self) -> np.ndarray:
        return self.step("F(x)+s(x)").map

    @property
    def y(self) -> np.ndarray:
        return self.step("y").map

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def to_dict(self, *, maps: bool = False, top: int = 10) -> dict:
        """The numbers as plain JSON-able values (the API and the export); maps only when asked for."""
        d = {
            "block": self.block, "block_type": self.block_type, "family": self.family, "channel": self.channel,
            "channels": self.channels, "shortcut": self.shortcut, "params": self.params,
            "layers": [{"name": la.name, "type": la.type, "kind": la.kind, "path": la.path,
                        "in_shape": list(la.in_shape), "out_shape": list(la.out_shape), "params": la.params,
                        "call": la.call, "label": la.label} for la in self.layers],
            "steps": [{"label": s.label, "layer": s.layer, "path": s.path, "space": s.space,
                       "channel": s.channel, "min": float(s.map.min()), "max": float(s.map.max()),
                       **({"map": s.map.tolist()} if maps else {})} for s in self.steps],
            "last_conv": self.last_conv, "bias": self.bias,
            "contributions": [asdict(c) for c in self.contributions[:top]],
            "relus": [asdict(r) for r in self.relus],
            "shortcut_share": self.shortcut_share,
            "mean_f_share": float(self.f_share.mean()),
        }
        if maps:
            d["f_share"] = self.f_share.tolist()
        return d


# --- the block's layout ------------------------------------------------------------------------------


# Families whose blocks this module reads: the branch a chain of convolutions, batch norms and ReLUs, then the
# sum, then a ReLU. timm's ResNetV2 is left out: pre-activation (no ReLU after the sum, s(x) of norm1(x)), and
# its norms carry their activation inside (BatchNormAct2d), so a layer's own output is not observable.
_READABLE = (ProjectBlocks, TorchvisionBlocks, TimmBlocks, TransformersBlocks)


def _check_supported(spec: BlockSpec) -> str:
    """The block's family (``"torchvision ResNet"``), or :class:`UnsupportedBlockError`."""
    if getattr(spec, "activation", "relu") != "relu":
        raise UnsupportedBlockError(
            f"cannot look inside block {spec.name!r}: it is a pre-activation block (y = F(x) + s(x), no ReLU "
            f"after the sum), and the inside view reads blocks with a ReLU after the sum"
        )
    families = [f for f in FAMILIES if isinstance(f, _READABLE)]
    family = next((f for f in families if isinstance(spec.module, f.classes())), None)
    if family is None:
        raise UnsupportedBlockError(
            f"cannot look inside block {spec.name!r}: it is a {type(spec.module).__name__}, and the inside view "
            f"reads only the blocks of {', '.join(f.label for f in families)}"
        )
    return family.label


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_modules(prefix=prefix):
        if next(child.children(), None) is None:
            yield name, child


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        k = "×".join(str(v) for v in m.kernel_size)
        extra = [f"stride {m.stride[0]}"] if max(m.stride) > 1 else []
        extra += [f"{m.groups} groups"] if m.groups > 1 else []
        extra += ["no bias"] if m.bias is None else []
        return f"conv {k}, {m.in_channels}→{m.out_channels}" + "".join(f", {e}" for e in extra)
    if isinstance(m, nn.BatchNorm2d):
        return f"batch norm, {m.num_features} channels"
    if isinstance(m, nn.ReLU):
        return "ReLU"
    return type(m).__name__


# --- the run: the block's own forward pass, with thread-scoped hooks on its inner layers --------------------


@dataclass
class _Call:
    name: str
    module: nn.Module
    shortcut: bool
    in_shape: tuple[int, ...]
    chained: bool  # its input is the previous layer's output (or, for the first, the block's input)
    input: torch.Tensor | None = None  # kept for convolutions (their contributions) and ReLUs (their cut)
    output: torch.Tensor | None = None
    after_f: bool = False
    label: str = ""


@dataclass
class _Run:
    calls: list[_Call] = field(default_factory=list)
    f: torch.Tensor | None = None
    s: torch.Tensor | None = None
    y: torch.Tensor | None = None

    @property
    def branch(self) -> list[_Call]:
        return [c for c in self.calls if not c.shortcut and not c.after_f]


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy that nothing else holds (one copy, not two, from another device or dtype)."""
    t = t.detach()
    return t.float().cpu() if t.device.type != "cpu" or t.dtype != torch.float32 else t.clone()


def _keep(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself, as float32 on the CPU: for the project's block, which never writes in place."""
    return t.detach().float().cpu()


def _writes_in_place(block: nn.Module) -> bool:
    """Whether ``block`` may write into a tensor it made: anything but the project's own block (torchvision's add
    the shortcut in place, ``out += identity``, outside any module), or one holding an in-place module."""
    if type(block) is not ResidualBlock:
        return True
    return any(m.__dict__.get("inplace", getattr(type(m), "inplace", False)) is True for m in block.modules())


class _Recorder:
    """The hooks of one run, acting only in the thread that opened it (``owner``).

    Every layer's output is copied as it is made (``copy``), before an in-place ReLU or ``out += identity`` can
    write into it. A layer's input is the previous layer's copy when it is that very tensor, unwritten since
    (its version counter unchanged); else it is copied too. A layer that hands back its input untouched
    (timm's ``DropPath`` in eval mode) is no step and is left out.
    """

    def __init__(self, spec: BlockSpec, x: torch.Tensor) -> None:
        self.owner, self.run = threading.get_ident(), _Run()
        self.copy = _copy if _writes_in_place(spec.module) else _keep
        self.shortcut_ids = {id(m) for m in spec.shortcut.modules()} if spec.shortcut is not None else set()
        self.f_done = False
        self.pending: dict[int, tuple[_Call, torch.Tensor, int]] = {}
        self.last: tuple[torch.Tensor, int, _Call | None] = (x, x._version, None)  # raw output, version, call

    def pre(self, name: str, module: nn.Module):
        def hook(_m, inputs):
            if threading.get_ident() != self.owner:
                return
            x, (raw, version, previous) = inputs[0], self.last
            shortcut = id(module) in self.shortcut_ids
            fresh = x is raw and x._version == version
            kept = None
            if isinstance(module, (nn.Conv2d, nn.ReLU)) and not shortcut:
                kept = previous.output if fresh and previous is not None else self.copy(x)
            call = _Call(name, module, shortcut, tuple(x.shape[1:]), fresh, kept)
            self.pending[id(module)] = (call, x, x._version)

        return hook

    def post(self, module: nn.Module):
        def hook(_m, _inputs, output):
            if threading.get_ident() != self.owner:
                return
            call, x, version = self.pending.pop(id(module))
            if output is x and x._version == version and not isinstance(module, nn.ReLU):
                return  # handed its input back untouched: no step
            call.output, call.after_f = self.copy(output), self.f_done and not call.shortcut
            self.run.calls.append(call)
            self.last = (output, output._version, call)

        return hook

    def on(self, what: str):
        def hook(_m, _inputs, output):
            if threading.get_ident() == self.owner:
                setattr(self.run, what, self.copy(output))
                self.f_done = self.f_done or what == "f"

        return hook


@contextmanager
def _hooked(spec: BlockSpec, x: torch.Tensor) -> Iterator[_Run]:
    """Hooks on every leaf of the block, on its branch end, shortcut and itself, for this thread only; removed
    when the context closes, also when the forward pass raised."""
    rec = _Recorder(spec, x)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for name, leaf in _leaves(spec.module):
            if isinstance(leaf, nn.Identity):  # an identity shortcut, an unused slot: no layer, no step
                continue
            handles.append(leaf.register_forward_pre_hook(rec.pre(name, leaf)))
            handles.append(leaf.register_forward_hook(rec.post(leaf)))
        # registered after the leaves' hooks: a leaf that is the branch end records its call first
        handles.append(spec.branch_end.register_forward_hook(rec.on("f")))
        if spec.shortcut is not None:
            handles.append(spec.shortcut.register_forward_hook(rec.on("s")))
        handles.append(spec.module.register_forward_hook(rec.on("y")))
        yield rec.run
    finally:
        rec.pending.clear()
        rec.last = (None, 0, None)
        for h in handles:
            h.remove()


def _label(calls: list[_Call]) -> None:
    """Each call's label: its layer's own name (``conv1``, ``relu``), or, where two layers of the branch share one
    (transformers' ``layer.0.convolution``, ``layer.1.convolution``), its path below what they all share."""
    names = [c.name.split(".") for c in calls]
    common = 0
    while names and all(len(n) > common + 1 and n[common] == names[0][common] for n in names):
        common += 1
    by_last: dict[str, set[int]] = {}
    for c in calls:
        by_last.setdefault(c.name.split(".")[-1], set()).add(id(c.module))
    for c, parts in zip(calls, names):
        c.label = parts[-1] if len(by_last[parts[-1]]) == 1 else ".".join(parts[common:])


def _plane(t: torch.Tensor, channel: int) -> np.ndarray:
    """One channel's (H, W) map of a (1, C, H, W) tensor, as an array of its own: a view would keep the
    block's whole activation alive as long as the result lives."""
    return t[0, channel].detach().float().cpu().numpy().copy()


def _layers(calls: list[_Call]) -> list[Layer]:
    seen: dict[int, int] = {}
    layers = []
    for c in calls:
        n = seen[id(c.module)] = seen.get(id(c.module), 0) + 1
        path = "shortcut" if c.shortcut else "out" if c.after_f else "F"
        params = sum(p.numel() for p in c.module.parameters()) if n == 1 else 0
        layers.append(Layer(c.name, type(c.module).__name__, _kind(c.module), path, c.in_shape,
                            tuple(c.output.shape[1:]), params, n, c.label))
    return layers


# --- contributions through a conv ------------------------------------------------------------------------


def _contributions(
    conv: nn.Conv2d, inp: torch.Tensor, channel: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each input channel's contribution map to ``channel`` of ``conv``'s output, (C_in/groups, H, W) in
    ``dtype``, and the input channels they belong to; with the bias they sum to the conv's output map.

    Computed as the conv's patches (``unfold``) times the kernel's slice for that output channel, summed
    over the kernel's positions only, not over the channels (a float64 depthwise conv is ten times slower).
    """
    per_group_in = conv.in_channels // conv.groups
    group = channel // (conv.out_channels // conv.groups)
    ids = torch.arange(group * per_group_in, (group + 1) * per_group_in)
    x = inp[:1, ids].to(dtype)
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = (0, 0)
    elif isinstance(padding, str):  # "valid" or "same", as nn.Conv2d computes them
        total = [d * (k - 1) if padding == "same" else 0 for d, k in zip(conv.dilation, conv.kernel_size)]
        x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        padding = (0, 0)
    kh, kw = conv.kernel_size
    h = (x.shape[2] + 2 * padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
    patches = F.unfold(x, (kh, kw), dilation=conv.dilation, padding=padding, stride=conv.stride)
    weight = conv.weight.detach()[channel].to("cpu", dtype).reshape(per_group_in, kh * kw, 1)
    maps = (patches.view(per_group_in, kh * kw, h * w) * weight).sum(dim=1)
    return maps.view(per_group_in, h, w), ids


def _strongest(maps: torch.Tensor, ids: torch.Tensor) -> int:
    return int(ids[int(maps.abs().sum(dim=(1, 2)).argmax())])


# --- the result --------------------------------------------------------------------------------------


def _relu_cut(call: _Call, channel: int, path: str) -> ReluCut:
    t = call.input[0]
    cut = t.clamp(max=0)  # what the ReLU removes: its input's negative part

    def shares(t: torch.Tensor, cut: torch.Tensor) -> tuple[float, float]:
        negative = -float(cut.sum())
        total = float(t.sum()) + 2 * negative  # sum |t| = sum t - 2 sum(negative part)
        return int(torch.count_nonzero(cut)) / t.numel(), (negative / total if total else 0.0)

    one, every = shares(t[channel], cut[channel]), shares(t, cut)
    return ReluCut(call.name, path, channel, *one, *every)


def _branch_steps(run: _Run, x: torch.Tensor, channel: int, last: int) -> tuple[list[Step], list[ReluCut], dict]:
    """The F steps, each for the channel followed backward from ``channel``; the last conv's decomposition."""
    branch = run.branch
    steps: list[Step] = []
    relus: list[ReluCut] = []
    follow, decomposition = channel, {}
    space = "out"
    for i in range(len(branch) - 1, -1, -1):
        c = branch[i]
        steps.append(Step(c.label, c.name, "F", space, follow, _plane(c.output, follow)))
        if isinstance(c.module, nn.ReLU):
            relus.append(_relu_cut(c, follow, "F"))
        if isinstance(c.module, nn.Conv2d):
            # float64 where the decomposition is shown and must add up; float32 to follow the path further back
            maps, ids = _contributions(c.module, c.input, follow, torch.float64 if i == last else torch.float32)
            if i == last:
                decomposition = {"maps": maps, "ids": ids, "conv": c, "channel": follow}
            follow = _strongest(maps, ids)
            space = _space_before(branch, i)
    steps.append(Step("x", None, "x", "x", follow, _plane(x, follow)))
    return steps[::-1], relus[::-1], decomposition


def _space_before(branch: list[_Call], i: int) -> str:
    earlier = [c.label for c in branch[:i] if isinstance(c.module, nn.Conv2d)]
    return earlier[-1] if earlier else "x"


def _check_branch(spec: BlockSpec, run: _Run) -> int:
    """The index of the branch's last conv among the F calls; :class:`UnsupportedBlockError` when the branch is not
    a chain of convolutions, batch norms and ReLUs (an attention module, say, whose input is a pooled map)."""
    branch = run.branch
    odd = list(dict.fromkeys(c.name for c in branch if not c.chained or not isinstance(c.module, (nn.Conv2d,
                                                                                                  *_CHANNELWISE))))
    convs = [i for i, c in enumerate(branch) if isinstance(c.module, nn.Conv2d)]
    if odd or not convs or run.f is None or run.y is None:
        raise UnsupportedBlockError(
            f"cannot look inside block {spec.name!r}: its branch must be a chain of convolutions, batch norms and "
            f"ReLUs" + (f", and {', '.join(odd)} {'is' if len(odd) == 1 else 'are'} not" if odd else "")
        )
    return convs[-1]


@torch.no_grad()
def look_inside(spec: BlockSpec, x: torch.Tensor, channel: int) -> Inside:
    """Run ``spec``'s block on ``x`` (its input, (1, C, H, W), on the model's device) and read every step for
    output ``channel``.

    Raises:
        UnsupportedBlockError: a block this module cannot read (the message says why and which it can).
        IndexError: ``channel`` is not one of the block's output channels.
        RuntimeError: the block's forward pass failed (``x`` of the wrong shape); no hook is left behind.
    """
    family = _check_supported(spec)
    # not in inference mode, even inside a caller's: tensors then keep the version counter that tells a layer
    # output written in place since it was copied; and nothing may write into the analysis's own tensor
    with torch.inference_mode(False):
        x = x[:1].detach().clone()
        with _hooked(spec, x) as run:
            spec.module(x)
    channels = run.y.shape[1]
    if not 0 <= channel < channels:
        raise IndexError(f"block {spec.name} has {channels} output channels (0 to {channels - 1}); got {channel}")
    last = _check_branch(spec, run)
    _label(run.branch)
    _label([c for c in run.calls if c.shortcut or c.after_f])
    s = run.s if spec.shortcut is not None else _copy(x)
    steps, relus, dec = _branch_steps(run, x, channel, last)
    f, s_c = _plane(run.f, channel), _plane(s, channel)
    pre = f + s_c  # the block's own add: the same float32 operands give the same bits
    last_step = steps[-1]  # the branch's end: its map is F(x) for this channel
    steps[-1] = Step(last_step.label, last_step.layer, "F", "out", channel, f, True)
    steps += [Step("s(x)", None, "shortcut", "out", channel, s_c, True),
              Step("F(x)+s(x)", None, "sum", "out", channel, pre, True),
              Step("y", None, "out", "out", channel, _plane(run.y, channel), True)]
    after = [c for c in run.calls if c.after_f and isinstance(c.module, nn.ReLU)]
    relus += [_relu_cut(c, channel, "out") for c in after]
    return _result(spec, family, channel, channels, run, steps, relus, dec)


def _result(spec: BlockSpec, family: str, channel: int, channels: int, run: _Run, steps: list[Step],
            relus: list[ReluCut], dec: dict) -> Inside:
    maps, ids, conv = dec["maps"], dec["ids"], dec["conv"]
    mags = maps.abs().sum(dim=(1, 2))
    totals = maps.sum(dim=(1, 2))
    whole = float(mags.sum()) or 1.0
    order = torch.argsort(mags, descending=True, stable=True)
    contributions = [Contribution(int(ids[k]), float(totals[k]), float(mags[k]), float(mags[k]) / whole)
                     for k in order.tolist()]
    bias = float(conv.module.bias.detach()[dec["channel"]]) if conv.module.bias is not None else 0.0
    f, s, y = (next(st.map for st in steps[::-1] if st.path == path) for path in ("F", "shortcut", "out"))
    af, as_ = np.abs(f.astype(np.float64)), np.abs(s.astype(np.float64))
    denom = af + as_
    f_share = np.where(denom > 0, af / np.where(denom > 0, denom, 1), 0.5).astype(np.float32)
    kept = y > 0
    sum_f, sum_s = af[kept].sum(), as_[kept].sum()
    shortcut_share = float(sum_s / (sum_f + sum_s)) if kept.any() and sum_f + sum_s > 0 else None
    scale = max(float(np.abs(st.map).max()) for st in steps if st.comparable)
    return Inside(
        block=spec.name, block_type=type(spec.module).__name__, family=family, channel=channel, channels=channels,
        shortcut="identity" if spec.shortcut is None else "projection", layers=_layers(run.calls), steps=steps,
        last_conv=conv.name, conv_out=_plane(conv.output, dec["channel"]), bias=bias,
        contributions=contributions, contribution_maps=maps.numpy(), relus=relus, f_share=f_share,
        shortcut_share=shortcut_share, scale=scale,
    )


def unit(inside: Inside, row: int, col: int) -> Unit:
    """The numbers of one position of the chosen channel: F, s, F + s, y and F's share.

    Raises:
        IndexError: (row, col) outside the block's output map.
    """
    h, w = inside.y.shape
    if not (0 <= row < h and 0 <= col < w):
        raise IndexError(f"position ({row}, {col}) is outside block {inside.block}'s {h}×{w} output map")
    return Unit(inside.block, inside.channel, row, col, float(inside.f[row, col]), float(inside.s[row, col]),
                float(inside.pre[row, col]), float(inside.y[row, col]), float(inside.f_share[row, col]))
