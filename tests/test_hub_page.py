"""Library models reach the page: ``--hub MODEL_ID`` and ``--weights`` with a config.json beside it (the registry),
the "Your model" panel's Hub box and config uploads (Pages), ``--no-hub`` refusing; against the stand-in Hub."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomise_bn
from hubstub import Repo, StubHub
from safetensors.torch import save, save_file

from resnet_demo.core.errors import WeightsError
from resnet_demo.view.pages import Pages
from resnet_demo.view.registry import HUB_PREFIX, Registry
from resnet_demo.view.results import UploadRequest
from resnet_demo.view.uploads import UserModels

timm = pytest.importorskip("timm")
pytest.importorskip("huggingface_hub")

IMAGE = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
CONFIG = {"architecture": "resnet10t", "num_classes": 3, "label_names": ["ant", "bee", "cat"],
          "pretrained_cfg": {"input_size": [3, 176, 176], "crop_pct": 0.875, "interpolation": "bicubic",
                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}


def source() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_bn(timm.create_model("resnet10t", pretrained=False, num_classes=3))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    files = {"model.safetensors": save(state(source())), "config.json": json.dumps(CONFIG).encode()}
    with StubHub({"timm/resnet10t.test": Repo(files, parameters=5_000_000)}) as stub:
        monkeypatch.setenv("HF_ENDPOINT", stub.url)
        yield stub


def same_logits(explorer) -> None:
    with torch.inference_mode():
        want = source()(IMAGE)
    assert torch.allclose(explorer.logits(IMAGE), want, atol=1e-5, rtol=0)


def test_hub_on_the_command_line_is_loaded_at_start_and_failures_keep_their_sentence(hub):
    registry = Registry([])
    key = registry.add_hub("timm/resnet10t.test", device="cpu")
    missing = registry.add_hub("someone/nothing-here")
    registry.load_all()
    assert key == HUB_PREFIX + "timm/resnet10t.test"
    explorer = registry.get(key)
    same_logits(explorer)
    assert explorer.card.classes == ["ant", "bee", "cat"]
    assert "there is no public model someone/nothing-here on the Hub" in registry.failed[missing]
    assert any("not available" in line and "someone/nothing-here" in line for line in registry.status())
    with pytest.raises(WeightsError, match="not a Hugging Face model id"):
        registry.add_hub("not an id")


def test_the_pages_hub_box_adds_a_session_model_and_no_hub_refuses(hub):
    pages = Pages(Registry([]), UserModels(per_session=1, total=2))
    said = []
    view = pages.from_hub("s1", " https://huggingface.co/timm/resnet10t.test ", lambda f, words: said.append(words))
    assert said and "Downloading timm/resnet10t.test" in said[0]
    assert (view.label, view.key) in [(label, key) for label, key in view.choices]
    same_logits(pages.explorer(view.key, "photo", "s1")[1])
    with pytest.raises(WeightsError):  # another session does not see it
        pages.explorer(view.key, "photo", "s2")
    again = pages.from_hub("s1", "timm/resnet10t.test")  # the session's bound of 1: the first goes
    assert "Made room" in again.text
    refusing = Pages(Registry([]), UserModels(), hub=False)
    with pytest.raises(WeightsError, match="turned off"):
        refusing.from_hub("s1", "timm/resnet10t.test")
    assert not [p for m, p in hub.requests if m == "GET" and p.endswith("model.safetensors")][1:]


def test_weights_with_a_config_beside_and_an_upload_with_its_config_open_as_timm_says(tmp_path):
    folder = tmp_path / "cli"
    folder.mkdir()
    save_file(state(source()), folder / "weights.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    registry = Registry([])
    registry.add_custom(str(folder / "weights.safetensors"), device="cpu")
    registry.load_all()
    explorer = registry.get("custom")
    same_logits(explorer)
    assert explorer.card.classes == ["ant", "bee", "cat"] and explorer.card.input_size == 176

    pages = Pages(Registry([]), UserModels())
    save_file(state(source()), tmp_path / "upload.safetensors")
    (tmp_path / "upload-config.json").write_text(json.dumps(CONFIG))
    view = pages.upload("s", str(tmp_path / "upload.safetensors"),
                        UploadRequest(preset="auto", config_files=(str(tmp_path / "upload-config.json"),)))
    uploaded = pages.explorer(view.key, "photo", "s")[1]
    assert uploaded.card.classes == ["ant", "bee", "cat"] and uploaded.card.input_size == 176
    assert not (tmp_path / "upload.safetensors").exists() and not (tmp_path / "upload-config.json").exists()
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    save_file(state(source()), tmp_path / "again.safetensors")
    with pytest.raises(WeightsError, match="neither a timm or transformers config.json"):
        pages.upload("s", str(tmp_path / "again.safetensors"),
                     UploadRequest(preset="auto", config_files=(str(tmp_path / "other.json"),)))
    assert not (tmp_path / "again.safetensors").exists()


def test_the_command_line_and_the_page(hub, tmp_path):
    from appserver import weights_dir

    import app

    args = app.parse_args(["--hub", "timm/resnet10t.test", "--weights-dir", str(weights_dir(tmp_path)),
                           "--device", "cpu", "--no-hub"])
    assert args.no_hub and args.hub == ["timm/resnet10t.test"]
    registry = app.build_registry(args)
    same_logits(registry.get(HUB_PREFIX + "timm/resnet10t.test"))

    def endpoints(demo) -> set:
        return {getattr(fn, "api_name", None) for fn in demo.fns.values()}

    with_box = app.make_demo(registry, uploads=UserModels())
    without = app.make_demo(registry, uploads=UserModels(), hub=False)
    assert "model_from_hub" in endpoints(with_box) and "upload_model" in endpoints(with_box)
    assert "model_from_hub" not in endpoints(without) and "upload_model" in endpoints(without)
    with pytest.raises(SystemExit, match="not a Hugging Face model id"):
        app.build_registry(app.parse_args(["--hub", "no id", "--weights-dir", str(weights_dir(tmp_path))]))
