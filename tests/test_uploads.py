"""Your own model in the page: uploaded through the real server, kept per session, bounded, hostile files refused."""

import gc
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from appserver import weights_dir
from PIL import Image
from tutorial_net import Net

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from resnet_demo.core.explorer import Explorer  # noqa: E402
from resnet_demo.view.analysis_view import summarise  # noqa: E402
from resnet_demo.view.uploads import UserModels, default_class_names  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "examples" / "cifar10-dog-0.jpg"


@pytest.fixture(scope="module")
def server(app_server):
    """The shared server's URL (conftest): each test opens the sessions it needs."""
    return app_server.url


def client_for(url: str) -> Client:
    return Client(url, verbose=False)


def upload(client: Client, path: Path, *, preset="cifar10", arch="", classes="", custom=(32, "0.5", "0.25")):
    """The "Load my model" button: returns (model key, status text)."""
    size, mean, std = custom
    update, status, *_ = client.predict(handle_file(str(path)), None, classes, preset, arch, size, mean, std,
                                       api_name="/upload_model")
    return update["value"], status


def analyse(client: Client, key: str, image: Path = PHOTO):
    return client.predict(handle_file(str(image)), key, 5, "f", "", [], api_name="/analyze_photo")


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "my_resnet18.pth"
    torch.save(randomised(torchvision.models.resnet18(weights=None, num_classes=7), 1).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tutorial_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "my_tutorial_net.pth"
    torch.save(randomised(Net(), 2).state_dict(), path)
    return path


def library(path: Path, tmp_path: Path, **kwargs) -> Explorer:
    """The same checkpoint through the library (from a copy: the upload path deletes what it reads)."""
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    return Explorer.from_checkpoint(copy, device="cpu", **kwargs)


def assert_same_page(result, explorer: Explorer):
    preds, summary, blocks = result[0], result[5], result[7]
    want = explorer.analyze(str(PHOTO), k=5)
    assert preds["label"] == want.predictions[0].label
    got = {c["label"]: c["confidence"] for c in preds["confidences"]}
    for p in want.predictions:
        assert got[p.label] == pytest.approx(p.prob, abs=1e-5)
    assert summary == summarise(want)
    # A new model: the block chooser gets its blocks' names (the metrics table waits for its tab to open).
    assert [c[0] for c in blocks["choices"]] == [m.name for m in want.metrics]
    return want


def test_a_torchvision_resnet18_is_recognised_and_analysed_like_the_library(server, resnet18_file, tmp_path):
    client = client_for(server)
    names = "\n".join(f"kind {i}" for i in range(7))
    key, status = upload(client, resnet18_file, preset="imagenet", classes=names)
    assert key.startswith("upload:") and "resnet18" in status and "7 classes" in status
    want = assert_same_page(analyse(client, key),
                            library(resnet18_file, tmp_path, preset="imagenet", class_names=names.split("\n")))
    assert len(want.metrics) == 8 and want.metrics[0].name == "layer1.0"  # ResNet-18: 4 stages of 2 blocks
    assert want.predictions[0].label.startswith("kind ")


def test_the_tutorials_net_is_recognised_and_every_tool_works_with_it(server, tutorial_file, tmp_path):
    client = client_for(server)
    key, status = upload(client, tutorial_file)
    assert "tutorial" in status.lower() or "3 stages" in status
    want = assert_same_page(analyse(client, key),
                            library(tutorial_file, tmp_path, preset="cifar10",
                                    default_classes=lambda n: default_class_names("cifar10", n)))
    assert [m.name for m in want.metrics] == [f"res{i}" for i in range(1, 10)]
    preds, text = client.predict(key, 5, ["res3"], api_name="/lesion")
    assert "Without the branch of **res3**" in text
    chart, text, probes = client.predict(key, 5, api_name="/readout")
    assert Path(chart).is_file() and f"Final top-1: **{want.predictions[0].label}**" in text
    assert probes is None  # no linear probes are stored for an uploaded model


def test_another_session_can_neither_choose_nor_reach_an_uploaded_model(server, tutorial_file):
    first, second = client_for(server), client_for(server)
    key, _ = upload(first, tutorial_file)
    assert analyse(first, key)[0]["label"]
    # The selector of the second session does not offer the key (Gradio refuses a value outside a session's
    # choices), and the page's own check behind it says the same for a model that never existed.
    refused = r"not in the list of choices|not available in this session"
    with pytest.raises(AppError, match=refused):
        analyse(second, key)
    with pytest.raises(AppError, match=refused):
        analyse(second, "upload:999999")


def test_the_whole_pickled_model_is_refused_with_how_to_save_a_state_dict(server, tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(torchvision.models.resnet18(weights=None), path)
    with pytest.raises(AppError, match=r"state_dict\(\)"):
        upload(client_for(server), path)


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/resnet-demo-upload-ran-code")


def hostile_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a regular expression its message must match)."""
    files = {}
    MARKER.unlink(missing_ok=True)
    path = tmp / "runs_code.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": RunsCode()}))
    files["code"] = (path, r"holds Python objects, not only tensors \(it refers to posix\.system\).*unsafe pickles are refused")
    good = tmp / "good.pth"
    torch.save(Net().state_dict(), good)
    data = good.read_bytes()
    (tmp / "truncated.pth").write_bytes(data[: len(data) // 2])
    files["truncated"] = (tmp / "truncated.pth", r"truncated\.pth is a truncated or damaged zip archive")
    (tmp / "notes.pth").write_bytes(b"these are my notes, not a checkpoint\n" * 50)
    files["not a checkpoint"] = (tmp / "notes.pth", r"neither a safetensors file nor a PyTorch checkpoint")
    nan = Net().state_dict()
    nan["res2.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan, tmp / "nan.pth")
    files["nan"] = (tmp / "nan.pth", r"was refused because key 'res2\.conv1\.weight' holds 1 NaN or infinite value")
    lies = tmp / "lies.safetensors"
    header = b'{"fc.weight": {"dtype": "F32", "shape": [10, 256], "data_offsets": [0, 999999]}}'
    lies.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    files["lying header"] = (lies, r"tensor 'fc\.weight' lies at bytes \[0, 999999\) of the data but the file holds only 64")
    huge = tmp / "huge.safetensors"
    header = b'{"fc.weight": {"dtype": "F32", "shape": [1000000000, 1], "data_offsets": [0, 4000000000]}}'
    huge.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    files["1e9 parameters"] = (huge, r"holds 1,000,000,000 parameters, over the limit of 200,000,000")
    return files


def test_hostile_and_broken_files_get_a_sentence_and_change_nothing(server, tmp_path, tutorial_file):
    client = client_for(server)
    before = client.predict(handle_file(str(PHOTO)), "auto", 5, "f", "", [], api_name="/analyze_photo")[0]
    for name, (path, message) in hostile_files(tmp_path).items():
        with pytest.raises(AppError, match=message):
            upload(client, path)
        assert not MARKER.exists(), f"{name}: the pickle ran code"
    assert client.predict(handle_file(str(PHOTO)), "auto", 5, "f", "", [], api_name="/analyze_photo")[0] == before
    key, _ = upload(client, tutorial_file)  # and the session can still upload a good one
    assert analyse(client, key)[0]["label"]


def test_class_names_that_do_not_fit_the_head_are_refused(server, tutorial_file):
    with pytest.raises(AppError, match="3 class names were given, but the checkpoint's classifier has 10 classes"):
        upload(client_for(server), tutorial_file, classes="a, b, c")


@pytest.mark.slow  # the shipped models loaded
def test_the_page_refuses_another_sessions_model_even_past_the_selector(tmp_path):
    from resnet_demo.view.pages import Pages
    from resnet_demo.view.registry import default_registry
    from resnet_demo.view.results import Settings

    pages = Pages(default_registry("cpu", weights_dir(tmp_path)), UserModels())
    explorer = Explorer.from_weights(weights_dir(tmp_path) / "mnist_resnet.safetensors", "cpu")
    key, _ = pages.uploads.add("alice", explorer, "hers")
    assert pages.analyze(str(PHOTO), "photo", Settings(model_key=key, session="alice")).state.model_key == key
    with pytest.raises(Exception, match="not available in this session"):
        pages.analyze(str(PHOTO), "photo", Settings(model_key=key, session="bob"))


@pytest.mark.slow
def test_eviction_is_least_recently_used_and_frees_the_model():
    def model() -> Explorer:
        from resnet_demo.core.model import ResNetConfig, build_model
        from resnet_demo.core.weights.cards import tutorial_card

        return Explorer(build_model(ResNetConfig(widths=(8, 16), blocks=(1, 1))), tutorial_card(), "cpu")

    store = UserModels(per_session=2, total=3)
    a, b = model(), model()
    ka, _ = store.add("s1", a, "a")
    kb, _ = store.add("s1", b, "b")
    store.get("s1", ka)  # a is now more recently used than b
    gone = weakref.ref(b)
    del b
    kc, evicted = store.add("s1", model(), "c")
    assert evicted == ["b"] and [k for _, k in store.choices("s1")] == [ka, kc]
    gc.collect()
    assert gone() is None, "an evicted model must not stay in memory"
    with pytest.raises(Exception, match="not available in this session"):
        store.get("s1", kb)
    kd, evicted = store.add("s2", model(), "d")
    ke, evicted = store.add("s2", model(), "e")  # 4 in the server > 3: the least recently used of all goes
    assert evicted == ["a"] and len(store) == 3
    assert store.end_session("s2") == 2 and store.choices("s2") == [] and len(store) == 1


def test_the_weights_held_are_bounded_in_bytes():
    from resnet_demo.core.model import ResNetConfig, build_model
    from resnet_demo.core.weights.cards import tutorial_card

    def model(width: int) -> Explorer:
        return Explorer(build_model(ResNetConfig(widths=(width, width), blocks=(1, 1))), tutorial_card(), "cpu")

    small = model(8)
    by_hand = sum(t.numel() * t.element_size() for t in [*small.model.parameters(), *small.model.buffers()])
    assert small.nbytes == by_hand > 0
    store = UserModels(per_session=3, total=8, max_bytes=2 * small.nbytes + small.nbytes // 2)
    ka, _ = store.add("s1", small, "a")
    kb, _ = store.add("s2", model(8), "b")
    assert store.held_bytes() == 2 * small.nbytes
    with pytest.raises(Exception, match=r"weights take [\d,]+ MiB; this server holds at most"):
        UserModels(max_bytes=small.nbytes - 1).add("s1", model(8), "too large")
    store.get("s2", kb)  # a is now the least recently used
    kc, evicted = store.add("s2", model(8), "c")  # a third small one is over the bytes, not over the count
    assert evicted == ["a"] and len(store) == 2 and store.held_bytes() <= store.max_bytes
    with pytest.raises(Exception, match="not available in this session"):
        store.get("s1", ka)


def test_uploads_can_be_turned_off(app_servers):
    client = app_servers.get(uploads=False).client()
    assert "/upload_model" not in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    with pytest.raises(AppError, match="not in the list of choices|turned off"):
        analyse(client, "upload:1")


def test_the_image_limit_still_holds_while_checkpoints_may_be_larger(server, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(big)
    with big.open("ab") as f:
        f.write(b"\0" * (11 * 2**20))
    with pytest.raises(AppError, match="the limit is 10 MiB"):
        analyse(client_for(server), "auto", big)


def test_sessions_uploading_and_analysing_at_once_see_only_their_own(server, resnet18_file, tutorial_file, tmp_path):
    # Two sessions at the same time, each uploading its own model and analysing with it, twice over: every
    # answer must be its own model's (the resnet18 has 7 classes named kind 0..6, the tutorial's Net CIFAR-10's).
    import threading

    names = "\n".join(f"kind {i}" for i in range(7))
    jobs = {"r18": (resnet18_file, dict(preset="imagenet", classes=names)), "net": (tutorial_file, {})}
    results, errors = {}, []

    def session(name):
        try:
            client = client_for(server)
            path, kwargs = jobs[name]
            copy = tmp_path / f"{name}-{path.name}"
            copy.write_bytes(path.read_bytes())
            key, _ = upload(client, copy, **kwargs)
            results[name] = [analyse(client, key)[0] for _ in range(2)]
        except Exception as exc:  # noqa: BLE001 - reported below with the session's name
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=session, args=(n,)) for n in jobs]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    assert errors == []
    r18 = library(resnet18_file, tmp_path, preset="imagenet", class_names=names.split("\n")).analyze(str(PHOTO), k=5)
    net = library(tutorial_file, tmp_path, preset="cifar10",
                  default_classes=lambda n: default_class_names("cifar10", n)).analyze(str(PHOTO), k=5)
    assert [p["label"] for p in results["r18"]] == [r18.predictions[0].label] * 2
    assert [p["label"] for p in results["net"]] == [net.predictions[0].label] * 2
    assert all(c["label"].startswith("kind ") for p in results["r18"] for c in p["confidences"])
    assert not any(c["label"].startswith("kind ") for p in results["net"] for c in p["confidences"])
