"""The data-set tab: the error browser over the shipped evaluation set or a visitor's labelled ZIP."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_demo.core.errors import DataError
from resnet_demo.core.studies.evalsets import load_evalset
from resnet_demo.view.dataset_page import SHIPPED_SET, USER_SET, SetFilter
from resnet_demo.view.error_view import confusion_layout
from resnet_demo.view.pages import Pages
from resnet_demo.view.registry import default_registry
from resnet_demo.view.results import Settings

SETTINGS = Settings("mnist", 3, session="s1")
pytestmark = pytest.mark.slow  # the shipped models over a 500-image evaluation set


@pytest.fixture(scope="module")
def pages():
    registry = default_registry("cpu")
    registry.load_all()
    return Pages(registry)


@pytest.fixture(scope="module")
def mnist_logits(pages):
    e = pages.registry.get("mnist")
    data = load_evalset("mnist_test500")
    return data, e.logits(e.batch_input(data.images))


def test_the_gallery_shows_the_wrong_images_most_confident_first(pages, mnist_logits):
    data, logits = mnist_logits
    v = pages.dataset(SETTINGS, "drawing", SHIPPED_SET, SetFilter())
    pred = logits.argmax(1)
    wrong = (pred != data.labels).nonzero().flatten().tolist()
    conf = torch.softmax(logits, 1).max(1).values
    assert v.shown == sorted(wrong, key=lambda i: -float(conf[i]))
    assert f"{1 - len(wrong) / 500:.1%}" in v.summary and "of 500 images of mnist_test500" in v.summary
    assert len(v.gallery) == len(wrong) and v.classes == [str(d) for d in range(10)]
    # Every right image of class 7, in set order.
    v = pages.dataset(SETTINGS, "drawing", SHIPPED_SET, SetFilter("right", "7", None, "index"))
    assert v.shown == [i for i in range(500) if data.labels[i] == 7 and pred[i] == 7]
    assert v.gallery[0][1] == f"7 ✓ {float(conf[v.shown[0]]):.0%}"


def test_a_click_on_a_cell_filters_by_its_classes_and_a_pick_sends_the_image(pages, mnist_logits):
    data, logits = mnist_logits
    layout = confusion_layout([str(d) for d in range(10)])
    x, y = layout.left + 3.5 * layout.cell, layout.top + 3.5 * layout.cell  # the diagonal cell of class 3
    filt, v = pages.dataset_click(SETTINGS, "drawing", SHIPPED_SET, SetFilter(), x, y)
    assert filt == SetFilter("all", "3", "3", "confidently_wrong")
    pred = logits.argmax(1)
    assert sorted(v.shown) == [i for i in range(500) if data.labels[i] == 3 and pred[i] == 3]
    image = pages.dataset_pick(SETTINGS, "drawing", SHIPPED_SET, v.shown, 2)
    assert np.array_equal(np.asarray(image), data.images[v.shown[2], 0].numpy())
    with pytest.raises(ValueError, match="no longer in the gallery"):
        pages.dataset_pick(SETTINGS, "drawing", SHIPPED_SET, v.shown, len(v.shown))


def labelled_zip(path: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, (img, label) in enumerate(zip(images, labels)):
            png = io.BytesIO()
            Image.fromarray(img[0].numpy()).save(png, format="PNG")
            z.writestr(f"digits/{int(label)}/{i:03d}.png", png.getvalue())
    path.write_bytes(buf.getvalue())
    return path


def test_a_visitors_zip_is_read_for_this_session_only_and_deleted(pages, tmp_path):
    data = load_evalset("mnist_test500")
    upload = labelled_zip(tmp_path / "mine.zip", data.images[:40], data.labels[:40])
    v = pages.dataset_upload(SETTINGS, "drawing", str(upload), "mine.zip", SetFilter("all", None, None, "index"))
    assert not upload.exists()  # deleted once read
    assert "Read 40 images" in v.summary and "of 40 images of mine.zip" in v.summary
    assert v.shown == list(range(40))
    other = Settings("mnist", 3, session="s2")
    with pytest.raises(DataError, match="No labelled set of yours"):
        pages.dataset(other, "drawing", USER_SET, SetFilter())
    pages.end_session("s1")
    with pytest.raises(DataError, match="No labelled set of yours"):
        pages.dataset(SETTINGS, "drawing", USER_SET, SetFilter())
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError):
        pages.dataset_upload(SETTINGS, "drawing", str(bad), "bad.zip", SetFilter())
    assert not bad.exists()
    with pytest.raises(ValueError, match="Choose a ZIP file first"):
        pages.dataset_upload(SETTINGS, "drawing", None, None, SetFilter())


def test_the_error_browser_through_the_real_server(app_server):
    pytest.importorskip("gradio_client")
    client, registry = app_server.client(), app_server.registry  # the shared server (conftest), a session of its own
    summary, confusion, gallery, count, true, predicted = client.predict(
        "mnist", 3, SHIPPED_SET, "wrong", "(any)", "(any)", "confidently_wrong", api_name="/dataset")
    e = registry.get("mnist")
    data = load_evalset("mnist_test500")
    pred = e.logits(e.batch_input(data.images)).argmax(1)
    wrong = int((pred != data.labels).sum())
    assert len(gallery) == wrong and f"{wrong} image(s) match" in count
    assert Image.open(confusion).size[0] > 300


def test_the_lesion_study_is_the_cards_or_computed_for_another_model(pages, tmp_path):
    import json

    from test_timeline import write_run

    from resnet_demo.core.explorer import Explorer
    from resnet_demo.core.weights.cards import WEIGHTS_DIR
    from resnet_demo.view.dataset_page import lesion_study

    stored = json.loads((WEIGHTS_DIR / "mnist_resnet.json").read_text())
    study = stored["studies"].get("lesions")
    if study is None:
        pytest.skip("the shipped MNIST card has no lesion study")
    v = pages.lesion_study(SETTINGS, "drawing")
    assert f"intact accuracy {study['accuracy']['none']:.1%}" in v.text and "stored in the model card" in v.text
    assert pages.lesion_study(SETTINGS, "drawing") is v  # cached
    # A model without a stored study: computed now over the shipped test digits; "none" is its plain accuracy.
    run = write_run(tmp_path / "tiny_timeline", steps=(5,))
    tiny = Explorer.from_weights(run / "step-000005.safetensors", "cpu")
    data = load_evalset("mnist_test500")
    v = lesion_study(tiny)
    acc = (tiny.logits(tiny.batch_input(data.images)).argmax(1) == data.labels).double().mean().item()
    assert f"intact accuracy {acc:.1%}" in v.text and "500 images of mnist_test500, computed now" in v.text
    assert v.lesion_map.size[0] > 400 and v.alpha_chart.size[0] > 400


def test_the_lesion_study_through_the_real_server_takes_the_tabs_source(app_server):
    pytest.importorskip("gradio_client")
    client = app_server.client()  # a session of its own: it gave no ZIP
    with pytest.raises(Exception, match="No labelled set of yours for mnist_resnet"):
        client.predict("mnist", 3, USER_SET, api_name="/lesion_study")
