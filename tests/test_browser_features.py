"""Headless Chromium: upload a checkpoint and see its analysis; click a block in the strip; compare two models.

Skips only where Chromium is absent and CI is not set; `.ci/run` installs it.
"""

import os
from pathlib import Path

import pytest
import torch
from appserver import running_app, weights_dir
from conftest import IN_CI, ROOT
from tutorial_net import Net

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"
pytestmark = pytest.mark.browser

if not Path(CHROMIUM).is_file():
    if IN_CI:
        raise RuntimeError(f"CI=true but Chromium is not at {CHROMIUM}: the browser test may not skip in CI")
    pytest.skip(f"Chromium not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    with running_app(weights_dir(tmp_path_factory.mktemp("weights"))) as (url, registry):
        yield url, registry


@pytest.fixture
def page(page_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1200})
            tab.goto(page_url[0], wait_until="load", timeout=60_000)
            sync_api.expect(tab.locator("#photo")).to_be_visible(timeout=60_000)
            yield tab
        finally:
            browser.close()


def test_upload_a_checkpoint_in_the_page_and_see_its_analysis(page, tmp_path):
    torch.manual_seed(3)
    ckpt = tmp_path / "my_net.pth"
    torch.save(Net().eval().state_dict(), ckpt)
    example = ROOT / "examples" / "cifar10-horse-0.jpg"
    page.locator("#your-model").get_by_text("Your model: upload a checkpoint").click()
    page.locator("#upload-checkpoint input[type=file]").set_input_files(str(ckpt))
    page.wait_for_timeout(1000)  # the file reaches the server before the button is pressed
    page.locator("#upload-load").click()
    status = page.locator("#upload-status")
    sync_api.expect(status).to_contain_text("Loaded", timeout=60_000)
    sync_api.expect(status).to_contain_text("my_net.pth")
    page.locator("#photo input[type=file]").set_input_files(str(example))
    # The summary names the model that analysed the image: the uploaded checkpoint, by its file name.
    sync_api.expect(page.locator("#summary")).to_contain_text("my_net predicts", timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-upload.png"), full_page=True)


def test_a_click_on_a_block_in_the_strip_enlarges_that_block(page):
    example = ROOT / "examples" / "cifar10-ship-0.jpg"
    page.locator("#photo input[type=file]").set_input_files(str(example))
    strip = page.locator("#block-grids img")
    sync_api.expect(strip).to_have_count(1, timeout=60_000)
    sync_api.expect(page.locator("#summary")).to_contain_text("predicts", timeout=60_000)
    box = strip.bounding_box()
    natural = page.evaluate("() => document.querySelector('#block-grids img').naturalWidth")
    assert natural > 0
    # The third block's slot: x in the image's own pixels, scaled to where the browser drew it.
    page.mouse.click(box["x"] + box["width"] * (2.5 / 9), box["y"] + box["height"] * 0.4)
    sync_api.expect(page.locator("#detail-block input")).to_have_value("res3", timeout=30_000)


def test_compare_two_models_on_one_image_in_the_page(page, page_url):
    _, registry = page_url
    example = ROOT / "examples" / "cifar10-frog-0.jpg"
    page.locator("#photo input[type=file]").set_input_files(str(example))
    sync_api.expect(page.locator("#summary")).to_contain_text("predicts", timeout=60_000)
    page.get_by_role("tab", name="Compare").click()
    # Every tab keeps its own label after a switch (a gr.State inside gr.Tabs once shifted them by one).
    labels = page.evaluate("() => [...document.querySelectorAll('[role=tab]')].map(b => b.innerText.trim())")
    assert labels[-7:] == ["Feature maps", "Residual magnitudes", "Lesions", "Readout", "Grad-CAM", "Compare", "Export"]
    page.locator("#compare-run").click()
    text = page.locator("#compare-text")
    sync_api.expect(text).to_contain_text("they", timeout=60_000)
    for key in ("cifar10", "mnist"):
        want = registry.get(key).analyze(str(example), k=5).predictions[0]
        sync_api.expect(text).to_contain_text(f"predicts **{want.label}**".replace("**", ""), timeout=5_000)
    page.locator("#compare-cka").click()
    sync_api.expect(page.locator("#compare-cka-map img")).to_have_count(1, timeout=120_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-compare.png"), full_page=True)
