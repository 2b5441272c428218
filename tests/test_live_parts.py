"""The live paths' server side without a browser: frames in, the rate cap, the live camera's answers."""

import base64
import io
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from resnet_demo.core.errors import InputError
from resnet_demo.view.live import LiveCamera, RateCap, canvas_frame, live_answer, live_request
from resnet_demo.view.results import Settings


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    out = io.BytesIO()
    img.save(out, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(out.getvalue()).decode()


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_canvas_frame_reads_png_and_jpeg_and_refuses_the_rest():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    assert canvas_frame(data_url(img)).size == (40, 30)
    assert canvas_frame(data_url(img, "JPEG")).size == (40, 30)
    for bad in (None, 3, "hello", "data:text/html;base64,PGI+", "data:image/png;base64,not base64!!",
                "data:image/png;base64," + base64.b64encode(b"not a png").decode()):
        with pytest.raises(InputError):
            canvas_frame(bad)
    with pytest.raises(InputError, match="too large"):
        canvas_frame("data:image/png;base64," + "A" * 4_000_004)
    with pytest.raises(InputError, match="at most"):
        canvas_frame(data_url(Image.new("L", (5000, 2))))


def test_one_live_session_is_not_held_back_and_several_share_the_budget():
    clock = Clock()
    cap = RateCap(budget=12, floor=3, clock=clock)
    assert cap.delay("a") == 0  # the first frame: now
    clock.t += 0.05
    assert cap.delay("a") == pytest.approx(1 / 12 - 0.05)  # alone: 12 a second
    for s in "bcd":
        cap.delay(s)
    assert cap.rate() == 3  # four live: 12 / 4
    clock.t += 1
    assert cap.delay("a") == 0
    assert cap.delay("a") == pytest.approx(1 / 3)
    for s in "efghijkl":  # twelve live: the floor, not 1 a second
        cap.delay(s)
    assert cap.rate() == 3
    clock.t += 5  # the others stopped sending: a is alone again
    cap.delay("a")
    assert cap.rate() == 12


def test_live_request_is_checked():
    frame = "data:image/png;base64,AAAA"
    assert live_request({"session": "abcdef0123", "frame": frame}).session == "abcdef0123"
    assert live_request(json.dumps({"session": "abcdef0123", "frame": frame})).frame == frame
    for bad in ("{", [], {"session": "x", "frame": frame}, {"session": "abcdef0123"},
                {"session": "<script>alert(1)</script>", "frame": frame}):
        with pytest.raises(InputError):
            live_request(bad)


def test_the_live_camera_answers_with_the_settings_its_page_last_sent(seed_model):
    from resnet_demo.core.explorer import Explorer
    from resnet_demo.core.weights.cards import tutorial_card
    from resnet_demo.view.analysis_view import build_page

    explorer = Explorer(seed_model, tutorial_card(), "cpu")
    seen: list[tuple[Settings, bool]] = []
    at_once, most = [0], [0]
    lock = threading.Lock()

    def analyze(image, kind, settings, previous, chart=True):
        with lock:
            at_once[0] += 1
            most[0] = max(most[0], at_once[0])
        try:
            seen.append((settings, chart))
            analysis = explorer.analyze(image, k=settings.k)
            page = build_page(analysis, part=settings.part, chart=chart)
            return SimpleNamespace(page=page)  # what live_answer reads of an AnalysisView
        finally:
            with lock:
                at_once[0] -= 1

    camera = LiveCamera(analyze, cap=RateCap(budget=1000), at_once=1)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    request = {"session": "page000001", "frame": data_url(img, "JPEG")}
    answer = camera.frame(request)  # the name the page calls
    assert set(answer) == {"predictions", "input", "strip", "chart", "summary"}
    assert len(answer["predictions"]) == 5 and answer["chart"] is None  # defaults until the page syncs
    assert answer["input"].startswith("data:image/png;base64,") and answer["strip"].startswith("data:image/png")
    camera.remember("page000001", Settings(k=3, part="y"), chart=True)
    answer = camera.frame(request)
    assert len(answer["predictions"]) == 3 and answer["chart"].startswith("data:image/png")
    assert seen[-1] == (Settings(k=3, part="y"), True)
    assert camera.frame({"session": "page000001", "frame": "data:image/png;base64,AAAA"})["error"]
    # frames of several pages at once: at most `at_once` analyses run together
    threads = [threading.Thread(target=camera.frame, args=({"session": f"page00000{i}", "frame": request["frame"]},))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert live_answer(analyze(img, "photo", Settings(), None))["summary"].startswith("tutorial")


def test_the_live_benchmark_reads_a_frames_stamp_back_from_the_model_input():
    from resnet_demo.tools.livebench import LEVELS, analyse_page, decode_stamp

    for code in (0, 17, 42, 63):
        colour = (LEVELS[code >> 4], LEVELS[(code >> 2) & 3], LEVELS[code & 3])
        img = Image.new("RGB", (32, 32), (20, 200, 90))
        img.paste(colour, (12, 12, 20, 20))  # the stamp, at the centre, as the model input shows it
        assert decode_stamp(data_url(img), "http://127.0.0.1/") == code
    assert decode_stamp(data_url(Image.new("RGB", (32, 32), (120, 30, 60))), "http://127.0.0.1/") is None
    stamped = Image.new("RGB", (32, 32), (LEVELS[1], LEVELS[0], LEVELS[2]))  # code 18
    log = {"input": [[1500.0, data_url(stamped)], [9000.0, "junk"]], "strip": [[1500.0, "s"]], "prediction": []}
    grabs = [[1000.0, 18], [1400.0, 18], [1600.0, 18]]  # the latest grab of that stamp before the answer counts
    v = analyse_page(log, grabs, 0.0, 10_000.0, "http://127.0.0.1/")
    assert v.frames == 2 and v.fps == pytest.approx(0.2) and v.latencies_ms == [100.0] and v.unstamped == 1


def test_the_light_live_client_drives_the_pages_live_call(app_server):
    # --no-browser: the page's own live call over HTTP, with frames the live path decodes as the page's
    import time

    from resnet_demo.tools.livebench import _light_visitor, _live_component, camera_frames
    from resnet_demo.view.live import canvas_frame

    frames = camera_frames(4)
    assert [canvas_frame(f, "The live camera").size for f in frames] == [(160, 160)] * 4
    assert len(set(frames)) == 4  # the pattern moves
    prefix, component = _live_component(app_server.url)
    out: list = []
    _light_visitor(app_server.url, prefix, component, frames, time.perf_counter() + 1.5, out)
    assert len(out) == 1 and len(out[0]) >= 2 and all(ms > 0 for ms in out[0])
