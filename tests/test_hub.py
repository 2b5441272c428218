"""Models from the Hub by name, against a stand-in Hub on 127.0.0.1 (tests/hubstub.py) serving checkpoints made
here in each real layout; hostile repositories (a pickle that would run code, sizes that lie) refused with nothing
run and the download stopped."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import randomise_bn
from hostile import hostile
from hubstub import Repo, StubHub
from safetensors.torch import save

from resnet_demo.core.capture import capture_forward
from resnet_demo.core.errors import WeightsError
from resnet_demo.core.weights.hub import HubError, choose_weights, normalise_model_id, open_from_hub

timm = pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

IMAGE = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """HF_HOME in tmp_path, the Hub's offline mode on as the app sets it; the endpoint set by each test."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def serve(monkeypatch, repos: dict[str, Repo]) -> StubHub:
    stub = StubHub(repos)
    monkeypatch.setenv("HF_ENDPOINT", stub.url)
    return stub


def st_bytes(model: torch.nn.Module) -> bytes:
    return save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})


def timm_source() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_bn(timm.create_model("resnet10t", pretrained=False, num_classes=3))


TIMM_CONFIG = {"architecture": "resnet10t", "num_classes": 3, "label_names": ["ant", "bee", "cat"],
               "pretrained_cfg": {"input_size": [3, 176, 176], "crop_pct": 0.875, "interpolation": "bicubic",
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}


def test_a_timm_model_by_name_is_downloaded_once_cached_and_opened_with_its_config(hub_env, monkeypatch):
    from huggingface_hub import constants

    source = timm_source()
    files = {"model.safetensors": st_bytes(source), "config.json": json.dumps(TIMM_CONFIG).encode(),
             "README.md": b"# a model"}
    with serve(monkeypatch, {"timm/resnet10t.test": Repo(files, parameters=5_000_000)}) as hub:
        model, card = open_from_hub("hf-hub:timm/resnet10t.test")
        assert constants.HF_HUB_OFFLINE is True  # lifted for the call only
        with torch.inference_mode():
            want = source(IMAGE)
        logits, records = capture_forward(model, IMAGE)
        assert torch.allclose(logits, want, atol=1e-5, rtol=0) and len(records) == 4
        assert card.name == "timm/resnet10t.test" and card.classes == ["ant", "bee", "cat"]
        assert (card.input_size, card.resize) == (176, 201)
        assert card.training["hub"] == {"model_id": "timm/resnet10t.test", "revision": Repo(files).sha,
                                        "file": "model.safetensors"}
        gets = [p for m, p in hub.requests if m == "GET" and p.endswith("/model.safetensors")]
        assert len(gets) == 1 and not any(p.endswith("README.md") for _, p in hub.requests)
        again, _ = open_from_hub("https://huggingface.co/timm/resnet10t.test")
        assert len([p for m, p in hub.requests if m == "GET" and p.endswith("/model.safetensors")]) == 1
    assert list((hub_env / "hf" / "hub").glob("models--timm--resnet10t.test/snapshots/*/model.safetensors"))


def test_a_transformers_model_by_name_takes_its_labels_and_preprocessing(hub_env, monkeypatch):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=2,
                          id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1})
    source = randomise_bn(ResNetForImageClassification(config))
    files = {"model.safetensors": st_bytes(source), "config.json": config.to_json_string().encode(),
             "preprocessor_config.json": json.dumps({"crop_pct": 0.875, "image_mean": [0.5, 0.5, 0.5],
                                                     "image_std": [0.5, 0.5, 0.5], "size": 224}).encode()}
    with serve(monkeypatch, {"microsoft/resnet-test": Repo(files)}):
        model, card = open_from_hub("microsoft/resnet-test")
    with torch.inference_mode():
        assert torch.allclose(model(IMAGE), source(IMAGE).logits, atol=1e-5, rtol=0)
    assert card.classes == ["no", "yes"] and (card.input_size, card.resize, card.mean) == (224, 256, [0.5] * 3)


def test_a_pickle_is_taken_only_without_safetensors_and_read_weights_only(hub_env, monkeypatch):
    source = timm_source()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    files = {"pytorch_model.bin": buffer.getvalue(), "model.safetensors": st_bytes(source)}
    with serve(monkeypatch, {"a/both": Repo(files), "a/pickle": Repo({"pytorch_model.bin": buffer.getvalue()})}) as hub:
        open_from_hub("a/both")
        assert not any(p.endswith("pytorch_model.bin") for _, p in hub.requests)
        model, card = open_from_hub("a/pickle")
    with torch.inference_mode():
        assert torch.allclose(model(IMAGE), source(IMAGE), atol=1e-5, rtol=0)
    assert card.training["hub"]["file"] == "pytorch_model.bin"


