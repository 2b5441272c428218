"""One reader and one recogniser: ``--weights`` on the command line and the page's upload take the same decisions
and refuse with the same sentences.

The command line is driven through ``app.parse_args`` and ``app.build_registry`` (what ``python app.py --weights f``
runs), with ``f`` given relative to the working folder as a user types it; the upload through
:func:`resnet_demo.view.uploads.load_upload` (what the "Load my model" button runs). Every file is made here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import TINY, randomise_bn
from hostile import HOSTILE_FORMATS, hostile
from tutorial_net import Net

from resnet_demo.core.errors import WeightsError
from resnet_demo.core.model import build_model
from resnet_demo.core.weights.cards import imagenet_classes
from resnet_demo.core.weights.files import save_weights
from resnet_demo.core.weights.torchvision_resnets import imagenet_card
from resnet_demo.view.registry import CUSTOM
from resnet_demo.view.uploads import load_upload

app = pytest.importorskip("app")


def command_line(folder: Path, name: str, *flags: str, monkeypatch) -> tuple[str | None, object]:
    """``python app.py --weights <name> <flags>`` run in ``folder``: (the refusal it prints, or None; the explorer)."""
    monkeypatch.chdir(folder)
    empty = folder / "no-shipped-weights"
    empty.mkdir(exist_ok=True)
    args = app.parse_args(["--weights", name, "--weights-dir", str(empty), "--device", "cpu", *flags])
    registry = app.build_registry(args)
    error = registry.failed.get(CUSTOM)
    return error, (None if error else registry.get(CUSTOM))


def upload(folder: Path, name: str, **ask) -> tuple[str | None, object]:
    """The same file through the page's upload (from a copy: the upload deletes what it reads)."""
    copy = folder / "uploaded" / name
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(folder / name, copy)
    try:
        explorer = load_upload(copy, arch=ask.pop("arch", None), preset=ask.pop("preset", "auto"),
                               class_names=ask.pop("class_names", None), device="cpu", **ask)
    except WeightsError as exc:
        assert not copy.exists()  # deleted whatever happens
        return str(exc), None
    assert not copy.exists()
    return None, explorer


def both(folder: Path, name: str, monkeypatch, *, arch: str | None = None, classes: list[str] | None = None):
    flags = (["--arch", arch] if arch else [])
    if classes is not None:
        (folder / "classes.txt").write_text("\n".join(classes) + "\n")
        flags += ["--classes", "classes.txt"]
    return command_line(folder, name, *flags, monkeypatch=monkeypatch), upload(folder, name, arch=arch,
                                                                                 class_names=classes)


def same_refusal(folder: Path, name: str, monkeypatch, expected: str, **kw) -> None:
    (cli, _), (page, _) = both(folder, name, monkeypatch, **kw)
    assert cli == page, f"command line: {cli}\nupload:       {page}"
    assert cli == expected


# --- the hostile pickle: one test, both routes ---------------------------------------------------------------


def test_the_payload_is_armed(tmp_path):
    """Control: unpickled unsafely, the payload does run (so the next test proves something)."""
    marker = tmp_path / "control-marker"
    raw = hostile(tmp_path, marker, "raw5.pth")
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(raw)!r}, 'rb'))"], check=True)
    assert marker.exists()


@pytest.mark.parametrize("fmt", HOSTILE_FORMATS)
@pytest.mark.parametrize("route", ["command line", "upload"])
def test_a_pickle_that_would_run_code_is_refused_alike_and_never_runs(tmp_path, monkeypatch, route, fmt):
    marker = tmp_path / "PWNED"
    path = hostile(tmp_path, marker, fmt)
    if route == "command line":
        message, explorer = command_line(tmp_path, path.name, monkeypatch=monkeypatch)
    else:
        message, explorer = upload(tmp_path, path.name)
    assert explorer is None
    assert message == (f"checkpoint {fmt} holds Python objects, not only tensors (it refers to posix.system), and "
                       "was not loaded (only tensors are accepted; unsafe pickles are refused)")
    assert not marker.exists()


# --- the same sentences --------------------------------------------------------------------------------------


