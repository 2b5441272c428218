"""The live paths in a real headless Chromium (Debian's package): the webcam's analysed frames keep coming and
follow the picture, for several visitors at once, and the tab says why when there is no camera; the drawing pad
answers while the pen moves, not only when it lifts.

These tests assert behaviour, not rates (``python -m resnet_demo.tools.livebench`` measures those): a low floor of
frames, and that the maps change when, and only when, the picture does. Skips only where Chromium is absent and CI
is not set.
"""

import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
from appserver import running_app, weights_dir
from conftest import IN_CI, drawing_area

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path(CHROMIUM).is_file():
    if IN_CI:
        raise RuntimeError(f"CI=true but Chromium is not at {CHROMIUM}: the browser test may not skip in CI")
    pytest.skip(f"Chromium not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")
from resnet_demo.tools.livebench import LAUNCH_ARGS  # noqa: E402 - after the skip: it needs nothing, but reads well

# The camera's picture, set by the test: every frame the page grabs from the <video> is painted over with
# `window.__scene` when one is set ('red': flat red; 'stripes': black and white vertical stripes), so the test
# knows when the picture changes and when it does not. With no scene the fake camera's own moving pattern shows.
SCENE_JS = """(() => {
  const draw = CanvasRenderingContext2D.prototype.drawImage;
  CanvasRenderingContext2D.prototype.drawImage = function (src, ...rest) {
    const out = draw.call(this, src, ...rest);
    if (src instanceof HTMLVideoElement && window.__scene) {
      const c = this.canvas;
      this.save(); this.setTransform(1, 0, 0, 1, 0, 0);
      this.fillStyle = window.__scene === 'red' ? '#d02020' : '#ffffff';
      this.fillRect(0, 0, c.width, c.height);
      if (window.__scene === 'stripes') {
        this.fillStyle = '#000000';
        for (let x = 0; x < c.width; x += 32) this.fillRect(x, 0, 16, c.height);
      }
      this.restore();
    }
    return out;
  };
})();"""
# On the page's clock: every new src of the input as the model saw it and of the strip (the live view's where the
# page shows one, else the page's components), every new live prediction and summary; pointer presses and releases
# on the drawing pad.
RECORD_JS = """() => {
  const log = {input: [], strip: [], top: [], summary: [], down: [], up: []}; const last = {};
  const t0 = performance.now(), now = () => performance.now() - t0;
  const note = (key, value) => { if (value && value !== last[key]) { last[key] = value; log[key].push([now(), value]); } };
  const src = sel => { const e = document.querySelector(sel); return e && e.getAttribute('src'); };
  const text = sel => { const e = document.querySelector(sel); return e && e.textContent.trim().slice(0, 80); };
  const read = () => {  // textContent, not innerText: innerText lays the page out, at every mutation
    note('input', src('#live-input') || src('#model-input img'));
    note('strip', src('#live-strip') || src('#block-grids img'));
    note('top', text('#live-top'));
    note('summary', text('#summary [data-testid="markdown"]'));
  };
  read();
  new MutationObserver(read).observe(document.body,
    {subtree: true, childList: true, attributes: true, attributeFilter: ['src'], characterData: true});
  const onPad = e => e.target instanceof HTMLCanvasElement && e.target.closest('#sketchpad');
  document.addEventListener('pointerdown', e => { if (onPad(e)) log.down.push(now()); }, true);
  document.addEventListener('pointerup', e => { if (onPad(e)) log.up.push(now()); }, true);
  window.__log = log; window.__now = now;
}"""
LOG = "() => window.__log"
NOW = "() => window.__now()"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(weights_dir(tmp_path_factory.mktemp("weights"))) as (url, _):
        yield url