def test_a_pickle_that_would_run_code_is_refused_with_nothing_run(hub_env, monkeypatch):
    marker = hub_env / "ran"
    payload = hostile(hub_env, marker, "zip.pth").read_bytes()
    with serve(monkeypatch, {"evil/model": Repo({"pytorch_model.bin": payload})}):
        with pytest.raises(WeightsError) as err:
            open_from_hub("evil/model")
    assert not marker.exists()
    assert "evil/model (pytorch_model.bin)" in str(err.value)


def test_a_file_larger_than_the_hub_said_is_stopped_mid_download(hub_env, monkeypatch):
    real = st_bytes(timm_source())  # ~20 MB: several chunks of the client's download
    repo = Repo({"model.safetensors": real}, claimed={"model.safetensors": 1000}, extra={"model.safetensors": 0})
    with serve(monkeypatch, {"liar/model": repo}):
        with pytest.raises(HubError, match=r"liar/model's model.safetensors is larger than the 1,000 bytes the Hub "
                                           r"said it is; the download was stopped"):
            open_from_hub("liar/model")
    assert not list((hub_env / "hf").rglob("model.safetensors"))


def test_sizes_and_parameter_counts_over_the_bounds_are_refused_before_any_download(hub_env, monkeypatch):
    files = {"model.safetensors": b"x" * 100}
    repos = {"big/file": Repo(files, claimed={"model.safetensors": 600 * 2**20}),
             "big/params": Repo(files, parameters=300_000_000),
             "big/headers": Repo(files, head_size={"model.safetensors": 600 * 2**20})}
    with serve(monkeypatch, repos) as hub:
        with pytest.raises(HubError, match=r"big/file's model.safetensors is 600 MiB according to the Hub, over the "
                                           r"limit of 512 MiB for a checkpoint; it was not downloaded"):
            open_from_hub("big/file")
        with pytest.raises(HubError, match=r"big/params has 300,000,000 parameters according to the Hub, over the "
                                           r"limit of 200,000,000; it was not downloaded"):
            open_from_hub("big/params")
        assert not any("/resolve/" in p for _, p in hub.requests)
        with pytest.raises(HubError, match=r"big/headers's model.safetensors is 100 bytes according to the Hub's "
                                           r"listing but 600 MiB according to its download headers"):
            open_from_hub("big/headers")
    assert not any(m == "GET" and "/resolve/" in p for m, p in hub.requests)


def test_unknown_repositories_missing_weights_and_bad_ids_get_a_sentence(hub_env, monkeypatch):
    with serve(monkeypatch, {"a/readme": Repo({"README.md": b"no weights", "model.onnx": b"x"})}):
        with pytest.raises(HubError, match=r"there is no public model nobody/nothing on the Hub"):
            open_from_hub("nobody/nothing")
        with pytest.raises(HubError, match=r"a/readme on the Hub has no weights file this page reads .* it holds "
                                           r"README.md, model.onnx"):
            open_from_hub("a/readme")
        with pytest.raises(HubError, match=r"has no revision 'v9'"):
            open_from_hub("a/readme", revision="v9")
    for bad in ("resnet50", "../../etc/passwd", "a/b/c", "owner/na--me", ""):
        with pytest.raises(HubError, match="is not a Hugging Face model id"):
            normalise_model_id(bad)


def test_no_network_is_a_sentence_not_a_traceback(hub_env, monkeypatch):
    from resnet_demo.tools.loadtest import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(HubError, match=r"the Hub could not be reached for timm/resnet18"):
        open_from_hub("timm/resnet18")


def test_the_weights_file_is_chosen_safetensors_first():
    assert choose_weights(["pytorch_model.bin", "model.safetensors", "tf_model.h5"]) == "model.safetensors"
    assert choose_weights(["open_clip_model.safetensors", "pytorch_model.bin"]) == "open_clip_model.safetensors"
    assert choose_weights(["pytorch_model.bin", "sub/model.safetensors"]) == "pytorch_model.bin"
    assert choose_weights(["resnet18.pth", "README.md"]) == "resnet18.pth"
    assert choose_weights(["a.safetensors", "b.safetensors"]) is None
    assert choose_weights(["a.pth", "b.pth"]) is None
