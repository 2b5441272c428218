"""The per-block readout on networks timm and transformers build, opened the way the page opens them: the head's
width is the model's ``num_features`` and the last block's readout is the model's own logits (timm's ResNetV2 ends
its features with a pre-activation BN + ReLU that its ``forward_head`` leaves out)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_bn
from safetensors.torch import save_file
from torch import nn

from resnet_demo.core.capture import find_blocks
from resnet_demo.core.insight import head_of, head_width, readout
from resnet_demo.core.weights.opening import open_weights

timm = pytest.importorskip("timm")
pytest.importorskip("transformers")

IMAGE = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(11))


def _timm(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(timm.create_model(name, pretrained=False, num_classes=5))


def _transformers() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=5)
    return randomise_bn(ResNetForImageClassification(config))


def _opened(source: nn.Module, tmp_path) -> nn.Module:
    save_file({k: v.detach().clone().contiguous() for k, v in source.state_dict().items()},
              tmp_path / "model.safetensors")
    model, _card = open_weights(tmp_path / "model.safetensors")
    return model


@pytest.mark.parametrize("name", ["timm resnet10t", "timm resnetv2_18", "transformers basic"])
def test_the_last_blocks_readout_is_the_models_logits(tmp_path, name):
    source = _transformers() if name.startswith("transformers") else _timm(name.split()[1])
    model = _opened(source, tmp_path)
    assert head_width(model) == model.num_features
    with torch.inference_mode():
        logits = model(IMAGE)[0]
    result = readout(model, IMAGE, [f"c{i}" for i in range(5)])
    last = find_blocks(model)[-1].name
    assert result[-1].name == last
    assert torch.allclose(result[-1].logits, logits, atol=1e-5, rtol=0)
    assert result.final.index == int(logits.argmax()) and result[-1].agrees


def test_resnetv2s_head_applies_its_final_norm():
    model = _timm("resnetv2_18")
    with torch.inference_mode():
        features = model.forward_features(IMAGE)  # stem, stages, norm
        unnormed = model.stages(model.stem(IMAGE))
        assert torch.allclose(head_of(model)(unnormed), model.forward_head(features), atol=1e-6, rtol=0)
        assert not torch.allclose(model.forward_head(unnormed), model.forward_head(features), atol=1e-3)


@pytest.mark.parametrize("name", ["timm resnet10t", "timm resnetv2_18", "transformers basic"])
def test_a_saved_card_of_a_library_model_reloads_with_the_same_logits(tmp_path, name):
    from resnet_demo.core.weights.files import save_weights
    from resnet_demo.core.weights.load import load_model
    from resnet_demo.view.registry import Registry, _arch_key

    source = _transformers() if name.startswith("transformers") else _timm(name.split()[1])
    model, card = open_weights(_opened_path(source, tmp_path))
    saved = save_weights(model, card, tmp_path / "saved" / "mine.safetensors", half=False)
    again, card_again = load_model(tmp_path / "saved" / "mine.safetensors")
    assert type(again) is type(model) and card_again.arch == saved.arch
    with torch.inference_mode():
        assert torch.equal(again(IMAGE), model(IMAGE))
    # --weights with the card beside it, and --arch naming it as a person would
    registry = Registry([])
    spelled = {"timm resnet10t": "timm/resnet10t.a1_in1k", "timm resnetv2_18": "timm/ResNetV2_18",
               "transformers basic": "transformers"}[name]
    assert _arch_key(spelled) == _arch_key(card.arch)
    registry.add_custom(str(tmp_path / "saved" / "mine.safetensors"), spelled, device="cpu")
    registry.load_all()
    assert torch.equal(registry.get("custom").logits(IMAGE), again(IMAGE))


def _opened_path(source: nn.Module, tmp_path):
    save_file({k: v.detach().clone().contiguous() for k, v in source.state_dict().items()},
              tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"
