"""Which modules are residual blocks, and where each block's F(x) and s(x) are, for every supported library.

A block computes ``y = act(F(x) + s(x))``. For each library one small :class:`BlockFamily` says, for a module
of its block classes, which submodule's output is exactly F(x) (``branch_end``: the tensor the block adds the
shortcut to), which module's output is s(x) (``shortcut``; ``None`` when s(x) is x itself), the stage the
block belongs to (read from its path), and whether an activation follows the sum:

- this project's :class:`~.model.ResidualBlock`: ``branch`` and ``shortcut``;
- torchvision's ``BasicBlock`` / ``Bottleneck`` (and so the CIFAR-repo layout, built from them): the last BN
  and ``downsample``;
- timm's ``BasicBlock`` / ``Bottleneck`` (resnet*, resnet*d/t/s, seresnet*, ecaresnet*, resnext*,
  wide_resnet*, resnetrs*): the last of ``drop_path``, ``se`` (attention sits inside F) and the last BN that
  exists as a module, and ``downsample`` (a conv + BN, or an avg-pool, conv and BN for the ``d``/``t`` variants);
- timm's ``resnetv2`` blocks ``PreActBasic`` / ``PreActBottleneck`` (no activation after the sum) and its
  post-activation ``Bottleneck``: ``drop_path`` (always a module there) and ``downsample``;
- Hugging Face transformers' ``ResNetBasicLayer`` / ``ResNetBottleNeckLayer``: ``layer`` and ``shortcut``.

Classes of a library are looked up in ``sys.modules``: a model of a library cannot exist before the library is
imported, so nothing is imported here just to check (torchvision, timm and transformers each take seconds).

Pre-activation blocks (timm ``resnetv2_*``) compute ``y = s(x) + F(x)`` with nothing after the sum: the
block's output is the residual stream itself, and the last ``norm`` before the head activates it. Their
metrics read accordingly. ``ratio`` ‖F‖/‖s‖ is the size of the block's update relative to the stream it
updates (the measure Jastrzębski et al. 2018 defined on such networks), and ``cosine`` < 0 means the block
erases part of the stream, directly rather than through a ReLU. ``norm_y`` is the stream's norm, which
typically grows block after block within a stage. ``active`` (the share of y > 0) counts the signs of a
signed sum, not units a ReLU let through: around one half is normal, where a post-activation block's
share can be anything from 0 to 1. A lesion leaves ``y = s(x)`` exactly (no ReLU). Where such a block
downsamples, s(x) is the projection of the *pre-activated* input ``norm1(x)``, not of x.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .model import ResidualBlock

__all__ = ["FAMILIES", "BlockFamily", "BlockParts", "BlockTypes", "find_residual_blocks"]


@dataclass(frozen=True)
class BlockParts:
    """Where one block's parts are.

    Attributes:
        name: the block's display name (its path in the model, or the project's ``res<k>``).
        stage: 1-based stage the block belongs to (0 when the path does not say).
        branch_end: the module whose output is exactly F(x).
        shortcut: the module whose output is exactly s(x); ``None`` when s(x) is the block's input.
        activation: the activation applied after the sum (``"relu"``), ``None`` for a pre-activation block.
        family: the library's block family, e.g. ``"timm ResNet"``.
    """

    name: str
    stage: int
    branch_end: nn.Module
    shortcut: nn.Module | None
    activation: str | None
    family: str


def _stage(pattern: re.Pattern[str], path: str, offset: int) -> int:
    match = pattern.search(path)
    return int(match.group(1)) + offset if match else 0


def _last(module: nn.Module, *names: str) -> nn.Module:
    """The last of ``names`` that is a submodule of ``module`` (a ``None`` attribute is skipped)."""
    for name in reversed(names):
        found = getattr(module, name, None)
        if isinstance(found, nn.Module):
            return found
    raise ValueError(f"{type(module).__name__} has none of {names}")


class BlockFamily:
    """One library's residual blocks: where their classes live and where F(x) and s(x) are.

    A subclass sets ``label`` (for messages), ``module`` (the module of ``sys.modules`` its classes are in,
    ``""`` for this project) and ``class_names``, and implements :meth:`parts`.
    """

    label = ""
    module = ""
    class_names: tuple[str, ...] = ()

    def classes(self) -> tuple[type, ...]:
        """The block classes, if their library is loaded in this process; else ``()``."""
        loaded = sys.modules.get(self.module)
        if loaded is None:
            return ()
        return tuple(c for n in self.class_names if isinstance(c := getattr(loaded, n, None), type))

    def parts(self, path: str, block: nn.Module) -> BlockParts:
        """Where ``block``'s F(x) and s(x) are; ``path`` is its name in the model (``layer1.0``)."""
        raise NotImplementedError


