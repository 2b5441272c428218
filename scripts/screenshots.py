"""Take the screenshots in docs/ of the running app with headless Chromium (Debian's package).

    python scripts/screenshots.py            # writes docs/*.png

Starts the app on a free port with the shipped weights, analyses a CIFAR-10 test image, and
captures the main view and the tools' tabs.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from appserver import running_app  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from resnet_demo.core.weights.cards import WEIGHTS_DIR  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
DOCS = ROOT / "docs"


def visible_tab(page, name: str):
    """The tab button named ``name`` that is shown: Gradio keeps hidden copies for its overflow menu."""
    return page.locator(f'button[role="tab"]:visible:text-is("{name}")').first


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    example = ROOT / "examples" / "cifar10-ship-0.jpg"
    with running_app(WEIGHTS_DIR) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100}, device_scale_factor=1)
        page.goto(url, wait_until="load")
        page.locator("#photo input[type=file]").set_input_files(str(example))
        expect(page.locator("#block-grids img")).to_have_count(1, timeout=60_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(DOCS / "screenshot.png"))

        def tab(name: str, out: str, *buttons: str) -> None:
            visible_tab(page, name).click()
            for button in buttons:
                page.get_by_role("button", name=button, exact=True).click()
                page.wait_for_timeout(4000)  # the analysis of a click takes well under a second
            page.locator(".tabitem:visible").last.screenshot(path=str(DOCS / out))

        tab("Residual magnitudes", "residual.png")
        visible_tab(page, "Lesions").click()
        page.get_by_label("res5").check()
        page.get_by_label("res8").check()
        tab("Lesions", "lesions.png", "Lesion", "Lesion each block alone")
        tab("Readout", "readout.png", "Read out every block")
        tab("Grad-CAM", "gradcam.png", "Explain")
        visible_tab(page, "Compare").click()
        page.locator("#compare-run").click()
        expect(page.locator("#compare-text")).to_contain_text("they", timeout=60_000)
        page.locator("#compare-cka").click()
        expect(page.locator("#compare-cka-map img")).to_have_count(1, timeout=180_000)
        page.wait_for_timeout(1500)
        page.locator(".tabitem:visible").last.screenshot(path=str(DOCS / "compare.png"))

        visible_tab(page, "Data set").click()
        page.locator("#dataset-scan").click()
        expect(page.locator("#dataset-count")).to_contain_text("match", timeout=180_000)
        page.locator("#study-run").click()
        expect(page.locator("#study-map img")).to_have_count(1, timeout=180_000)
        page.wait_for_timeout(1500)
        page.locator(".tabitem:visible").last.screenshot(path=str(DOCS / "dataset.png"))

        visible_tab(page, "Feature maps").click()
        page.locator("#detail-block input").fill("res4")
        page.locator("#detail-block input").press("Enter")
        page.wait_for_timeout(3000)
        page.locator("#channel-index input").fill("106")
        page.locator("#channel-show").click()
        expect(page.locator("#channel-text")).to_contain_text("channel 106", timeout=60_000)
        page.locator("#channel-visualise").click()
        expect(page.locator("#channel-picture img")).to_have_count(1, timeout=120_000)
        page.wait_for_timeout(1500)
        page.locator("#channel-text").scroll_into_view_if_needed()
        page.screenshot(path=str(DOCS / "channel.png"), full_page=False)

        # The timeline: a test digit through the MNIST run's snapshots.
        examples = sorted((ROOT / "examples").glob("*.*"))
        first_digit = next(i for i, p in enumerate(examples) if p.name.startswith("mnist-"))
        page.locator('button[role="tab"]:visible:text-is("Examples")').click()
        page.locator("#examples").get_by_role("button", name=f"Thumbnail {first_digit + 1} of {len(examples)}").click()
        expect(page.locator("#summary")).to_contain_text("mnist_resnet predicts", timeout=60_000)
        visible_tab(page, "Timeline").click()
        page.locator("#timeline-show").click()
        expect(page.locator("#timeline-history img")).to_have_count(1, timeout=240_000)
        page.wait_for_timeout(1500)
        page.locator(".tabitem:visible").last.screenshot(path=str(DOCS / "timeline.png"))
        browser.close()
    print(f"wrote {sorted(p.name for p in DOCS.glob('*.png'))}")


if __name__ == "__main__":
    main()
