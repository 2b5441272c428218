"""The residual network: a block with an observable branch and shortcut, and a ResNet built from a config.

A block computes ``y = relu(F(x) + s(x))``. ``F`` lives in the ``branch`` module and ``s`` in the
``shortcut`` module (``nn.Identity`` when shapes match, a 1x1 conv + BN projection when channels or
stride change), so a forward hook on either sees exactly F(x) or s(x). Nothing is computed in place:
a hook that keeps a reference to a tensor keeps the value it saw.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

__all__ = [
    "ConvBNReLU",
    "ResNet",
    "ResNetConfig",
    "ResidualBlock",
    "TUTORIAL_CONFIG",
    "build_model",
    "count_parameters",
]


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # The tutorial keeps PyTorch's default conv bias; so do we, so its checkpoints load unchanged.
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride)


class ConvBNReLU(nn.Sequential):
    """conv3x3 -> BN -> ReLU: the stem and the tutorial's between-stage transitions."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(
            OrderedDict(conv=conv3x3(c_in, c_out, stride), bn=nn.BatchNorm2d(c_out), relu=nn.ReLU())
        )


class ResidualBlock(nn.Module):
    """``y = relu(F(x) + s(x))`` with ``F = bn2 . conv2 . relu . bn1 . conv1``.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the first conv (and of the projection).
        name: display name (``res1`` ... in the tutorial's numbering).
        stage: 1-based stage index, for grouping in the UI.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, *, name: str = "", stage: int = 0) -> None:
        super().__init__()
        self.name = name
        self.stage = stage
        self.branch = nn.Sequential(
            OrderedDict(
                conv1=conv3x3(c_in, c_out, stride),
                bn1=nn.BatchNorm2d(c_out),
                relu=nn.ReLU(),
                conv2=conv3x3(c_out, c_out),
                bn2=nn.BatchNorm2d(c_out),
            )
        )
        # The parent's shapes decide the shortcut: identity keeps the tutorial's block, a projection
        # is needed only when the add would otherwise not type-check.
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(conv=conv1x1(c_in, c_out, stride), bn=nn.BatchNorm2d(c_out))
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.branch(x) + self.shortcut(x))


@dataclass(frozen=True)
class ResNetConfig:
    """Shape of a CIFAR-style ResNet.

    ``downsample="transition"`` is the tutorial's layout: between stages a separate conv3x3 stride-2
    + BN + ReLU changes the width, so every block keeps an identity shortcut.
    ``downsample="projection"`` is the He et al. layout: the first block of a stage strides and
    widens, with a 1x1 projection shortcut.
    """

    in_channels: int = 3
    num_classes: int = 10
    widths: tuple[int, ...] = (64, 128, 256)
    blocks: tuple[int, ...] = (3, 3, 3)
    downsample: Literal["transition", "projection"] = "transition"
    # Stride of the first stage; later stages always halve the resolution.
    first_stride: int = 1
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(f"widths {self.widths} and blocks {self.blocks} must be non-empty and of equal length")
        if self.downsample not in ("transition", "projection"):
            raise ValueError(f"downsample must be 'transition' or 'projection', got {self.downsample!r}")
        if min(self.blocks) < 1 or min(self.widths) < 1:
            raise ValueError("every stage needs at least one block of positive width")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"], d["blocks"] = list(self.widths), list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ResNetConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["widths"] = tuple(known.get("widths", cls.widths))
        known["blocks"] = tuple(known.get("blocks", cls.blocks))
        return cls(**known)


# The tutorial's Net: 3x32x32 in, 3 stages of 3 blocks at 64/128/256, 10 classes, 5,027,210 parameters.
TUTORIAL_CONFIG = ResNetConfig(name="tutorial")


class ResNet(nn.Module):
    """A ResNet built in a loop from a :class:`ResNetConfig`.

    ``forward_features`` returns the last block's feature map and ``forward_head`` pools and
    classifies any feature map of the head's width, which is what the per-block readout needs.
    """

    def __init__(self, config: ResNetConfig = TUTORIAL_CONFIG) -> None:
        super().__init__()
        self.config = config
        self.stem = ConvBNReLU(config.in_channels, config.widths[0])
        stages = []
        c_prev, k = config.widths[0], 0
        for s, (width, n) in enumerate(zip(config.widths, config.blocks)):
            stride = config.first_stride if s == 0 else 2
            blocks = OrderedDict()
            transition = None
            if config.downsample == "transition" and (stride != 1 or width != c_prev):
                transition = ConvBNReLU(c_prev, width, stride)
                c_prev, stride = width, 1
            for _ in range(n):
                k += 1
                blocks[f"res{k}"] = ResidualBlock(c_prev, width, stride, name=f"res{k}", stage=s + 1)
                c_prev, stride = width, 1
            stage = nn.Module()
            stage.transition = transition if transition is not None else nn.Identity()
            stage.blocks = nn.Sequential(blocks)
            stages.append(stage)
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_prev, config.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage.blocks(stage.transition(x))
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, C, H, W) -> (B, C) -> (B, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(config: ResNetConfig | dict = TUTORIAL_CONFIG) -> ResNet:
    if isinstance(config, dict):
        config = ResNetConfig.from_dict(config)
    return ResNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
