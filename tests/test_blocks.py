"""core.blocks: for every library's blocks, F(x) + s(x) (then the activation) is the block's output exactly.

Each model is built by its own library with random weights and BN statistics; the test's own hooks take the
block's input and output as the library computes them, and the parts blocks.py names give F(x) and s(x).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PROJ, randomise_bn
from torch import nn

from resnet_demo.core.blocks import BlockTypes, find_residual_blocks
from resnet_demo.core.model import build_model

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()  # the block adds into F(x) in place afterwards


def recorded_parts(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """Per block: its parts and the tensors x, F, s, y as the library computed them in one forward pass."""
    found = list(find_residual_blocks(model))
    rows, handles = [], []
    for _path, block, parts in found:
        row = {"parts": parts, "block": block}
        rows.append(row)
        handles.append(block.register_forward_pre_hook(lambda m, i, row=row: row.__setitem__("x", _clone(i[0]))))
        handles.append(block.register_forward_hook(lambda m, i, o, row=row: row.__setitem__("y", _clone(o))))
        handles.append(parts.branch_end.register_forward_hook(
            lambda m, i, o, row=row: row.__setitem__("f", _clone(o))))
        if parts.shortcut is not None:
            handles.append(parts.shortcut.register_forward_hook(
                lambda m, i, o, row=row: row.__setitem__("s", _clone(o))))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    for row in rows:
        row.setdefault("s", row["x"])
    return rows


def assert_recombines(rows: list[dict]) -> None:
    for row in rows:
        total = row["f"] + row["s"]
        expected = total if row["parts"].activation is None else torch.relu(total)
        assert torch.equal(expected, row["y"]), row["parts"].name
        assert not torch.equal(row["f"], row["y"])  # F(x) is the branch, not the block's output


def timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(timm.create_model(name, pretrained=False, num_classes=7, **kwargs))


IMAGE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("name", "kwargs", "n_blocks", "end"),
    [
        ("resnet10t", {}, 4, "BatchNorm2d"),  # tiered stem, avg-pool shortcut
        ("resnet14t", {"drop_path_rate": 0.1}, 4, "DropPath"),  # Bottleneck, drop_path ends F
        ("seresnet18", {}, 8, "SEModule"),  # attention inside F
        ("ecaresnet26t", {}, 8, "EcaModule"),
        ("resnext26ts", None, 0, ""),  # a timm ByobNet, not a ResNet of blocks.py: no blocks
    ],
)
def test_timm_resnet_blocks_recombine(name, kwargs, n_blocks, end):
    model = timm_model(name, **(kwargs or {}))
    rows = recorded_parts(model, IMAGE)
    assert len(rows) == n_blocks
    if not rows:
        return
    assert type(rows[-1]["parts"].branch_end).__name__ == end  # drop_path's rate grows from 0 at the first block
    assert [r["parts"].stage for r in rows] == sorted(r["parts"].stage for r in rows)
    assert rows[0]["parts"].stage == 1 and rows[-1]["parts"].stage == 4
    assert {r["parts"].family for r in rows} == {"timm ResNet"}
    assert_recombines(rows)
    # the first block of stage 2 downsamples through an avg-pool (the t variants) or a strided conv
    second = next(r for r in rows if r["parts"].stage == 2)
    assert second["parts"].shortcut is second["block"].downsample is not None
    assert second["s"].shape == second["y"].shape != second["x"].shape


@pytest.mark.parametrize(("name", "kwargs", "activation"), [
    ("resnetv2_18", {}, None), ("resnetv2_50", {}, None), ("resnetv2_50", {"preact": False}, "relu"),
])
def test_timm_resnetv2_blocks_recombine(name, kwargs, activation):
    model = timm_model(name, **kwargs)
    rows = recorded_parts(model, IMAGE)
    assert len(rows) == (8 if name.endswith("18") else 16)
    assert {r["parts"].activation for r in rows} == {activation}
    assert [r["parts"].stage for r in rows][:1] + [r["parts"].stage for r in rows][-1:] == [1, 4]
    assert_recombines(rows)
    if activation is None:
        # y = x + F(x) with nothing after the sum: y is signed
        assert (rows[-1]["y"] < 0).any()
        # a downsampling block's shortcut projects the pre-activated input, norm1(x)
        down = next(r for r in rows if r["parts"].shortcut is not None)
        block = down["block"]
        with torch.inference_mode():
            assert torch.equal(block.downsample(block.norm1(down["x"])), down["s"])


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_transformers_blocks_recombine(layer_type):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[2, 1, 2], layer_type=layer_type,
                          num_labels=5)
    model = randomise_bn(ResNetForImageClassification(config))
    rows = recorded_parts(model, IMAGE)
    assert [r["parts"].name for r in rows] == [f"resnet.encoder.stages.{s}.layers.{i}"
                                               for s, i in [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]]
    assert [r["parts"].stage for r in rows] == [1, 1, 2, 3, 3]
    assert {r["parts"].activation for r in rows} == {"relu"}
    assert all(r["parts"].branch_end is r["block"].layer for r in rows)
    assert_recombines(rows)


def test_torchvision_and_project_blocks_recombine():
    import torchvision

    torch.manual_seed(0)
    tv = randomise_bn(torchvision.models.resnet50(weights=None, num_classes=5))
    rows = recorded_parts(tv, IMAGE)
    assert len(rows) == 16 and rows[0]["parts"].branch_end is rows[0]["block"].bn3
    assert_recombines(rows)
    project = randomise_bn(build_model(TINY_PROJ))
    rows = recorded_parts(project, torch.randn(2, 3, 16, 16))
    assert [r["parts"].name for r in rows] == ["res1", "res2", "res3"]
    assert_recombines(rows)


def test_a_subclass_of_a_block_class_is_a_block():
    import torchvision.models.resnet as tvr

    class Mine(tvr.BasicBlock):
        pass

    parts = BlockTypes().parts_of("layer3.1", Mine(8, 8))
    assert parts is not None and parts.stage == 3 and parts.shortcut is None
    assert BlockTypes().parts_of("conv1", nn.Conv2d(3, 8, 3)) is None
