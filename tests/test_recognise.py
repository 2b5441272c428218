"""A checkpoint from elsewhere: read within bounds, recognised from keys and shapes, built and fitted; the broken corpus.

Every file is made here, in ``tmp_path``; no binary file is committed. Candidates for recognition come from
meta-device state dicts (shapes only) wherever values are not needed, so the ten torchvision networks cost
no memory; the end-to-end tests compare logits with the model the file was saved from.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import TINY, TINY_PROJ, randomise_bn
from safetensors.torch import save_file
from tutorial_net import Net

from resnet_demo.core.errors import WeightsError
from resnet_demo.core.model import TUTORIAL_CONFIG, ResNetConfig, build_model
from resnet_demo.core.weights.fitting import build_recognised, fit_recognised, tutorial_key_map
from resnet_demo.core.weights.reader import MAX_CLASSES, MAX_PARAMS, read_checkpoint
from resnet_demo.core.weights.recognise import _TV_BLOCKS, Architecture, recognise
from resnet_demo.core.weights.torchvision_resnets import SUPPORTED_ARCHS

# Text that means a Python error, or torch's advice to unpickle unsafely, reached the person.
LEAKS = ("Traceback", "weights_only", "Errno", "KeyError", "TypeError", "AttributeError", "NoneType", "\n")
ODD = ResNetConfig(in_channels=1, num_classes=7, widths=(8, 16, 32), blocks=(1, 2, 1), name="odd")
ODD_PROJ = ResNetConfig(in_channels=1, num_classes=7, widths=(8, 16, 32), blocks=(1, 2, 1), downsample="projection")


def assert_sentence(message: str, pattern: str, file: str | None = None) -> None:
    """``message`` matches ``pattern``, is one sentence for a person, and names ``file``."""
    assert re.search(pattern, message), message
    assert not [s for s in LEAKS if s in message], message
    assert not re.search(r"[.;:]\s+[A-Z][a-z]", message), f"more than one sentence: {message}"
    assert len(message) < 400, message
    if file is not None:
        assert file in message, message


def refused(path: Path, pattern: str, **limits) -> str:
    with pytest.raises(WeightsError) as info:
        read_checkpoint(path, **limits)
    assert_sentence(str(info.value), pattern, path.name)
    return str(info.value)


def pipeline(path: Path, override: str | None = None) -> tuple[Architecture, torch.nn.Module]:
    """What the app does with an upload: read -> recognise -> build -> fit."""
    sd = read_checkpoint(path)
    arch = recognise(sd, override)
    model = build_recognised(arch)
    fit_recognised(model, sd, arch, f"checkpoint {path.name}")
    return arch, model


def meta_state_dict(build) -> dict[str, torch.Tensor]:
    """A state dict of shapes only: built on the meta device, no memory."""
    with torch.device("meta"):
        return build().state_dict()


def to_tutorial_keys(sd: dict, config: ResNetConfig) -> dict:
    """This project's state dict under the tutorial's ``Net`` key names, in state_dict order."""
    mapping = tutorial_key_map(config)
    return {f"{mapping.get(k.rpartition('.')[0], k.rpartition('.')[0])}.{k.rpartition('.')[2]}": v
            for k, v in sd.items()}


def write_safetensors_header(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def same_logits(a: torch.nn.Module, b: torch.nn.Module, channels: int = 3, size: int = 32) -> None:
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=1e-6)


# --- the tutorial's Net ------------------------------------------------------------------------------------


def test_the_tutorials_net_is_recognised_from_its_own_keys():
    arch = recognise(Net().state_dict())
    assert arch.kind == "resnet"
    assert arch.config == TUTORIAL_CONFIG and arch.config.downsample == "transition"
    assert (arch.num_classes, arch.in_channels) == (10, 3)
    assert arch.description == (
        "the tutorial's Net: 3 stages of 3 blocks at 64/128/256 channels, 3 input channels, 10 classes, "
        "5,027,210 parameters"
    )


def test_the_tutorials_net_end_to_end(tmp_path):
    torch.manual_seed(0)
    net = randomise_bn(Net())
    torch.save(net.state_dict(), tmp_path / "net.pth")
    arch, model = pipeline(tmp_path / "net.pth")
    assert arch.config == TUTORIAL_CONFIG
    same_logits(model, net)


def test_a_resized_net_in_the_tutorials_naming():
    sd = to_tutorial_keys(meta_state_dict(lambda: build_model(ODD)), ODD)
    assert "res4.conv1.weight" in sd and "conv3.weight" in sd and "stem.conv.weight" not in sd
    arch = recognise(sd)
    assert arch.config == ODD  # widths, blocks, layout, 1 input channel, 7 classes
    assert arch.description.startswith(
        "the tutorial's Net, resized: 3 stages of 1/2/1 blocks at 8/16/32 channels, 1 input channel, 7 classes, "
    )


def test_stages_of_equal_width_take_their_split_from_the_key_order():
    config = ResNetConfig(widths=(8, 8, 16), blocks=(1, 2, 1))
    sd = to_tutorial_keys(meta_state_dict(lambda: build_model(config)), config)
    arch = recognise(sd)  # in state_dict order: conv2 comes after res1, so res2 and res3 are stage 2
    assert arch.config.blocks == (1, 2, 1)
    assert "not in the weights" not in arch.description
    arch = recognise(dict(sorted(sd.items())))  # safetensors-like order: the split is not in the file
    assert arch.config.widths == (8, 8, 16) and arch.config.blocks == (2, 1, 1)
    assert "which blocks belong to which is not in the weights and was taken as 2/1/1" in arch.description


# --- this project's ResNet -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, TINY_PROJ, ODD, ODD_PROJ, TUTORIAL_CONFIG,
                                    ResNetConfig(widths=(16,), blocks=(3,), num_classes=2),
                                    ResNetConfig(widths=(4, 4, 8, 8), blocks=(2, 1, 1, 3), downsample="projection")],
                         ids=lambda c: f"{c.downsample}-{c.widths}-{c.blocks}-{c.in_channels}in-{c.num_classes}cls")
def test_the_projects_resnet_is_recognised_in_both_layouts(config):
    arch = recognise(meta_state_dict(lambda: build_model(config)))
    assert arch.kind == "resnet"
    assert arch.config == config  # widths, blocks, downsample, in_channels, num_classes, first_stride 1
    assert (arch.num_classes, arch.in_channels) == (config.num_classes, config.in_channels)
    layout = "projection shortcuts" if config.downsample == "projection" else "transitions"
    params = sum(p.numel() for p in build_model(config).parameters())
    assert arch.description.startswith(f"this project's ResNet ({layout}): {len(config.widths)} stage")
    assert arch.description.endswith(f"{params:,} parameters")


@pytest.mark.parametrize("downsample", ["transition", "projection"])
def test_a_first_stage_that_downsamples_is_recognised_and_said(downsample):
    config = ResNetConfig(widths=(8, 16), blocks=(1, 1), first_stride=2, downsample=downsample)
    arch = recognise(meta_state_dict(lambda: build_model(config)))
    assert arch.config == config
    assert arch.description.endswith("(the first stage downsamples: its stride is not in the weights and was taken as 2)")


@pytest.mark.parametrize("config", [ODD, ODD_PROJ], ids=["transition", "projection"])
def test_the_projects_resnet_end_to_end_from_safetensors(tmp_path, config):
    torch.manual_seed(0)
    original = randomise_bn(build_model(config))
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(tmp_path / "odd.safetensors"))
    arch, model = pipeline(tmp_path / "odd.safetensors")
    assert arch.config == config and arch.description.count("1 input channel, 7 classes") == 1
    same_logits(model, original, channels=1)


def test_recognise_builds_candidates_on_the_meta_device_only():
    # 12 billion parameters: allocating any candidate for real would fail or take minutes.
    huge = ResNetConfig(widths=(20_000, 40_000), blocks=(1, 1), num_classes=3)
    arch = recognise({k: tuple(v.shape) for k, v in meta_state_dict(lambda: build_model(huge)).items()})
    assert arch.config == huge
    assert int(arch.description.rsplit(", ", 1)[1].split()[0].replace(",", "")) > 10**10


# --- torchvision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_every_torchvision_arch_is_recognised_from_its_shapes(arch):
    for classes in (1000, 5):
        sd = meta_state_dict(lambda n=classes: torchvision.models.get_model(arch, weights=None, num_classes=n))
        found = recognise(sd)
        assert (found.kind, found.config, found.num_classes, found.in_channels) == (arch, None, classes, 3)
        per_stage = "/".join(map(str, _TV_BLOCKS[arch]))  # the table that orders the search agrees with torchvision
        assert found.description.startswith(f"torchvision {arch}: 4 stages of {per_stage} ")
        assert f"3 input channels, {classes:,} classes" in found.description
    # Older checkpoints (torchvision's own V1 files) lack the BN counters: still recognised.
    assert recognise({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}).kind == arch


def test_a_torchvision_description_counts_blocks_and_parameters():
    assert recognise(meta_state_dict(torchvision.models.resnet18)).description == (
        "torchvision resnet18: 4 stages of 2/2/2/2 BasicBlocks, 3 input channels, 1,000 classes, "
        "11,689,512 parameters (the max-pool after the 7×7 stem is not in the weights and was taken as there, as "
        "torchvision builds it)"
    )
    assert recognise(meta_state_dict(torchvision.models.resnet50)).description.startswith(
        "torchvision resnet50: 4 stages of 3/4/6/3 Bottlenecks"
    )


def test_resnet18_with_5_classes_end_to_end(tmp_path):
    torch.manual_seed(0)
    original = randomise_bn(torchvision.models.resnet18(num_classes=5))
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}, "epoch": 7},
               tmp_path / "r18.pth")
    arch, model = pipeline(tmp_path / "r18.pth")
    assert (arch.kind, arch.num_classes, arch.in_channels) == ("resnet18", 5, 3)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    same_logits(model, original, size=64)


def test_a_torchvision_resnet_with_one_input_channel_end_to_end(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=3)
    original.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    randomise_bn(original)
    save_file(original.state_dict(), str(tmp_path / "gray.safetensors"))
    arch, model = pipeline(tmp_path / "gray.safetensors")
    assert (arch.kind, arch.in_channels, arch.num_classes) == ("resnet18", 1, 3)
    assert model.conv1.in_channels == 1
    same_logits(model, original, channels=1, size=64)


# --- override and mismatches ----------------------------------------------------------------------------------


def test_override_is_honoured():
    r50 = meta_state_dict(torchvision.models.resnet50)
    assert recognise(r50, "resnet50").kind == "resnet50"
    assert recognise(r50, "ResNet-50").kind == "resnet50"
    assert recognise(Net().state_dict(), "tutorial").config == TUTORIAL_CONFIG
    assert recognise(Net().state_dict(), "resnet").config == TUTORIAL_CONFIG  # either naming
    assert recognise(meta_state_dict(lambda: build_model(ODD_PROJ)), "resnet").config == ODD_PROJ
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'"):
        recognise(r50, "vgg16")


@pytest.mark.parametrize("sd, override, pattern", [
    ("resnet18", "resnet34",
     r"^the checkpoint does not fit torchvision resnet34 \(as asked\): key 'layer1\.2\.conv1\.weight' is missing "
     r"\(where resnet34 has \[64, 64, 3, 3\]\); it fits torchvision resnet18 instead$"),
    ("resnet50", "wide_resnet50_2",
     r"^the checkpoint does not fit torchvision wide_resnet50_2 \(as asked\): key 'layer1\.0\.conv1\.weight' has "
     r"shape \[64, 64, 1, 1\] where wide_resnet50_2 has \[128, 64, 1, 1\]; it fits torchvision resnet50 instead$"),
    ("resnet18", "tutorial",
     r"^the checkpoint does not fit the tutorial's Net \(as asked\): key 'conv1\.weight' has shape \[64, 3, 7, 7\] "
     r"where the tutorial's Net has \[64, 3, 3, 3\]; it fits torchvision resnet18 instead$"),
    # A 3×3 first conv is the CIFAR-style stem before torchvision's blocks: the tutorial's Net is not that either.
    ("tutorial", "resnet18",
     r"^the checkpoint does not fit CIFAR-style resnet18 \(as asked\): key 'layer1\.0\.conv1\.weight' is missing "
     r"\(where resnet18 has \[64, 64, 3, 3\]\); it fits the tutorial's Net instead$"),
])
def test_override_mismatch_names_the_first_key_that_does_not_fit(sd, override, pattern):
    state = Net().state_dict() if sd == "tutorial" else meta_state_dict(getattr(torchvision.models, sd))
    with pytest.raises(WeightsError) as info:
        recognise(state, override)
    assert_sentence(str(info.value), pattern)


def test_a_perturbed_resnet18_is_closest_to_resnet18():
    sd = {k: tuple(v.shape) for k, v in meta_state_dict(torchvision.models.resnet18).items()}
    sd["layer3.0.conv1.weight"] = (200, 128, 3, 3)
    with pytest.raises(WeightsError) as info:
        recognise(sd, source="checkpoint odd.pth")
    assert str(info.value) == (
        "checkpoint odd.pth fits no supported architecture: closest is torchvision resnet18, but key "
        "'layer3.0.conv1.weight' has shape [200, 128, 3, 3] where resnet18 has [256, 128, 3, 3]"
    )
    del sd["layer3.0.conv1.weight"]
    with pytest.raises(WeightsError, match=r"closest is torchvision resnet18, but key 'layer3\.0\.conv1\.weight' is "
                                           r"missing \(where resnet18 has \[256, 128, 3, 3\]\)$"):
        recognise(sd)
    sd["layer3.0.conv1.weight"] = (256, 128, 3, 3)
    sd["layer5.0.conv1.weight"] = (1, 1, 1, 1)
    with pytest.raises(WeightsError) as info:  # a fifth stage: the blocks per stage are counted in the file
        recognise(sd)
    assert str(info.value) == (
        "the checkpoint fits no supported architecture: it has 2/2/2/2/1 torchvision-style BasicBlocks per stage, "
        "which no supported torchvision ResNet has (closest is torchvision resnet18, but key 'layer5.0.conv1.weight' "
        "is not part of resnet18)")


def test_a_perturbed_project_resnet_is_closest_to_the_projects_resnet():
    sd = {k: tuple(v.shape) for k, v in meta_state_dict(lambda: build_model(ODD)).items()}
    sd["stages.1.blocks.res3.branch.conv2.weight"] = (16, 16, 5, 5)
    with pytest.raises(WeightsError) as info:
        recognise(sd)
    assert_sentence(str(info.value), r"closest is this project's ResNet \(transitions\), but key "
                    r"'stages\.1\.blocks\.res3\.branch\.conv2\.weight' has shape \[16, 16, 5, 5\] where this "
                    r"project's ResNet has \[16, 16, 3, 3\]$")


def test_a_classifier_without_classes_is_refused():
    sd = meta_state_dict(lambda: build_model(TINY))
    sd["fc.weight"], sd["fc.bias"] = torch.empty(0, 16), torch.empty(0)
    with pytest.raises(WeightsError, match=r"has a classifier without classes \('fc\.weight' has shape \[0, 16\]\)"):
        recognise(sd)


def test_fit_refuses_weights_of_another_architecture(tmp_path):
    arch = recognise(meta_state_dict(lambda: build_model(TINY)))
    model = build_recognised(arch)
    with pytest.raises(WeightsError) as info:
        fit_recognised(model, build_model(TINY_PROJ).state_dict(), arch, "checkpoint other.pth")
    assert_sentence(str(info.value), r"^checkpoint other\.pth does not fit this ResNet: key "
                    r"'stages\.1\.transition\.conv\.weight' is missing", "other.pth")


# --- the broken corpus (the hostile pickle is tests/test_checkpoints.py's, for both routes) -----------------------


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_whole_pickled_model_is_refused_with_how_to_save_a_state_dict(tmp_path, zipped):
    for model, cls in ((Net(), "tutorial_net.Net"), (torchvision.models.resnet18(), "torchvision.models.resnet.ResNet")):
        torch.save(model, tmp_path / "whole.pth", _use_new_zipfile_serialization=zipped)
        refused(tmp_path / "whole.pth", rf"^checkpoint whole\.pth holds a whole pickled model \({re.escape(cls)}\); save "
                rf"its weights with torch\.save\(model\.state_dict\(\), 'weights\.pth'\) and load that file instead$")


def test_a_torchscript_archive_is_refused_with_how_to_save_a_state_dict(tmp_path):
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(tmp_path / "ts.pt"))
    refused(tmp_path / "ts.pt", r"is a TorchScript archive \(torch\.jit\.save\), not a state dict; save its weights "
                                r"with torch\.save\(model\.state_dict\(\), 'weights\.pth'\)")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    sd = build_model(TINY).state_dict()
    torch.save(sd, folder / "good.pth")
    save_file(sd, str(folder / "good.safetensors"))
    return folder


def test_wrappers_prefixes_and_the_legacy_format_are_read(good, tmp_path):
    expected = build_model(TINY).state_dict()
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in expected.items()}}, tmp_path / "a.pth")
    torch.save({"net": expected, "epoch": 3, "lr": 0.1}, tmp_path / "b.pth")
    torch.save(expected, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "c.bin").write_bytes((good / "good.safetensors").read_bytes())  # told by content, not name
    for path in (tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "legacy.pth", tmp_path / "c.bin"):
        sd = read_checkpoint(path)
        assert list(sd) == list(expected) or sorted(sd) == sorted(expected)
        assert all(sd[k].shape == v.shape for k, v in expected.items())


def test_the_format_is_told_by_content_even_when_it_looks_like_the_other(tmp_path):
    # A safetensors header of 128 bytes: the file starts with 0x80, as a pickle does.
    raw = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode().ljust(128)
    (tmp_path / "w.bin").write_bytes(struct.pack("<Q", 128) + raw + struct.pack("<f", 2.5))
    assert read_checkpoint(tmp_path / "w.bin")["a"].tolist() == [2.5]


def test_a_damaged_pickle_is_called_damaged_not_hostile(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "m.pth")
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "m.pth").write_bytes(data.replace(b"collections\nOrderedDict", b"collections\nOrdered-ict"))
    refused(tmp_path / "m.pth", r"could not be read as a PyTorch checkpoint \(torch\.save\): the file is damaged "
                                r"or truncated$")


def test_a_truncated_zip_checkpoint(good, tmp_path):
    data = (good / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.pth", r"is a truncated or damaged zip archive, so it is not a complete torch\.save checkpoint$")


def test_a_truncated_safetensors(good, tmp_path):
    data = (good / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    refused(tmp_path / "cut.safetensors", r": tensor '[\w.]+' lies at bytes \[\d+, \d+\) of the data but the file "
                                          r"holds only \d[\d,]* bytes of data, so it is truncated or its header is wrong$")
    (tmp_path / "cut.safetensors").write_bytes(data[:20])
    refused(tmp_path / "cut.safetensors", r"declares a safetensors header of [\d,]+ bytes but holds only 12 after the "
                                          r"length, so it is truncated or not a safetensors file$")


def test_random_bytes_and_an_empty_file(tmp_path):
    data = b"\x13" + torch.randint(0, 256, (4095,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes()
    (tmp_path / "noise.pth").write_bytes(data)
    refused(tmp_path / "noise.pth", r"is neither a safetensors file nor a PyTorch checkpoint written by torch\.save")
    (tmp_path / "noise.safetensors").write_bytes(data)
    refused(tmp_path / "noise.safetensors", r"declares a safetensors header of [\d,]+ bytes, over the format's limit "
                                            r"of 100,000,000, so it is damaged or not a safetensors file$")
    (tmp_path / "empty.pth").write_bytes(b"")
    refused(tmp_path / "empty.pth", r"^checkpoint empty\.pth is empty \(0 bytes\)$")
    refused(tmp_path / "absent.pth", r"was not found")


def test_a_file_over_max_bytes_is_refused_before_it_is_read(good, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the file was read"))
    refused(good / "good.pth", r"^checkpoint good\.pth is \d+(\.\d)? KiB, over the limit of 1,000 bytes for a "
                               r"checkpoint$", max_bytes=1000)


@pytest.mark.parametrize("name, header, data, header_len, pattern", [
    ("past", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 12, None,
     r": tensor 'b' lies at bytes \[8, 16\) of the data but the file holds only 12 bytes of data"),
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, None,
     r": tensors 'a' and 'b' overlap in the file's data$"),
    ("size", {"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, 16, None,
     r": tensor 'a' of shape \[3, 2\] needs 24 bytes but its data_offsets span 16$"),
    ("header-length", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, 10**6,
     r"declares a safetensors header of 1,000,000 bytes but holds only \d+ after the length"),
    ("backwards", {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, 8, None,
     r": tensor 'a' has data_offsets \[8, 0\] that end before they begin$"),
    ("gap", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, None,
     r": bytes \[0, 4\) of the data belong to no tensor$"),
    ("trailing", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 8, None,
     r" has 4 bytes after its last tensor that belong to no tensor$"),
    ("dtype", {"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, 4, None,
     r": tensor 'a' has dtype \"F99\", which is not a supported tensor type$"),
    ("complex", {"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, 8, None,
     r": tensor 'a' has dtype \"C64\", which is not a supported tensor type$"),
    ("shape", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, None,
     r": tensor 'a' has a shape that is not a list of non-negative integers$"),
    ("offsets", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}}, 4, None,
     r": tensor 'a' has data_offsets that are not two non-negative integers$"),
    ("metadata", {"__metadata__": {"n": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4, None,
     r"has a safetensors '__metadata__' entry that is not a table of strings$"),
    ("dims", {"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, 4, None,
     r": tensor 'a' has 9 dimensions; weights have at most 8$"),
    ("nothing", {}, 0, None, r" holds no tensors$"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith((":", " ", "r", "d", "h")) else None)
def test_a_safetensors_header_that_lies(tmp_path, name, header, data, header_len, pattern):
    path = write_safetensors_header(tmp_path / f"{name}.safetensors", header, b"\0" * data, header_len)
    refused(path, pattern)


def test_a_safetensors_header_that_is_not_json_or_names_a_tensor_twice(tmp_path):
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], ' \
          b'"data_offsets": [4, 8]}}'
    (tmp_path / "twice.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    refused(tmp_path / "twice.safetensors", r"has a safetensors header that names 'a' twice$")
    deep = b"{" + b"[" * 100_000  # json's recursion limit: a RecursionError, not a crash
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    refused(tmp_path / "deep.safetensors", r"has a safetensors header that is not valid JSON")


def test_a_billion_parameters_declared_in_a_header_are_refused_before_any_data_is_read(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("tensor data was read"))
    pattern = (r"holds 1,000,000,000 parameters, over the limit of 200,000,000 \(the largest supported network, "
               r"wide_resnet101_2, has 126,886,696\)$")
    # A header that lies: 4 bytes of data for 4 GB of float32.
    lying = {"w": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}
    refused(write_safetensors_header(tmp_path / "lies.safetensors", lying, bytes(4)), pattern)
    # An honest header in a sparse file of 4 GB (a few KiB on disk), under a raised size limit.
    path = write_safetensors_header(tmp_path / "sparse.safetensors", lying)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + 4 * 10**9)
    refused(path, pattern, max_bytes=2**33)
    refused(path, r"is 3\.7 GiB, over the limit of 512 MiB")  # the default limit comes first


def test_a_billion_parameters_in_a_tiny_torch_file_are_refused(tmp_path):
    # torch.save keeps a stride-0 view as it is: 1,000,000,000 parameters in 1 KiB.
    torch.save({"w": torch.zeros(1).expand(10**9)}, tmp_path / "view.pth")
    assert (tmp_path / "view.pth").stat().st_size < 4096
    refused(tmp_path / "view.pth", r"holds 1,000,000,000 parameters, over the limit of 200,000,000")
    torch.save({"n": torch.zeros(1, dtype=torch.long).expand(10**9)}, tmp_path / "ints.pth")
    refused(tmp_path / "ints.pth", r": tensor 'n' holds 1,000,000,000 values, over the limit of 200,000,000$")


def test_a_million_class_head_is_refused(tmp_path):
    pattern = r"has a classifier for 1,000,000 classes \('fc\.weight' has shape \[1000000, 8\]\), over the limit of 100,000$"
    header = {"fc.weight": {"dtype": "F16", "shape": [10**6, 8], "data_offsets": [0, 16 * 10**6]}}
    refused(write_safetensors_header(tmp_path / "head.safetensors", header), pattern)
    torch.save({"fc.weight": torch.zeros(1, 1).expand(10**6, 8), "fc.bias": torch.zeros(1).expand(10**6)},
               tmp_path / "head.pth")
    refused(tmp_path / "head.pth", pattern)
    # Without an fc.weight the last 2-D weight is the classifier.
    torch.save({"head.linear.weight": torch.zeros(1, 1).expand(10**6, 8)}, tmp_path / "other.pth")
    refused(tmp_path / "other.pth", r"classifier for 1,000,000 classes \('head\.linear\.weight'")
    assert (MAX_PARAMS, MAX_CLASSES) == (200_000_000, 100_000)


def test_tensors_that_are_not_plain_and_dense_are_refused(tmp_path):
    cases = {
        "sparse": (torch.zeros(3).to_sparse(), r"entry 'w' is a sparse tensor; only plain dense tensors are accepted$"),
        "complex": (torch.zeros(3, dtype=torch.complex64), r"entry 'w' is a complex tensor"),
        "number": (3, r"entry 'w' is not a tensor \(it holds a Python int\)$"),
    }
    for name, (value, pattern) in cases.items():
        torch.save({"w": value}, tmp_path / f"{name}.pth")
        refused(tmp_path / f"{name}.pth", pattern)
    torch.save(torch.zeros(3), tmp_path / "one.pth")
    refused(tmp_path / "one.pth", r"holds a single tensor, not a state dict")
    torch.save({1: torch.zeros(3)}, tmp_path / "key.pth")
    refused(tmp_path / "key.pth", r"has an entry named 1, not a string")


@pytest.mark.parametrize("where, value", [("fc.weight", float("nan")), ("stem.bn.running_var", float("inf"))])
def test_non_finite_weights_are_refused(tmp_path, where, value):
    sd = build_model(TINY).state_dict()
    sd[where].view(-1)[3] = value
    torch.save(sd, tmp_path / "nan.pth")
    sd = read_checkpoint(tmp_path / "nan.pth")  # reading is fine: the values are not looked at
    arch = recognise(sd)
    with pytest.raises(WeightsError) as info:
        fit_recognised(build_recognised(arch), sd, arch, "checkpoint nan.pth")
    assert_sentence(str(info.value), rf"^checkpoint nan\.pth was refused because key '{re.escape(where)}' holds 1 NaN "
                    rf"or infinite value \(of \d+\): a model with non-finite weights cannot give a meaningful "
                    rf"prediction$", "nan.pth")
