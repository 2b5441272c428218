"""The app through its real server, called with gradio_client as a remote user would."""

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from appserver import inline_image
from conftest import IN_CI, ROOT
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app  # noqa: E402
from resnet_demo.view.analysis_view import build_page  # noqa: E402

SETTINGS = ("auto", 5, "f", "res9", [])


@pytest.fixture(scope="module")
def server(app_server):
    """The shared server (conftest), with a session of this module's own."""
    return app_server.client(), app_server.registry


def cifar_example():
    return next(p for p in app.EXAMPLES if p.name.startswith("cifar10-cat"))


def test_photo_through_the_server_matches_the_library(server):
    client, registry = server
    path = cifar_example()
    preds, model_input, grids, chart, table, summary, detail, dropdown, lesion_choices = client.predict(
        handle_file(str(path)), *SETTINGS, api_name="/analyze_photo"
    )
    want = registry.get("cifar10").analyze(str(path), k=5)
    assert preds["label"] == want.predictions[0].label
    got = {c["label"]: c["confidence"] for c in preds["confidences"]}
    for p in want.predictions:
        assert got[p.label] == pytest.approx(p.prob, abs=1e-6)
    # One strip of the 9 blocks' grids, each in a slot of the same width, as the library draws it.
    strip = inline_image(grids)
    want_strip = build_page(want).grids
    assert strip.size == want_strip.image.size and strip.size[0] == 9 * want_strip.pitch - (want_strip.pitch - want_strip.slot)
    assert np.array_equal(np.asarray(strip.convert("RGB")), np.asarray(want_strip.image.convert("RGB")))
    assert inline_image(model_input).size == (32, 32)  # its own pixels: the browser enlarges them (CSS pixelated)
    assert inline_image(detail).size[0] > want_strip.slot  # res9: all 256 channels
    # The residual chart and table are emptied: drawn only once their tab is opened.
    assert chart is None and table["data"] == [], (chart, table)
    chart, table = client.predict("auto", 5, api_name="/residual")
    assert Image.open(chart).size[1] == 300
    assert table["headers"] == ["block", "stage", "ratio", "cosine", "norm_x", "norm_f", "norm_y", "active"]
    for row, m in zip(table["data"], want.metrics):
        assert row[0] == m.name and row[1] == m.stage
        for value, key in zip(row[2:], ("ratio", "cosine", "norm_x", "norm_f", "norm_y", "active")):
            assert value == pytest.approx(getattr(m, key), abs=1e-4)
    assert want.predictions[0].label in summary
    if registry.get("cifar10").card.trained:
        assert preds["label"] == "cat"


def test_drawing_selects_the_mnist_model(server):
    client, registry = server
    canvas = np.full((280, 280, 4), 255, np.uint8)
    canvas[60:220, 130:150, :3] = 0  # a vertical stroke: a "1"
    files = []
    for name, arr in (("bg", canvas), ("composite", canvas)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        p = Path(client.output_dir if hasattr(client, "output_dir") else "/tmp") / f"sketch-{name}.png"
        p.write_bytes(buf.getvalue())
        files.append(str(p))
    value = {"background": handle_file(files[0]), "layers": [], "composite": handle_file(files[1]), "id": None}
    preds, *_ = client.predict(value, *SETTINGS, api_name="/analyze_drawing")
    want = registry.get("mnist").analyze(Image.open(files[1]))
    assert preds["label"] == want.predictions[0].label
    assert set(c["label"] for c in preds["confidences"]) <= {str(d) for d in range(10)}
    if registry.get("mnist").card.trained:
        assert preds["label"] == "1"


def test_bad_inputs_get_a_clear_message_and_the_server_keeps_serving(server, tmp_path):
    client, _ = server
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(text)), *SETTINGS, api_name="/analyze_photo")
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (100, 100), (255, 255, 255, 255)).save(blank)
    value = {"background": handle_file(str(blank)), "layers": [], "composite": handle_file(str(blank)), "id": None}
    with pytest.raises(AppError, match="drawing is empty"):
        client.predict(value, *SETTINGS, api_name="/analyze_drawing")
    preds, *_ = client.predict(handle_file(str(cifar_example())), *SETTINGS, api_name="/analyze_photo")
    assert preds["label"]