def recorded_page(browser, url: str):
    """A page of the app in a context (a session) of its own, its fake camera's scene and updates recorded."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(SCENE_JS)
    page = context.new_page()
    page.goto(url, wait_until="load", timeout=60_000)
    sync_api.expect(page.locator("#photo")).to_be_visible(timeout=60_000)
    page.evaluate(RECORD_JS)
    return page


@contextmanager
def app_page(url: str):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            yield recorded_page(browser, url)
        finally:
            browser.close()


def between(times: list, start: float, end: float) -> list:
    return [value for t, value in times if start < t <= end]


def start_webcam(page) -> None:
    page.get_by_role("tab", name="Live webcam").click()
    start = page.locator("#live-start")
    sync_api.expect(start).to_have_text("Start the camera", timeout=30_000)
    start.click()
    sync_api.expect(start).to_have_text("Stop", timeout=30_000)
    sync_api.expect(page.locator("#live-input")).to_have_attribute("src", re.compile("^data:image/png"),
                                                                    timeout=60_000)


def settle(page, key: str, quiet_ms: int = 2500, timeout_ms: int = 30_000) -> str:
    """``key``'s value once it has changed and then not changed for ``quiet_ms`` (a constant picture gives equal
    answers, which change nothing on the page)."""
    since = page.evaluate(NOW)
    deadline = since + timeout_ms
    while page.evaluate(NOW) < deadline:
        log = page.evaluate(LOG)[key]
        if log and log[-1][0] > since and page.evaluate(NOW) - log[-1][0] >= quiet_ms:
            return log[-1][1]
        page.wait_for_timeout(250)
    changed = [t for t, _ in page.evaluate(LOG)[key] if t > since]
    raise AssertionError(f"{key}: {len(changed)} changes in the {timeout_ms} ms after the picture changed, "
                         f"{'none' if not changed else 'never quiet for ' + str(quiet_ms) + ' ms'}")


def test_webcam_frames_keep_coming_and_the_maps_follow_the_picture(server):
    with app_page(server) as page:
        start_webcam(page)
        # The fake camera's moving pattern: new analysed frames keep arriving, each with its own maps.
        t0 = page.evaluate(NOW)
        page.wait_for_timeout(10_000)
        log = page.evaluate(LOG)
        fresh = between(log["input"], t0, t0 + 10_000)
        strips = between(log["strip"], t0, t0 + 10_000)
        assert len(fresh) >= 3, f"{len(fresh)} new analysed frames in 10 s of a moving picture"
        assert len(set(strips)) >= 3, f"{len(set(strips))} different strips of maps in 10 s of a moving picture"
        assert "cifar10_resnet predicts" in log["summary"][-1][1], "the rest of the page did not follow"

        # A constant picture: the answers settle, frame after frame the same maps.
        page.evaluate("() => { window.__scene = 'red'; }")
        red = settle(page, "strip")
        red_top = page.evaluate(LOG)["top"][-1][1]
        # Another picture: the maps change, and settle on another strip.
        page.evaluate("() => { window.__scene = 'stripes'; }")
        stripes = settle(page, "strip")  # raises if the maps do not change
        assert stripes != red
        # And back: the very same maps and prediction as before (the same picture, the same analysis).
        page.evaluate("() => { window.__scene = 'red'; }")
        assert settle(page, "strip") == red, "the same picture gave other maps"
        assert page.evaluate(LOG)["top"][-1][1] == red_top

        # Stop: the camera is released and the page (the session's state) keeps the last frame.
        page.locator("#live-start").click()
        sync_api.expect(page.locator("#live-start")).to_have_text("Start the camera")
        assert page.evaluate("() => document.querySelector('#webcam video').srcObject") is None
        sync_api.expect(page.locator("#model-input img")).to_have_attribute("src", re.compile("^data:image/png"))


def test_several_live_visitors_each_get_frames(server):
    """Two pages streaming at once (two sessions): both keep getting their own analysed frames."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            pages = []
            for scene in ("red", "stripes"):
                page = recorded_page(browser, server)
                page.evaluate(f"() => {{ window.__scene = '{scene}'; }}")
                pages.append(page)
            for page in pages:
                start_webcam(page)
            pages[0].wait_for_timeout(3000)
            strips = [page.evaluate(LOG)["strip"][-1][1] for page in pages]
            assert strips[0] != strips[1], "two sessions with two pictures got the same maps"
            for page in pages:  # and a moving picture keeps them coming, on both
                page.evaluate("() => { window.__scene = null; }")
            t0 = [page.evaluate(NOW) for page in pages]
            pages[0].wait_for_timeout(8000)
            for page, t in zip(pages, t0):
                fresh = between(page.evaluate(LOG)["input"], t, t + 8000)
                assert len(fresh) >= 3, f"{len(fresh)} frames in 8 s for one of two live visitors"
        finally:
            browser.close()


