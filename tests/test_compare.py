"""Compare mode through the real server: two models on one image, both results equal to the library's."""

from pathlib import Path

import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402

from resnet_demo.core.studies.evalsets import load_evalset  # noqa: E402
from resnet_demo.core.studies.similarity import block_similarity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "examples" / "cifar10-frog-0.jpg"


@pytest.fixture(scope="module")
def server(app_server):
    """The shared server (conftest), with a session of this module's own."""
    return app_server.client(), app_server.registry


def confidences(label: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label["confidences"]}


def test_two_models_on_one_image_match_the_library(server):
    client, registry = server
    client.predict(handle_file(str(PHOTO)), "cifar10", 5, "f", "", [], api_name="/analyze_photo")
    text, preds_a, preds_b, chart, detail_a, detail_b, sweeps, readouts = client.predict(
        "cifar10", 5, "mnist", "f", api_name="/compare")
    for label, key in ((preds_a, "cifar10"), (preds_b, "mnist")):
        want = registry.get(key).analyze(str(PHOTO), k=5)  # each model's card decides its preprocessing
        assert label["label"] == want.predictions[0].label
        got = confidences(label)
        for p in want.predictions:
            assert got[p.label] == pytest.approx(p.prob, abs=1e-6)
    assert "A (**cifar10_resnet**)" in text and "B (**mnist_resnet**)" in text
    assert Image.open(chart).size[1] == 320
    assert Image.open(sweeps).size[0] > Image.open(readouts).size[0] / 2 > 0


def test_block_similarity_through_the_server_is_the_librarys(server):
    client, registry = server
    image, text = client.predict("cifar10", 5, "cifar10", api_name="/similarity")
    assert Image.open(image).size[0] > 300
    assert "500 images of `cifar10_test500`" in text
    # A against itself: each block's best match is itself, with CKA 1.00.
    a = registry.get("cifar10")
    for i in range(1, 10):
        assert f"res{i}→res{i} (1.00)" in text
    sim = block_similarity(a, a, load_evalset("cifar10_test500").images[:100], batch_size=100)
    assert torch.allclose(torch.diagonal(sim.matrix), torch.ones(9, dtype=torch.float64), atol=1e-9)
