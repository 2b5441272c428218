"""Inside a residual block, in the page: the controller's numbers are the block's own, the export holds
``inside.json``, the API endpoint returns them, and in a browser a tile click leads to the figure and the sentence."""

import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from resnet_demo.view.analysis_view import SCREEN, block_tensor
from resnet_demo.view.inside_view import inside_figure, sentence, unit_text
from resnet_demo.view.pages import Pages
from resnet_demo.view.registry import default_registry
from resnet_demo.view.render import rank_channels
from resnet_demo.view.results import PageState, Settings

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "examples" / "cifar10-ship-0.jpg"


@pytest.fixture(scope="module")
def pages():
    registry = default_registry("cpu")
    registry.load_all()
    return Pages(registry)


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """(url, registry) of the shared app server (conftest's ``app_server``) where there is one, else of one started
    for this module as tests/test_browser.py did."""
    try:
        shared = request.getfixturevalue("app_server")
    except pytest.FixtureLookupError:
        from appserver import running_app, weights_dir

        with running_app(weights_dir(tmp_path_factory.mktemp("weights"))) as (url, registry):
            yield url, registry
    else:
        yield shared.url, shared.registry


def direct(registry, block: str, channel: int):
    explorer = registry.get("cifar10")
    return explorer.inside(explorer.analyze(str(PHOTO)), block, channel)


def steps_of(data: dict) -> dict:
    return {s["label"]: s for s in data["steps"]}


def test_the_views_numbers_are_a_direct_computations(pages):
    state = PageState(str(PHOTO), "photo", "cifar10", 5)
    settings = Settings("cifar10", 5, detail_block="res4")
    v = pages.inside(state, settings, "res4", 7)
    want = direct(pages.registry, "res4", 7)
    assert (v.block, v.channel, v.sentence) == ("res4", 7, sentence(want))
    assert v.words.startswith(f"**{sentence(want)}**") and v.image.size == inside_figure(want).image.size
    steps = steps_of(v.data)
    h, w = want.y.shape
    for row, col in ((0, 0), (3, 5), (h - 1, w - 1)):
        assert steps["F(x)+s(x)"]["map"][row][col] == pytest.approx(float(want.pre[row, col]), rel=1e-6, abs=1e-7)
        assert steps["y"]["map"][row][col] == pytest.approx(float(want.y[row, col]), rel=1e-6, abs=1e-7)
        assert steps["s(x)"]["map"][row][col] == pytest.approx(float(want.s[row, col]), rel=1e-6, abs=1e-7)
        assert steps[want.f_step.label]["map"][row][col] == pytest.approx(float(want.f[row, col]), rel=1e-6,
                                                                             abs=1e-7)
    # A click on the y map gives that position's sum; the state holds the view, so nothing is re-run.
    left, top, right, bottom = inside_figure(want).boxes["y"]
    x, y = left + (5.5 / w) * (right - left), top + (3.5 / h) * (bottom - top)
    kept, text = pages.inside_unit(v.state, settings, "res4", 7, x, y)
    assert text == unit_text(want, 3, 5) and kept.inside is v.state.inside
    assert pages.inside_unit(v.state, settings, "res4", 7, 0, 0)[1] is None  # the title: no map there
    with pytest.raises(ValueError, match="channel"):
        pages.inside(state, settings, "res4", 128)  # res4 has 128 channels


def test_a_tile_click_opens_the_tiles_channel(pages):
    state = PageState(str(PHOTO), "photo", "cifar10", 5)
    settings = Settings("cifar10", 5, part="f", detail_block="res4")
    ranked = rank_channels(block_tensor(pages.registry.get("cifar10").analyze(str(PHOTO)), "res4", "f"))
    v = pages.inside_click(state, settings, SCREEN.pad + 1, SCREEN.pad + 1)
    assert (v.block, v.channel) == ("res4", int(ranked[0]))
    assert pages.inside_click(state, settings, 0, 0) is None


def test_the_export_holds_inside_json_once_the_view_was_opened(pages, tmp_path):
    state = PageState(str(PHOTO), "photo", "cifar10", 5)
    settings = Settings("cifar10", 5)
    _, plain = pages.export(state, settings, tmp_path / "plain")
    with zipfile.ZipFile(plain) as zf:
        assert "inside.json" not in zf.namelist()
    v = pages.inside(state, settings, "res3", 2)
    _, path = pages.export(v.state, settings, tmp_path / "opened")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        inside = json.loads(zf.read("inside.json"))
        analysis = json.loads(zf.read("analysis.json"))
        figure = Image.open(io.BytesIO(zf.read("inside_res3_channel_2.png")))
    assert analysis["inside"] == "inside.json" and "inside_res3_channel_2.png" in analysis["images"]
    assert (inside["block"], inside["channel"]) == ("res3", 2)
    want = direct(pages.registry, "res3", 2)
    assert steps_of(inside)["y"]["map"][4][6] == pytest.approx(float(want.y[4, 6]), rel=1e-6, abs=1e-7)
    assert figure.size == inside_figure(want).image.size and "inside_res3_channel_2.png" in names


