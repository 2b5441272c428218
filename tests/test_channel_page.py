"""What a channel responds to, in the page: a click on a tile of the enlarged block, the exemplars, the picture."""

from pathlib import Path

import pytest
from PIL import Image

from resnet_demo.core.studies.exemplars import exemplars_for
from resnet_demo.view.analysis_view import SCREEN, block_tensor
from resnet_demo.view.pages import Pages
from resnet_demo.view.registry import default_registry
from resnet_demo.view.render import rank_channels
from resnet_demo.view.results import PageState, Settings

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "examples" / "cifar10-ship-0.jpg"
pytestmark = pytest.mark.slow  # the shipped models loaded, exemplars drawn


@pytest.fixture(scope="module")
def pages():
    registry = default_registry("cpu")
    registry.load_all()
    return Pages(registry)


def test_a_click_on_a_tile_shows_that_channels_exemplars(pages):
    state = PageState(str(PHOTO), "photo", "cifar10", 5)
    settings = Settings("cifar10", 5, part="f", detail_block="res4")
    explorer = pages.registry.get("cifar10")
    analysis = explorer.analyze(str(PHOTO))
    fmap = block_tensor(analysis, "res4", "f")
    ranked = rank_channels(fmap)
    rep = SCREEN.detail_cell // fmap.shape[-1]
    pitch = fmap.shape[-1] * rep + SCREEN.pad
    # The first tile is the most active channel; the second tile of the second row is channel ranked[cols + 1].
    v = pages.channel_click(state, settings, SCREEN.pad + 1, SCREEN.pad + 1)
    assert v.channel == int(ranked[0]) and v.block == "res4" and v.part == "f"
    cols = int(len(ranked) ** 0.5 + 0.999999)
    v = pages.channel_click(state, settings, SCREEN.pad + pitch + 2, SCREEN.pad + pitch + 2)
    assert v.channel == int(ranked[cols + 1])
    assert pages.channel_click(state, settings, 0, 0) is None  # the padding: no channel
    # The text and grid are the stored exemplars of that channel.
    ex = exemplars_for(explorer).channel("res4", "f", v.channel)
    assert f"image #{ex.top[0].index} ({ex.top[0].value:.3f})" in v.text
    assert f"#{ex.bottom[0].index}, gives {ex.bottom[0].value:.3f}" in v.text
    assert v.exemplars.size[0] > 500 and v.on_image.size[0] >= 320
    with pytest.raises(ValueError, match="res4 F\\(x\\) has channels 0 to 127, not 128"):
        pages.channel(state, settings, 128)


def test_channel_and_visualisation_through_the_real_server(app_server):
    gradio_client = pytest.importorskip("gradio_client")
    client, registry = app_server.client(), app_server.registry  # the shared server (conftest), a session of its own
    client.predict(gradio_client.handle_file(str(PHOTO)), "cifar10", 5, "f", "", [], api_name="/analyze_photo")
    channel, text, on_image, exemplars = client.predict("cifar10", 5, "y", "res2", 7, api_name="/channel")
    assert channel == 7 and text.startswith("**res2 y, channel 7 of 64**")
    ex = exemplars_for(registry.get("cifar10")).channel("res2", "y", 7)
    assert f"image #{ex.top[0].index}" in text and "adds and removes" not in text  # y has no negative row
    assert Image.open(exemplars).size[0] > 500
    picture, words = client.predict("cifar10", 5, "f", "res1", 3, api_name="/visualise")
    assert Image.open(picture).size[0] >= 256
    assert words.startswith("Optimised in") and "F(x) reaches" in words and "y reaches" in words