def test_missing_weights_are_reported_not_replaced(tmp_path):
    from resnet_demo.view.registry import default_registry

    registry = default_registry("cpu", tmp_path)
    registry.load_all()
    status = "\n".join(registry.status())
    assert f"{tmp_path}/cifar10_resnet.safetensors not found" in status
    with pytest.raises(Exception, match="CIFAR-10 \\(photos\\) model is not available"):
        registry.get("cifar10")


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import socket, sys, urllib.request
    sys.path[:0] = [{root!r}, {tests!r}]
    attempts = []
    real_connect = socket.socket.connect
    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if not (host.startswith("127.") or host in ("::1", "localhost") or self.family == socket.AF_UNIX):
            attempts.append(address)
        return real_connect(self, address)
    socket.socket.connect = connect
    real_getaddrinfo = socket.getaddrinfo
    def getaddrinfo(host, *a, **k):
        if host not in (None, "localhost", "127.0.0.1", "::1", "0.0.0.0"):
            attempts.append(host)
        return real_getaddrinfo(host, *a, **k)
    socket.getaddrinfo = getaddrinfo

    from pathlib import Path
    from appserver import running_app, weights_dir
    import tempfile
    with running_app(weights_dir(Path(tempfile.mkdtemp()))) as (url, registry):
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        config = urllib.request.urlopen(url + "config", timeout=30).read().decode()
        from gradio_client import Client, handle_file
        import app
        client = Client(url, verbose=False)
        preds = client.predict(handle_file(str(app.EXAMPLES[0])), "auto", 5, "f", "res9", [], api_name="/analyze_photo")[0]
    assert "fonts.googleapis" not in page + config, "the page refers to Google Fonts"
    print("PREDICTED", preds["label"])
    print("ATTEMPTS", attempts)
    """
)


@pytest.mark.slow  # a fresh interpreter in a network namespace, starting the app
def test_app_starts_and_answers_with_no_network(tmp_path):
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        if IN_CI:
            pytest.fail(f"unshare -n is needed for the offline test: {probe.stderr.decode()}")
        pytest.skip("no network namespaces here (unshare -n failed)")
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {sys.executable} {script}"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PREDICTED" in result.stdout
    assert "ATTEMPTS []" in result.stdout, result.stdout


def test_insight_tools_through_the_server(server):
    import json
    import zipfile

    from resnet_demo.core.insight import lesion, readout

    client, registry = server
    path = cifar_example()
    client.predict(handle_file(str(path)), *SETTINGS, api_name="/analyze_photo")
    explorer = registry.get("cifar10")
    analysis = explorer.analyze(str(path))

    preds, text = client.predict("auto", 5, ["res5", "res8"], api_name="/lesion")
    want = lesion(explorer.model, analysis.input, ["res5", "res8"], explorer.card.classes, 5)
    assert preds["label"] == want.predictions[0].label
    assert f"KL(intact ‖ lesioned) = {want.kl:.3f}" in text
    # Graded: the branch scaled by α; α = 1 is the intact network exactly.
    preds, text = client.predict("auto", 5, ["res7"], 0.5, api_name="/lesion")
    want = lesion(explorer.model, analysis.input, ["res7"], explorer.card.classes, 5, alpha=0.5)
    assert preds["label"] == want.predictions[0].label and "scaled by α = 0.5" in text
    assert f"KL(intact ‖ lesioned) = {want.kl:.3f}" in text
    _, text = client.predict("auto", 5, ["res7"], 1, api_name="/lesion")
    assert "KL(intact ‖ lesioned) = 0.000" in text and "The top-1 is unchanged." in text

    chart, text, probes = client.predict("auto", 5, api_name="/readout")
    want = readout(explorer.model, analysis, explorer.card.classes)
    assert Path(chart).is_file() and f"Final top-1: **{want.final.label}**" in text
    if explorer.card.studies.get("probes"):  # the shipped model's linear probes, beside the head
        assert Image.open(probes).size[0] > 400 and "A linear probe reads the class at" in text

    cam, block, label = client.predict("auto", 5, "res7", "", api_name="/gradcam")  # an update: image and title
    assert Image.open(cam["value"]).size == (256, 256)
    assert cam["label"] == f"Grad-CAM for “{analysis.predictions[0].label}” at res7"
    assert block == {"__type__": "update", "choices": [[f"res{i}", f"res{i}"] for i in range(1, 10)], "value": "res7"}
    assert [c[0] for c in label["choices"]] == ["", *explorer.card.classes]
    # The choosers of another model (MNIST's class "7" after a switch): the defaults, and the title says so.
    cam, block, _ = client.predict("auto", 5, "layer4", "7", api_name="/gradcam")
    assert cam["label"] == (f"Grad-CAM for “{analysis.predictions[0].label}” at res9 (“layer4” is not a block of "
                            f"{explorer.card.name}; “7” is not a class of {explorer.card.name})")
    assert block["value"] == "res9"

    zip_path = client.predict("auto", 5, ["res5"], api_name="/export")
    with zipfile.ZipFile(zip_path) as zf:
        doc = json.loads(zf.read("analysis.json"))
        pngs = [n for n in zf.namelist() if n.endswith(".png")]
    assert doc["predictions"][0]["label"] == analysis.predictions[0].label
    assert [b["name"] for b in doc["blocks"]] == [m.name for m in analysis.metrics]
    assert doc["blocks"][3]["ratio"] == pytest.approx(analysis.metrics[3].ratio, rel=1e-9)
    assert doc["lesion"]["lesioned"] == ["res5"]
    assert len(pngs) >= 13  # input, chart, 9 grids, sweep, readout, grad-cam


def test_a_lesion_before_any_image_is_a_clear_error(server):
    client, _ = server
    fresh = Client(client.src, verbose=False)
    with pytest.raises(AppError, match="Analyse an image first"):
        fresh.predict("auto", 5, [], api_name="/lesion")


def test_the_server_forgets_the_page_state_of_sessions_beyond_its_capacity(own_app_server):
    # What --sessions bounds: with room for 2, a third session's first event drops the least recently used one's
    # analysis (the memory it held); the 2 most recent keep theirs. (Any event of a forgotten session starts a
    # new one, which drops the next least recent: the forgotten one is asked last.)
    server = own_app_server(state_session_capacity=2)
    photo = handle_file(str(cifar_example()))
    first, second, third = (server.client() for _ in range(3))
    for client in (first, second, third):
        client.predict(photo, *SETTINGS, api_name="/analyze_photo")
    for client in (second, third):
        assert "Without the branch of **res5**" in client.predict("auto", 5, ["res5"], api_name="/lesion")[1]
    with pytest.raises(AppError, match="Analyse an image first"):
        first.predict("auto", 5, [], api_name="/lesion")


@pytest.mark.slow  # main builds the page twice
def test_main_bounds_the_sessions_gradio_keeps(monkeypatch):
    # Gradio holds every session's page state until `state_session_capacity` newer ones arrive.
    import gradio as gr
    import torch

    import app

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.append(kw))
    threads = torch.get_num_threads()
    try:
        app.main(["--port", "7861"])
        app.main(["--port", "7861", "--sessions", "50", "--no-uploads"])
    finally:
        torch.set_num_threads(threads)  # main shares the cores out between requests; not for later tests
    assert [kw["state_session_capacity"] for kw in launched] == [app.SESSIONS, 50]
    # Gradio has one upload limit: the checkpoint's while uploaded models are on, else the image's.
    assert [kw["max_file_size"] for kw in launched] == [app.MAX_CHECKPOINT, app.MAX_UPLOAD]