# One long stroke, a "2": the pen stays down for seconds, moving a little every 250 ms (a software-rendered editor
# on a busy machine takes up to a second for each move: few moves, and pauses between them).
TWO = [(0.30, 0.30), (0.40, 0.20), (0.60, 0.20), (0.70, 0.32), (0.65, 0.48), (0.45, 0.65), (0.30, 0.80),
       (0.50, 0.80), (0.72, 0.80)]


def test_drawing_answers_while_the_pen_moves(server):
    """The prediction, the input as the model saw it and the maps follow the pen during one stroke, at most one
    event per LIVE_PAD_MS, and pen lift still sends the sketchpad's own value."""
    import time

    import app

    with app_page(server) as page:
        joins: list[float] = []  # when the page started an event (Python's clock)
        page.on("request", lambda r: joins.append(time.monotonic()) if "/queue/join" in r.url else None)
        left, top, side = drawing_area(page)
        page.mouse.move(left + TWO[0][0] * side, top + TWO[0][1] * side)
        page.mouse.down()
        pressed = time.monotonic()
        for x, y in TWO[1:]:
            page.mouse.move(left + x * side, top + y * side, steps=2)
            page.wait_for_timeout(250)
        lifted = time.monotonic()
        page.mouse.up()
        settled = settle(page, "summary", quiet_ms=3000, timeout_ms=60_000)
        log = page.evaluate(LOG)
    (down,), (up,) = log["down"], log["up"]
    during = between(log["summary"], down, up)
    inputs_during = between(log["input"], down, up)
    strips_during = between(log["strip"], down, up)
    sent = sum(pressed < t <= lifted for t in joins)
    seconds = (up - down) / 1000
    print(f"drawing: {len(during)} predictions, {len(inputs_during)} model inputs, {len(strips_during)} strips while "
          f"the pen was down for {seconds:.1f} s; {sent} events sent meanwhile, {sum(t > lifted for t in joins)} after")
    assert len(inputs_during) >= 2 and len(strips_during) >= 2, (
        f"the page followed the pen {len(inputs_during)} times in {seconds:.1f} s: {log['summary']}")
    assert len(during) >= 1, log["summary"]
    # throttled: at most one event a LIVE_PAD_MS while the pen is down (and one spare)
    assert sent <= (lifted - pressed) * 1000 / app.LIVE_PAD_MS + 1, sent
    assert "mnist_resnet predicts" in settled, settled
    assert any(t > lifted for t in joins), "pen lift sent nothing: the sketchpad's own change is gone"


def test_the_webcam_tab_says_why_when_there_is_no_camera(server):
    """Chromium without its fake camera has none: the tab says so, before and after trying to start it."""
    with sync_api.sync_playwright() as p:
        args = [a for a in LAUNCH_ARGS if "fake" not in a]
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server, wait_until="load", timeout=60_000)
            page.get_by_role("tab", name="Live webcam").click()
            note = page.locator("#live-note")
            sync_api.expect(note).to_contain_text("No camera was found", timeout=30_000)
            page.locator("#live-start").click()
            sync_api.expect(note).to_contain_text("Photo tab")
            sync_api.expect(page.locator("#live-start")).to_have_text("Start the camera")
        finally:
            browser.close()
