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