def test_wrong_shapes_get_the_same_sentence(tmp_path, monkeypatch):
    sd = torchvision.models.resnet18(num_classes=5).state_dict()
    sd["layer3.0.conv1.weight"] = torch.zeros(200, 128, 3, 3)
    torch.save(sd, tmp_path / "odd.pth")
    same_refusal(tmp_path, "odd.pth", monkeypatch,
                 "checkpoint odd.pth fits no supported architecture: closest is torchvision resnet18, but key "
                 "'layer3.0.conv1.weight' has shape [200, 128, 3, 3] where resnet18 has [256, 128, 3, 3]")


def test_the_wrong_architecture_asked_for_gets_the_same_sentence(tmp_path, monkeypatch):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    same_refusal(tmp_path, "r18.pth", monkeypatch,
                 "checkpoint r18.pth does not fit torchvision resnet50 (as asked): key 'layer1.0.conv1.weight' has "
                 "shape [64, 64, 3, 3] where resnet50 has [64, 64, 1, 1]; it fits torchvision resnet18 instead",
                 arch="resnet50")


def test_a_file_that_is_not_a_checkpoint_gets_the_same_sentence(tmp_path, monkeypatch):
    (tmp_path / "notes.pth").write_bytes(b"these are my notes, not a checkpoint\n" * 50)
    same_refusal(tmp_path, "notes.pth", monkeypatch,
                 "checkpoint notes.pth is neither a safetensors file nor a PyTorch checkpoint written by torch.save "
                 "(its first bytes match neither format)")


def test_a_checkpoint_of_something_else_gets_the_same_grammatical_sentence(tmp_path, monkeypatch):
    torch.save({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, tmp_path / "other.pth")
    same_refusal(tmp_path, "other.pth", monkeypatch,
                 "checkpoint other.pth fits no supported architecture: it is not a ResNet checkpoint read here (its "
                 "first keys are 'encoder.weight', 'decoder.bias')")
    same_refusal(tmp_path, "other.pth", monkeypatch,
                 "checkpoint other.pth does not fit torchvision resnet18 (as asked): key 'conv1.weight' is missing "
                 "(where resnet18 has [64, 3, 7, 7]); it is not a ResNet checkpoint read here (its first keys are "
                 "'encoder.weight', 'decoder.bias')", arch="resnet18")


def resnet26t_like() -> torch.nn.Module:
    """timm's resnet26t in outline: a deep stem (three 3×3 convs) and 2/2/2/2 Bottlenecks, which is no torchvision
    network."""
    from torchvision.models.resnet import Bottleneck, ResNet

    model = ResNet(Bottleneck, [2, 2, 2, 2], num_classes=10)
    model.conv1 = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, 2, 1, bias=False), torch.nn.Conv2d(24, 32, 3, 1, 1),
                                      torch.nn.Conv2d(32, 64, 3, 1, 1))
    return model


def test_the_block_count_is_the_files_not_the_architecture_asked_for(tmp_path, monkeypatch):
    torch.save(resnet26t_like().state_dict(), tmp_path / "r26t.pth")
    (cli, _), (page, _) = both(tmp_path, "r26t.pth", monkeypatch, arch="resnet50")
    assert cli == page == (
        "checkpoint r26t.pth does not fit torchvision resnet50 (as asked): key 'conv1.weight' is missing (where "
        "resnet50 has [64, 3, 7, 7]); it has 2/2/2/2 torchvision-style Bottlenecks per stage, which no supported "
        "torchvision ResNet has")
    assert "[3, 4, 6, 3]" not in cli and "3/4/6/3" not in cli
    same_refusal(tmp_path, "r26t.pth", monkeypatch,
                 "checkpoint r26t.pth fits no supported architecture: it has 2/2/2/2 torchvision-style Bottlenecks "
                 "per stage, which no supported torchvision ResNet has (closest is torchvision resnet50, but key "
                 "'conv1.weight' is missing (where resnet50 has [64, 3, 7, 7]))")


def test_nan_weights_and_class_names_that_do_not_fit_get_the_same_sentence(tmp_path, monkeypatch):
    sd = Net().state_dict()
    sd["res2.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    same_refusal(tmp_path, "nan.pth", monkeypatch,
                 "checkpoint nan.pth was refused because key 'res2.conv1.weight' holds 1 NaN or infinite value "
                 "(of 36,864): a model with non-finite weights cannot give a meaningful prediction")
    torch.save(Net().state_dict(), tmp_path / "net.pth")
    same_refusal(tmp_path, "net.pth", monkeypatch,
                 "3 class names were given, but the checkpoint's classifier has 10 classes", classes=["a", "b", "c"])


