"""The capture on timm, transformers and torchvision models: logits unchanged bit for bit, every record recombines
(y = act(F + s)), a lesion leaves y = act(s(x)), and no hook is left behind."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_bn
from torch import nn

from resnet_demo.core.capture import capture, capture_forward, find_blocks

timm = pytest.importorskip("timm")
pytest.importorskip("transformers")

IMAGE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(timm.create_model(name, pretrained=False, num_classes=6, **kwargs))


def _transformers(layer_type: str) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    class Logits(nn.Module):  # the library's model as a caller holds it; blocks keep transformers' names below
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2], layer_type=layer_type,
                                  num_labels=6)
            self.net = randomise_bn(ResNetForImageClassification(config))

        def forward(self, x):
            return self.net(x).logits

    return Logits().eval()


def _torchvision() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return randomise_bn(torchvision.models.resnet18(weights=None, num_classes=6))


MODELS = {
    "timm resnet18": lambda: _timm("resnet18"),
    "timm resnet10t": lambda: _timm("resnet10t"),  # tiered stem, avg-pool shortcut
    "timm resnet14t": lambda: _timm("resnet14t", drop_path_rate=0.05),  # Bottleneck, drop_path ends F
    "timm seresnet18": lambda: _timm("seresnet18"),
    "timm resnetv2_18": lambda: _timm("resnetv2_18"),  # pre-activation: no ReLU after the sum
    "transformers basic": lambda: _transformers("basic"),
    "transformers bottleneck": lambda: _transformers("bottleneck"),
    "torchvision resnet18": _torchvision,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return request.param, MODELS[request.param]()


def _act(spec, t: torch.Tensor) -> torch.Tensor:
    return t if spec.activation is None else torch.relu(t)


def test_capture_leaves_logits_bit_identical_and_every_record_recombines(model):
    label, net = model
    with torch.inference_mode():
        plain = net(IMAGE)
    logits, records = capture_forward(net, IMAGE)
    assert torch.equal(logits, plain), label
    specs = find_blocks(net)
    assert len(records) == len(specs) >= 2
    for spec, rec in zip(specs, records):
        assert rec.name == spec.name
        assert torch.equal(_act(spec, rec.f + rec.s), rec.y), rec.name
        if spec.shortcut is None:
            assert torch.equal(rec.s, rec.x)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    expected = None if label.startswith("timm resnetv2") else "relu"
    assert {s.activation for s in specs} == {expected}


def test_a_lesion_leaves_the_shortcut_alone(model):
    label, net = model
    specs = find_blocks(net)
    last = specs[-1].name
    _, records = capture_forward(net, IMAGE, lesion=[last])
    rec, spec = records[-1], specs[-1]
    assert torch.count_nonzero(rec.f) == 0
    assert torch.equal(rec.y, _act(spec, rec.s)), label
    lesioned, _ = capture_forward(net, IMAGE, lesion=[last], keep=("y",))
    assert not torch.equal(lesioned, capture_forward(net, IMAGE, keep=("y",))[0])


def test_no_hook_is_left_when_the_forward_pass_raises(model):
    _, net = model
    with pytest.raises((RuntimeError, ValueError)), capture(net):
        net(torch.randn(1, 5, 64, 64))  # 5 channels: the stem refuses them
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