@pytest.mark.slow
def test_the_api_endpoint_returns_the_numbers_of_the_sessions_image(server):
    gradio_client = pytest.importorskip("gradio_client")
    url, registry = server
    client = gradio_client.Client(url, verbose=False)
    client.predict(gradio_client.handle_file(str(PHOTO)), "cifar10", 5, "f", "", [], api_name="/analyze_photo")
    data = json.loads(client.predict("cifar10", 5, "", "res2", 9, api_name="/inside"))  # inside.json's text
    want = direct(registry, "res2", 9)
    assert (data["block"], data["channel"]) == ("res2", 9)
    steps = steps_of(data)
    assert steps["F(x)+s(x)"]["map"][2][3] == pytest.approx(float(want.pre[2, 3]), rel=1e-6, abs=1e-7)
    assert steps["y"]["map"][2][3] == pytest.approx(float(want.y[2, 3]), rel=1e-6, abs=1e-7)


@pytest.mark.browser
@pytest.mark.slow
def test_a_tile_click_then_opening_the_view_shows_the_figure_and_the_sentence(server):
    from test_browser import ARTIFACTS, CHROMIUM, sync_api

    url, registry = server
    analysis = registry.get("cifar10").analyze(str(PHOTO))
    # The tile in row 8, column 8 of res9's 16 x 16 grid (as test_browser's channel test).
    chosen = int(rank_channels(block_tensor(analysis, "res9", "f"))[8 * 16 + 8])
    want = registry.get("cifar10").inside(analysis, "res9", chosen)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-background-networking",
                                          "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(url, wait_until="load", timeout=60_000)
            page.locator("#photo input[type=file]").set_input_files(str(PHOTO))
            sync_api.expect(page.locator("#summary")).to_contain_text("predicts", timeout=60_000)
            detail = page.locator("#detail img")
            sync_api.expect(detail).to_have_count(1, timeout=30_000)
            detail.scroll_into_view_if_needed()
            box = detail.bounding_box()
            nw, nh = page.evaluate("() => [document.querySelector('#detail img').naturalWidth,"
                                   " document.querySelector('#detail img').naturalHeight]")
            scale = min(box["width"] / nw, box["height"] / nh)
            left, top = box["x"] + (box["width"] - nw * scale) / 2, box["y"] + (box["height"] - nh * scale) / 2
            centre = SCREEN.pad + 8 * (SCREEN.detail_cell + SCREEN.pad) + SCREEN.detail_cell / 2
            page.mouse.click(left + centre * scale, top + centre * scale)
            # The view is closed (its content not even in the page): the click sets the channel view's number, which
            # the browser copies, with the block, into the view; opening it draws them.
            sync_api.expect(page.locator("#channel-text")).to_contain_text(f"res9 F(x), channel {chosen} of 256",
                                                                           timeout=60_000)
            page.locator("#inside").get_by_text("Inside the block").first.click()
            sync_api.expect(page.locator("#inside-channel input")).to_have_value(str(chosen), timeout=30_000)
            sync_api.expect(page.locator("#inside-block input")).to_have_value("res9")
            sync_api.expect(page.locator("#inside-words")).to_contain_text(sentence(want), timeout=60_000)
            figure = page.locator("#inside-figure img")
            sync_api.expect(figure).to_have_count(1, timeout=30_000)
            # A click on the y map: that position's numbers.
            figure.scroll_into_view_if_needed()
            box = figure.bounding_box()
            nw, nh = page.evaluate("() => [document.querySelector('#inside-figure img').naturalWidth,"
                                   " document.querySelector('#inside-figure img').naturalHeight]")
            scale = min(box["width"] / nw, box["height"] / nh)
            left, top = box["x"] + (box["width"] - nw * scale) / 2, box["y"] + (box["height"] - nh * scale) / 2
            x0, y0, x1, y1 = inside_figure(want).boxes["y"]
            h, w = want.y.shape
            page.mouse.click(left + (x0 + (1.5 / w) * (x1 - x0)) * scale, top + (y0 + (2.5 / h) * (y1 - y0)) * scale)
            sync_api.expect(page.locator("#inside-unit")).to_contain_text(unit_text(want, 2, 1), timeout=30_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator("#inside").screenshot(path=str(ARTIFACTS / "browser-inside.png"))
        finally:
            browser.close()