# --- the same decisions ----------------------------------------------------------------------------------------


def logits(explorer, source: torch.nn.Module, channels: int = 3, size: int = 32) -> None:
    """The explorer's model gives the source model's logits, to 1e-5."""
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(explorer.logits(x), source.eval()(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["tutorial", "resnet18"])
def test_a_good_checkpoint_becomes_the_same_model_and_card_by_either_route(tmp_path, monkeypatch, kind):
    torch.manual_seed(0)
    source = randomise_bn(Net() if kind == "tutorial" else torchvision.models.resnet18())
    torch.save(source.state_dict(), tmp_path / "mine.pth")
    (cli_error, cli), (page_error, page) = both(tmp_path, "mine.pth", monkeypatch)
    assert cli_error is None and page_error is None
    logits(cli, source, size=64)
    logits(page, source, size=64)
    assert cli.card.to_json() == page.card.to_json()
    if kind == "tutorial":
        assert (cli.card.arch, cli.card.dataset, cli.card.input_size, cli.card.classes[0]) == (
            "resnet", "CIFAR-10", 32, "airplane")
    else:
        assert (cli.card.arch, cli.card.dataset, cli.card.input_size, cli.card.resize) == (
            "resnet18", "ImageNet-1k", 224, 256)
        assert cli.card.classes == imagenet_classes()


def test_arch_and_classes_are_the_same_override_by_either_route(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = randomise_bn(torchvision.models.resnet18(num_classes=3))
    torch.save(source.state_dict(), tmp_path / "ft.pth")
    (cli_error, cli), (page_error, page) = both(tmp_path, "ft.pth", monkeypatch, arch="ResNet-18",
                                                classes=["cat", "dog", "owl"])
    assert cli_error is None and page_error is None
    assert cli.card.classes == page.card.classes == ["cat", "dog", "owl"]
    assert cli.card.arch == page.card.arch == "resnet18"
    logits(cli, source, size=64)


def test_a_project_safetensors_with_its_card_loads_as_the_card_says(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = randomise_bn(build_model(TINY))
    card = imagenet_card("resnet18")  # any card: this one says its own preprocessing
    card.arch, card.config, card.classes = "resnet", TINY.to_dict(), [f"c{i}" for i in range(10)]
    save_weights(model, card, tmp_path / "tiny.safetensors", half=False)
    error, explorer = command_line(tmp_path, "tiny.safetensors", monkeypatch=monkeypatch)
    assert error is None
    assert explorer.card.classes == card.classes and explorer.card.input_size == 224  # the card's, not guessed
    logits(explorer, model, size=16)
    data = bytearray((tmp_path / "tiny.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "tiny.safetensors").write_bytes(bytes(data))
    error, _ = command_line(tmp_path, "tiny.safetensors", monkeypatch=monkeypatch)
    assert re.fullmatch(r"weights file tiny\.safetensors does not match the sha256 in its card tiny\.json: the file is "
                        r"corrupt, truncated or was replaced without updating the card", error), error
    error, _ = command_line(tmp_path, "tiny.safetensors", "--arch", "resnet50", monkeypatch=monkeypatch)
    assert error is not None


def test_the_published_torchvision_weights_need_the_explicit_flag(tmp_path, monkeypatch):
    from torchvision.models._api import WeightsEnum

    source = randomise_bn(torchvision.models.resnet18())
    calls = []
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: calls.append(str(self)) or
                        source.state_dict())
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "none"
    empty.mkdir()
    registry = app.build_registry(app.parse_args(["--arch", "resnet18", "--weights-dir", str(empty), "--device",
                                                  "cpu"]))
    assert registry.failed[CUSTOM] == (
        "torchvision resnet18 needs a weights file (--weights path/to/resnet18.pth or .safetensors), or "
        "--download-weights to fetch torchvision's published ImageNet weights (needs internet)")
    assert calls == []
    registry = app.build_registry(app.parse_args(["--arch", "resnet18", "--download-weights", "--weights-dir",
                                                  str(empty), "--device", "cpu"]))
    assert calls == ["ResNet18_Weights.IMAGENET1K_V1"]
    explorer = registry.get(CUSTOM)
    assert explorer.card.input_size == 224 and len(explorer.card.classes) == 1000
    logits(explorer, source, size=64)


# --- preprocessing from what the checkpoint says -----------------------------------------------------------------


def cifar_resnet18(num_classes: int = 10, kernel: int = 3) -> torch.nn.Module:
    """torchvision's resnet18 as CIFAR code builds it: a 3×3 (or 7×7) first conv and no max-pool."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    if kernel == 3:
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return randomise_bn(model)


def test_the_default_preset_is_the_one_the_checkpoint_points_to(tmp_path):
    from resnet_demo.core.weights.cards import CIFAR10, IMAGENET, MNIST
    from resnet_demo.core.weights.load import AUTO
    from resnet_demo.view.uploads import DEFAULT_PRESET, PRESET_CHOICES

    assert PRESET_CHOICES[0][1] == DEFAULT_PRESET == AUTO  # the page's default
    torch.manual_seed(0)
    cases = {
        "imagenet.pth": (torchvision.models.resnet18(), IMAGENET, "a 7×7 stem at stride 2 with a max-pool",
                         "ImageNet-1k-style photos (224×224, ImageNet-1k's mean and std), chosen from the checkpoint: "
                         "a 7×7 stem at stride 2 with a max-pool and 3 input channels"),
        "cifar.pth": (cifar_resnet18(), CIFAR10, "a 3×3 stem at stride 1 without a max-pool",
                      "CIFAR-10-style photos (32×32, CIFAR-10's mean and std), chosen from the checkpoint: a 3×3 "
                      "stem at stride 1 without a max-pool and 3 input channels"),
        "mnist.pth": (build_model(TINY.__class__(in_channels=1, widths=(8, 16), blocks=(1, 1))), MNIST,
                      "a 3×3 stem at stride 1 without a max-pool",
                      "MNIST-style drawings (32×32, MNIST's mean and std), chosen from the checkpoint: a 3×3 stem at "
                      "stride 1 without a max-pool and 1 input channel"),
    }
    for name, (model, preset, stem, sentence) in cases.items():
        torch.save(model.state_dict(), tmp_path / name)
        _, explorer = upload(tmp_path, name)
        card = explorer.card
        classes = imagenet_classes() if preset is IMAGENET else list(preset.classes)
        assert (card.input_size, card.resize, card.mean, card.std, card.input_kind, card.classes) == (
            preset.input_size, preset.resize, list(preset.mean) * (3 // len(preset.mean) if preset is not MNIST
                                                                    else 1), list(preset.std) * (
                3 // len(preset.std) if preset is not MNIST else 1), preset.input_kind, classes), name
        assert card.training["stem"] == stem and card.training["preprocessing"] == sentence
        assert "warnings" not in card.training  # what the checkpoint points to always suits its stem


def test_a_stem_that_does_not_suit_the_chosen_size_is_said(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    _, explorer = upload(tmp_path, "r18.pth", preset="cifar10")
    assert explorer.card.training["preprocessing"] == (
        "CIFAR-10-style photos (32×32, CIFAR-10's mean and std), as chosen")
    assert explorer.card.training["warnings"] == [
        "the checkpoint has a 7×7 stem at stride 2 with a max-pool, made for ImageNet-size inputs (about 224×224), "
        "but 32×32 was chosen: its last blocks see 1×1 maps"]
    torch.save(Net().state_dict(), tmp_path / "net.pth")
    _, explorer = upload(tmp_path, "net.pth", preset="imagenet")
    assert explorer.card.training["warnings"] == [
        "the checkpoint has a 3×3 stem at stride 1 without a max-pool, made for small inputs (about 32×32), but "
        "224×224 was chosen: its first blocks see 224×224 maps, 7 times as wide as such a stem is made for"]
    _, explorer = upload(tmp_path, "net.pth", preset="custom", size=48, mean=(0.5,), std=(0.25,))
    assert "warnings" not in explorer.card.training


# --- CIFAR-style stems and the max-pool --------------------------------------------------------------------------


def test_a_3x3_stem_without_a_max_pool_is_recognised_as_cifar_style_not_as_torchvisions(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = cifar_resnet18()
    torch.save(source.state_dict(), tmp_path / "c18.pth")
    (cli_error, cli), (page_error, page) = both(tmp_path, "c18.pth", monkeypatch)
    assert cli_error is None and page_error is None
    for explorer in (cli, page):
        logits(explorer, source, size=32)
        assert explorer.card.arch == "resnet18"
        assert explorer.card.config == {"in_channels": 3, "stem_kernel": 3, "maxpool": False}
        assert explorer.card.training["architecture"] == (
            "CIFAR-style resnet18: 4 stages of 2/2/2/2 BasicBlocks, 3 input channels, 10 classes, 11,173,962 "
            "parameters (a 3×3 stem at stride 1 and no max-pool, as CIFAR code puts before torchvision's blocks: "
            "neither is in the weights)")
        assert explorer.card.training["assumptions"] == [
            "a 3×3 stem at stride 1 and no max-pool, as CIFAR code puts before torchvision's blocks: neither is in "
            "the weights"]
    # Saved with its card, it loads back with the same stem.
    from resnet_demo.core.weights.load import load_model

    save_weights(page.model.cpu(), page.card, tmp_path / "c18.safetensors", half=False)
    model, _ = load_model(tmp_path / "c18.safetensors")
    assert isinstance(model.maxpool, torch.nn.Identity) and model.conv1.kernel_size == (3, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-5)


def test_the_max_pool_is_an_override_on_either_route(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = cifar_resnet18(kernel=7)  # a 7×7 stem whose max-pool was removed: the keys cannot show it
    torch.save(source.state_dict(), tmp_path / "c7.pth")
    _, assumed = upload(tmp_path, "c7.pth")
    assert assumed.card.training["assumptions"] == [
        "the max-pool after the 7×7 stem is not in the weights and was taken as there, as torchvision builds it"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(assumed.logits(x), source(x), atol=1e-3)  # the assumption was wrong here
    (cli_error, cli), (page_error, page) = both(tmp_path, "c7.pth", monkeypatch, arch="auto:no-maxpool")
    assert cli_error is None and page_error is None
    (_, named), _ = both(tmp_path, "c7.pth", monkeypatch, arch="resnet18:no-maxpool")
    for explorer in (cli, page, named):
        logits(explorer, source, size=64)
        assert explorer.card.training["architecture"].endswith("(without the max-pool after the 7×7 stem, as asked)")
        assert "assumptions" not in explorer.card.training
        assert explorer.card.config["maxpool"] is False
    _, pooled = upload(tmp_path, "c7.pth", arch="auto:maxpool")
    assert isinstance(pooled.model.maxpool, torch.nn.MaxPool2d)
    torch.save(Net().state_dict(), tmp_path / "net.pth")
    same_refusal(tmp_path, "net.pth", monkeypatch,
                 "checkpoint net.pth is the tutorial's Net, which has no max-pool after its stem to keep: the "
                 "max-pool choice is for torchvision's ResNets", arch="auto:maxpool")


def test_the_override_grammar_is_one_for_both_routes():
    from resnet_demo.core.weights.recognise import parse_override
    from resnet_demo.view.uploads import ARCH_CHOICES

    assert parse_override("resnet18:no-maxpool") == ("resnet18", False)
    assert parse_override("ResNet-50:maxpool") == ("resnet50", True)
    assert parse_override("auto") == parse_override("") == parse_override(None) == (None, None)
    assert parse_override("auto:no-maxpool") == (None, False)
    for _, value in ARCH_CHOICES:
        parse_override(value)  # every choice on the page is a valid --arch
    with pytest.raises(ValueError, match=r"unknown max-pool choice 'pool' in 'resnet18:pool'"):
        parse_override("resnet18:pool")


# --- training checkpoints ------------------------------------------------------------------------------------------


def trained_a_step(model: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    model.eval()
    return optimizer


@pytest.mark.parametrize("name", ["checkpoint.pth.tar", "model_best.tar"])
def test_a_timm_style_training_checkpoint_gives_up_its_state_dict(tmp_path, monkeypatch, name):
    import argparse

    torch.manual_seed(0)
    source = cifar_resnet18()
    optimizer = trained_a_step(source)
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=200, batch_size=128, amp=False, mean=(0.49, 0.48, 0.45),
                              data_dir="/data/cifar10", sched=None, decay_milestones=[100, 150])
    # As timm's train.py (CheckpointSaver) saves one.
    torch.save({"epoch": 199, "arch": "resnet18", "state_dict": source.state_dict(),
                "optimizer": optimizer.state_dict(), "version": 2, "args": args, "metric": 94.2}, tmp_path / name)
    before = torch.serialization.get_safe_globals()
    (cli_error, cli), (page_error, page) = both(tmp_path, name, monkeypatch)
    assert cli_error is None and page_error is None
    logits(cli, source)
    logits(page, source)
    assert cli.card.to_json() == page.card.to_json()
    after = torch.serialization.get_safe_globals()
    assert after == before and argparse.Namespace not in after  # the allow-list was for that read only


def test_the_pytorch_tutorials_general_checkpoint_gives_up_its_state_dict(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = randomise_bn(Net())
    optimizer = trained_a_step(source)
    # As "Saving and loading a general checkpoint in PyTorch" saves one.
    torch.save({"epoch": 5, "model_state_dict": source.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "loss": torch.tensor(0.42)}, tmp_path / "model.pt")
    (cli_error, cli), (page_error, page) = both(tmp_path, "model.pt", monkeypatch)
    assert cli_error is None and page_error is None
    logits(cli, source)
    logits(page, source)


def test_a_training_checkpoint_with_anything_else_is_refused_as_before(tmp_path, monkeypatch):
    import argparse
    import pathlib

    marker = tmp_path / "PWNED"
    torch.save({"state_dict": Net().state_dict(), "args": argparse.Namespace(out=pathlib.PurePosixPath("/runs/1"))},
               tmp_path / "path.pth.tar")
    same_refusal(tmp_path, "path.pth.tar", monkeypatch,
                 "checkpoint path.pth.tar holds Python objects, not only tensors (it refers to pathlib.PurePosixPath), "
                 "and was not loaded (only tensors are accepted; unsafe pickles are refused)")
    from hostile import Payload

    torch.save({"state_dict": Net().state_dict(), "args": argparse.Namespace(run=Payload(marker))},
               tmp_path / "evil.pth.tar")
    same_refusal(tmp_path, "evil.pth.tar", monkeypatch,
                 "checkpoint evil.pth.tar holds Python objects, not only tensors (it refers to posix.system), and was "
                 "not loaded (only tensors are accepted; unsafe pickles are refused)")
    assert not marker.exists()


# --- distinct names ----------------------------------------------------------------------------------------------


def test_two_uploads_called_model_safetensors_have_distinct_names(tmp_path):
    from safetensors.torch import save_file

    from resnet_demo.view.uploads import UserModels

    store, names, keys = UserModels(), [], []
    for seed in (1, 2, 1):
        folder = tmp_path / f"seed{seed}-{len(names)}"
        folder.mkdir()
        torch.manual_seed(seed)
        save_file(randomise_bn(Net(), seed=seed).state_dict(), str(folder / "model.safetensors"))
        _, explorer = upload(folder, "model.safetensors")
        sha = __import__("hashlib").sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert explorer.card.name == f"model.safetensors ({sha[:8]})"
        names.append(explorer.card.name)
        keys.append(store.add("s", explorer, "Yours: model.safetensors")[0])
    assert names[0] != names[1] and names[0] == names[2]  # the same file, the same name
    labels = [label for label, _ in store.choices("s")]
    assert labels == ["Yours: model.safetensors", f"Yours: model.safetensors ({names[1][-9:-1]})",
                      f"Yours: model.safetensors ({names[0][-9:-1]})"]
    store.end_session("s")
    for _ in range(3):  # the same file three times: a number after the hash
        store.add("s", explorer, "Yours: model.safetensors")
    assert [label for label, _ in store.choices("s")] == [
        "Yours: model.safetensors", f"Yours: model.safetensors ({names[0][-9:-1]})",
        f"Yours: model.safetensors ({names[0][-9:-1]}) (2)"]


def test_non_finite_counts_nan_and_infinity_and_not_an_overflowing_sum():
    from resnet_demo.core.weights.exact import non_finite

    big = torch.full((4,), 3e38)  # every value finite, their float32 sum is not
    assert non_finite(big) == 0
    t = torch.zeros(10, dtype=torch.float16)
    t[2], t[7] = float("nan"), float("-inf")
    assert non_finite(t) == 2
    assert non_finite(torch.zeros(3, dtype=torch.long)) == 0
    assert non_finite(torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)) == 1
