"""A real headless Chromium (Debian's package) driven by Playwright: upload, wait, draw, see it update.

Skips only where Chromium is absent and CI is not set; `.ci/run` installs it.
"""

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
from appserver import running_app, weights_dir
from conftest import IN_CI, ROOT

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"
pytestmark = pytest.mark.browser

if not Path(CHROMIUM).is_file():
    if IN_CI:
        raise RuntimeError(f"CI=true but Chromium is not at {CHROMIUM}: the browser test may not skip in CI")
    pytest.skip(f"Chromium not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")

LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(weights_dir(tmp_path_factory.mktemp("weights"))) as (url, registry):
        yield url, registry


def test_upload_then_draw_updates_the_page(server):
    import app

    url, registry = server
    example = next(p for p in app.EXAMPLES if p.name.startswith("cifar10-ship"))
    expected_photo = registry.get("cifar10").analyze(str(example)).predictions[0].label
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: outside.append(r.url)
                    if urlparse(r.url).hostname not in ("127.0.0.1", "localhost", None) and not r.url.startswith("data:")
                    else None)
            page.goto(url, wait_until="load", timeout=60_000)
            sync_api.expect(page.locator("#photo")).to_be_visible(timeout=60_000)
            page.locator("#photo input[type=file]").set_input_files(str(example))
            summary = page.locator("#summary")
            sync_api.expect(summary).to_contain_text(f"predicts {expected_photo}", timeout=60_000)
            sync_api.expect(page.locator("#block-grids img")).to_have_count(9, timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "browser-photo.png"), full_page=True)

            page.get_by_role("tab", name="Draw").click()
            canvas = page.locator("#sketchpad canvas").first
            sync_api.expect(canvas).to_be_visible(timeout=30_000)
            box = canvas.bounding_box()
            cx, top, bottom = box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.2, box["y"] + box["height"] * 0.8
            page.mouse.move(cx, top)
            page.mouse.down()
            for i in range(1, 21):
                page.mouse.move(cx, top + (bottom - top) * i / 20)
            page.mouse.up()
            sync_api.expect(summary).to_contain_text("mnist", timeout=60_000)
            text = summary.inner_text()
            predicted = text.split("predicts ")[1].split(" ")[0]
            assert predicted in {str(d) for d in range(10)}
            page.screenshot(path=str(ARTIFACTS / "browser-drawing.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "browser-drawing.png").stat().st_size > 10_000
    assert outside == [], f"the page made requests outside the machine: {outside[:5]}"