class ProjectBlocks(BlockFamily):
    label = "this project's ResNet"

    def classes(self) -> tuple[type, ...]:
        return (ResidualBlock,)

    def parts(self, path: str, block: nn.Module) -> BlockParts:
        shortcut = None if isinstance(block.shortcut, nn.Identity) else block.shortcut
        return BlockParts(block.name or path, block.stage, block.branch, shortcut, "relu", self.label)


_LAYER = re.compile(r"(?:^|\.)layer(\d+)\.\d+$")  # torchvision's and timm's ResNet: layer<stage>.<index>


class TorchvisionBlocks(BlockFamily):
    label = "torchvision ResNet"
    module = "torchvision.models.resnet"
    class_names = ("BasicBlock", "Bottleneck")

    def parts(self, path: str, block: nn.Module) -> BlockParts:
        # forward: out = bn2(...) (bn3 in a Bottleneck); out += downsample(x) or x; relu(out)
        return BlockParts(path, _stage(_LAYER, path, 0), _last(block, "bn2", "bn3"), block.downsample, "relu",
                          self.label)


class TimmBlocks(BlockFamily):
    label = "timm ResNet"
    module = "timm.models.resnet"
    class_names = ("BasicBlock", "Bottleneck")

    def parts(self, path: str, block: nn.Module) -> BlockParts:
        # forward: x = bn2/bn3(...); x = se(x) if se; x = drop_path(x) if drop_path; x += downsample(shortcut)
        end = _last(block, "bn2", "bn3", "se", "drop_path")
        return BlockParts(path, _stage(_LAYER, path, 0), end, block.downsample, "relu", self.label)


_V2_STAGE = re.compile(r"(?:^|\.)stages\.(\d+)\.blocks\.\d+$")


class TimmV2Blocks(BlockFamily):
    label = "timm ResNetV2"
    module = "timm.models.resnetv2"
    class_names = ("PreActBasic", "PreActBottleneck", "Bottleneck")

    def parts(self, path: str, block: nn.Module) -> BlockParts:
        # pre-activation: x_pre = norm1(x); s = downsample(x_pre) or x; return drop_path(conv(...)) + s
        # Bottleneck: s = downsample(x) or x; return act3(drop_path(norm3(...)) + s)
        preact = type(block).__name__.startswith("PreAct")
        return BlockParts(path, _stage(_V2_STAGE, path, 1), block.drop_path, block.downsample,
                          None if preact else "relu", self.label)


_HF_STAGE = re.compile(r"(?:^|\.)stages\.(\d+)\.layers\.\d+$")


class TransformersBlocks(BlockFamily):
    label = "transformers ResNet"
    module = "transformers.models.resnet.modeling_resnet"
    class_names = ("ResNetBasicLayer", "ResNetBottleNeckLayer")

    def parts(self, path: str, block: nn.Module) -> BlockParts:
        # forward: h = layer(x); h += shortcut(x); activation(h)
        shortcut = None if isinstance(block.shortcut, nn.Identity) else block.shortcut
        act = type(block.activation).__name__.lower().removesuffix("activation") or "activation"
        return BlockParts(path, _stage(_HF_STAGE, path, 1), block.layer, shortcut, act, self.label)


FAMILIES: tuple[BlockFamily, ...] = (ProjectBlocks(), TorchvisionBlocks(), TimmBlocks(), TimmV2Blocks(),
                                     TransformersBlocks())


class BlockTypes:
    """The block classes of every library loaded in this process, looked up once (one per family).

    A capture makes one at the start and asks it about every module of the model.
    """

    def __init__(self) -> None:
        self.by_type = {cls: family for family in FAMILIES for cls in family.classes()}
        self.classes = tuple(self.by_type)

    def parts_of(self, path: str, module: nn.Module) -> BlockParts | None:
        """``module``'s :class:`BlockParts` if it is a residual block (a subclass of a block class counts), else
        ``None``; ``path`` is its name in the model."""
        family = self.by_type.get(type(module))
        if family is None:
            if not isinstance(module, self.classes):
                return None
            family = next(f for cls, f in self.by_type.items() if isinstance(module, cls))
        return family.parts(path, module)


def find_residual_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, BlockParts]]:
    """``(path, block, parts)`` for every residual block of ``model``, in ``named_modules()`` order.

    Args:
        model: any module; blocks of libraries that are not loaded cannot be in it.
    """
    types = BlockTypes()
    for path, module in model.named_modules():
        parts = types.parts_of(path, module)
        if parts is not None:
            yield path, module, parts
