"""Checkpoints of every source, written by the test as real files in each source's layout, opened by
``open_weights``: the network its library builds, logits equal to the source model's to 1e-5 with and without
capture, and the source's preprocessing and labels on the card."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_bn
from safetensors.torch import save_file
from torch import nn

from resnet_demo.core.capture import capture_forward, find_blocks
from resnet_demo.core.errors import WeightsError
from resnet_demo.core.weights.opening import open_weights

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

IMAGE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def same_logits(opened: nn.Module, reference, x: torch.Tensor = IMAGE) -> None:
    with torch.inference_mode():
        want = reference(x)
        plain = opened(x)
    captured, records = capture_forward(opened, x)
    assert torch.allclose(plain, want, atol=1e-5, rtol=0)
    assert torch.equal(captured, plain)
    assert len(records) == len(find_blocks(opened)) > 0


def timm_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# --- timm -------------------------------------------------------------------------------------------------------


def test_a_timm_file_without_config_is_recognised_and_built_by_timm(tmp_path):
    source = timm_model("resnet10t")
    save_file(state(source), tmp_path / "resnet10t.safetensors")
    model, card = open_weights(tmp_path / "resnet10t.safetensors")
    assert type(model).__module__ == "timm.models.resnet" and model.default_cfg["architecture"] == "resnet10t"
    same_logits(model, source)
    # timm's pretrained_cfg for resnet10t: 176 px at crop_pct 0.875, ImageNet statistics, bicubic
    assert (card.input_size, card.resize) == (176, 201)
    assert card.mean == pytest.approx([0.485, 0.456, 0.406]) and card.std == pytest.approx([0.229, 0.224, 0.225])
    assert card.classes[0] == "tench, Tinca tinca" and len(card.classes) == 1000
    assert card.arch == "timm/resnet10t" and "bicubic" in card.training["preprocessing"]


def test_a_timm_config_beside_the_weights_names_the_model_and_its_labels(tmp_path):
    source = timm_model("resnet18", num_classes=3)
    torch.save(state(source), tmp_path / "pytorch_model.bin")
    config = {"architecture": "resnet18", "num_classes": 3, "label_names": ["cat", "dog", "eel"],
              "pretrained_cfg": {"input_size": [3, 160, 160], "crop_pct": 0.8, "interpolation": "bilinear",
                                 "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "num_classes": 3}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, card = open_weights(tmp_path / "pytorch_model.bin")
    # torchvision's names, yet timm's model, as its config says
    assert type(model).__module__ == "timm.models.resnet"
    same_logits(model, source)
    assert card.classes == ["cat", "dog", "eel"]
    assert (card.input_size, card.resize, card.mean) == (160, 200, [0.5, 0.5, 0.5])
    assert "as its config.json says" in card.training["architecture"]


@pytest.mark.parametrize(("name", "kwargs"), [("resnetv2_18", {}), ("seresnet18", {}), ("resnet14t", {})])
def test_timm_variants_open_from_a_pth(tmp_path, name, kwargs):
    source = timm_model(name, num_classes=4, **kwargs)
    torch.save({"state_dict": state(source), "epoch": 7}, tmp_path / f"{name}.pth")
    model, card = open_weights(tmp_path / f"{name}.pth")
    assert model.default_cfg["architecture"] == name
    same_logits(model, source)
    assert card.classes == [f"class {i}" for i in range(4)]
    if name == "resnetv2_18":
        assert {b.activation for b in find_blocks(model)} == {None}


def test_a_timm_config_that_does_not_fit_the_weights_is_refused(tmp_path):
    save_file(state(timm_model("resnet10t", num_classes=2)), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet14t", "num_classes": 2,
                                                      "pretrained_cfg": {}}))
    with pytest.raises(WeightsError, match=r"does not fit timm resnet14t, as its config.json says"):
        open_weights(tmp_path / "model.safetensors")


def test_a_timm_model_named_with_arch_is_the_only_one_tried(tmp_path):
    from resnet_demo.core.weights.load import open_checkpoint

    source = timm_model("resnet18", num_classes=3)  # torchvision's key names: the recogniser's by default
    save_file(state(source), tmp_path / "model.safetensors")
    model, card = open_checkpoint(tmp_path / "model.safetensors", arch="timm/resnet18")
    assert type(model).__module__ == "timm.models.resnet" and card.arch == "timm/resnet18"
    assert "as the architecture chosen says" in card.training["architecture"]
    same_logits(model, source)
    with pytest.raises(WeightsError, match=r"does not fit timm resnet14t, as the architecture chosen says: it lacks key"):
        open_checkpoint(tmp_path / "model.safetensors", arch="timm/resnet14t")
    with pytest.raises(WeightsError, match=r"the architecture chosen names 'nonsense', which is not a timm ResNet"):
        open_checkpoint(tmp_path / "model.safetensors", arch="timm/nonsense")
    with pytest.raises(ValueError, match=r"write a timm architecture as timm/<model name>"):
        open_checkpoint(tmp_path / "model.safetensors", arch="timm/")
    with pytest.raises(ValueError, match=r"chosen is timm/resnet18, but the config.json given names 'resnet14t'"):
        open_checkpoint(tmp_path / "model.safetensors", arch="timm/resnet18", config={"architecture": "resnet14t"})


# --- transformers -----------------------------------------------------------------------------------------------


def hf_model(layer_type: str = "bottleneck", labels: int = 3) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[2, 1], layer_type=layer_type,
                          num_labels=labels, id2label={i: f"kind {i}" for i in range(labels)},
                          label2id={f"kind {i}": i for i in range(labels)})
    return randomise_bn(ResNetForImageClassification(config))


def test_a_transformers_folder_opens_with_its_config_labels_and_preprocessing(tmp_path):
    source = hf_model()
    source.save_pretrained(tmp_path)  # model.safetensors and config.json, as the Hub holds them
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_pct": 0.875, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.2, 0.3], "resample": 3,
         "size": {"shortest_edge": 224}}))
    model, card = open_weights(tmp_path / "model.safetensors")
    same_logits(model, lambda x: source(x).logits)
    assert card.classes == ["kind 0", "kind 1", "kind 2"]
    assert (card.input_size, card.resize, card.mean, card.std) == (224, 256, [0.4, 0.5, 0.6], [0.2, 0.2, 0.3])
    assert [b.name for b in find_blocks(model)][0] == "resnet.encoder.stages.0.layers.0"
    assert model.num_features == 64  # the head's width, as timm's models say it
    with torch.inference_mode():
        last = source.resnet.encoder(source.resnet.embedder(IMAGE)).last_hidden_state
        assert torch.allclose(model.forward_head(last), source(IMAGE).logits, atol=1e-5, rtol=0)
    assert "config from config.json" in card.training["architecture"]


def test_transformers_weights_alone_get_a_config_inferred_from_their_shapes(tmp_path):
    source = hf_model("basic", labels=1000)
    torch.save(state(source), tmp_path / "pytorch_model.bin")
    model, card = open_weights(tmp_path / "pytorch_model.bin")
    same_logits(model, lambda x: source(x).logits)
    assert "config inferred from the weights" in card.training["architecture"]
    assert (card.input_size, card.resize, card.classes[0]) == (224, 256, "tench")
    assert any("no config.json" in a for a in card.training["assumptions"])


def test_transformers_keys_that_fit_no_inferred_config_name_their_source(tmp_path):
    sd = state(hf_model())
    sd["resnet.encoder.stages.1.layers.0.layer.1.convolution.weight"] = torch.zeros(16, 15, 3, 3)
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError, match="a transformers ResNet without its config"):
        open_weights(tmp_path / "broken.safetensors")


# --- Lightning -------------------------------------------------------------------------------------------------


def lightning_ckpt(sd: dict, prefix: str, extra: dict | None = None) -> dict:
    return {"state_dict": {**{prefix + k: v for k, v in sd.items()}, **(extra or {})},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "lr_schedulers": [], "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
            "hyper_parameters": {"lr": 0.1, "arch": "resnet18"}}


def test_a_lightning_checkpoint_of_torchvision_resnet18_under_model(tmp_path):
    import torchvision

    torch.manual_seed(0)
    source = randomise_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    torch.save(lightning_ckpt(state(source), "model."), tmp_path / "epoch=3.ckpt")
    model, card = open_weights(tmp_path / "epoch=3.ckpt")
    same_logits(model, source)
    assert "the model sits under 'model.'" in card.training["architecture"]


def test_a_lightning_checkpoint_of_a_timm_model_under_net_with_a_loss_beside_it(tmp_path):
    source = timm_model("resnet10t", num_classes=5)
    ckpt = lightning_ckpt(state(source), "net.", {"criterion.weight": torch.ones(5)})
    torch.save(ckpt, tmp_path / "last.ckpt")
    model, card = open_weights(tmp_path / "last.ckpt")
    same_logits(model, source)
    assert "under 'net.'" in card.training["architecture"] and "'criterion.weight'" in card.training["architecture"]


def test_a_lightning_model_that_fits_nothing_says_where_it_sits(tmp_path):
    sd = state(timm_model("resnet10t", num_classes=5))
    sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(lightning_ckpt(sd, "net."), tmp_path / "bad.ckpt")
    with pytest.raises(WeightsError, match=r"a Lightning checkpoint whose model sits under 'net\.'"):
        open_weights(tmp_path / "bad.ckpt")


# --- kuangliu/pytorch-cifar, written here as in that repository ------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10):
        super().__init__()
        self.in_planes = 64

        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_planes, planes, stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def ResNet18():
    return ResNet(BasicBlock, [2, 2, 2, 2])


def test_kuangliu_resnet18_opens_as_torchvision_blocks_with_its_logits(tmp_path):
    torch.manual_seed(0)
    source = randomise_bn(ResNet18())
    torch.save({"net": state(source), "acc": 93.1, "epoch": 180}, tmp_path / "ckpt.pth")  # its main.py's format
    model, card = open_weights(tmp_path / "ckpt.pth")
    same_logits(model, source, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    assert [b.name for b in find_blocks(model)][:2] == ["layer1.0", "layer1.1"]
    assert "kuangliu/pytorch-cifar" in card.training["architecture"]
    assert (card.input_size, card.classes[0]) == (32, "airplane")
