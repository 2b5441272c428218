"""Live benchmark: the webcam path as visitors see it, in real headless Chromium tabs with a fake camera.

    python -m resnet_demo.tools.livebench --visitors 1 --seconds 15           # starts app.py on a free port
    python -m resnet_demo.tools.livebench --visitors 1 4 --seconds 15         # 1 visitor, then 4 at once
    python -m resnet_demo.tools.livebench --visitors 4 --photo-clients 16     # 4 webcams + the photo load test
    python -m resnet_demo.tools.livebench --url http://127.0.0.1:7860/ --visitors 1
    python -m resnet_demo.tools.livebench --app /tmp/before . --rounds 2      # two checkouts, runs alternating

What it does, for each number of visitors N:

1. Starts ``python app.py`` on a free port (``--app``: of other checkouts too, each its own server, their runs
   alternating so that a before/after comparison shares the machine's load alike; ``--url``: a server you
   started, its CPU measured when it listens on this machine) and one headless Chromium (``CHROMIUM``, default
   /usr/bin/chromium) with Chromium's fake camera (a moving test pattern), granted without a prompt.
2. Opens N pages, each in a browser context of its own (a visitor, a session), opens the live webcam tab
   and starts it as a person would (the live camera's "Start the camera", or Gradio's webcam: "Click to Access
   Webcam", then "Record").
3. Every camera frame the page grabs is **stamped**: the page's ``drawImage`` of the ``<video>`` onto a
   canvas (the only way a page turns a camera frame into pixels it can send) is followed by a small
   square of flat colour at the frame's centre, one of 64 colours, a counter; the page notes when each
   stamp was drawn, and when a canvas holding a camera frame is encoded to be sent. The centre survives the
   model's resize-and-centre-crop, so the "input as the model saw it" that comes back carries the stamp of the
   frame it was computed from.
4. A ``MutationObserver`` in each page notes (on the page's clock) every new ``src`` of the input as the model
   saw it and of the strip of feature maps, and every new prediction (the live view's, where the page has one,
   else the page's components; ``textContent``, never ``innerText``, which would lay the page out at every
   mutation and cost the page more than the frames do). After the run the model-input images are decoded here:
   the stamp's colour names the frame, so the **latency** of each analysed frame is the time from its grab to
   its answer in the page (the moment the page set the new image), and **frames/s** counts distinct answered
   frames per second of the window, per visitor. "sent" counts frames encoded to be sent: more than answered
   means frames sent in vain.
5. Server CPU per frame: the server process's (and its children's) user + system CPU time over the window,
   divided by all visitors' answered frames (with ``--photo-clients``, the photos' CPU is in it too). The
   Chromium processes' CPU is reported too, and the first page's main-thread time per frame (Chrome DevTools'
   metrics): on a small machine the browsers share the cores with the server (``--browser-nice 10`` lowers
   their priority, as visitors' browsers on machines of their own would not compete).

``--photo-clients C`` runs :mod:`resnet_demo.tools.loadtest`'s photo load (C sessions, ``--photo-requests``
requests, every answer checked) during the window as well, in a process of its own at the browsers' niceness
(its images and the library's answers prepared before the window), and reports its p95: the webcams and the photo
visitors on one server together. The window then lasts until both are done.

The machine's load average is printed with every figure: rates measured on a loaded machine are not rates.
Exit status: 0 when every visitor saw at least one analysed frame, else 1.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image

from ..core.weights.cards import WEIGHTS_DIR
from .loadtest import (
    ROOT,
    SpawnedServer,
    cpu_of,
    cpu_seconds,
    expected_results,
    make_images,
    pid_listening_on,
    run_load,
)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # N pages of one browser: none may be throttled as a background tab would be
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    # Chromium's built-in fake camera (a moving test pattern), granted without a permission prompt
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]
LEVELS = (0, 85, 170, 255)  # per channel: 4 levels, 64 stamps
STAMP_SHARE = 0.2  # the stamp's side, as a share of the frame's short side

# Installed before the page's own scripts: stamps every camera frame the page draws onto a canvas.
STAMP_JS = """(() => {
  const LEVELS = __LEVELS__, SHARE = __SHARE__;
  const grabs = []; let counter = 0;
  const draw = CanvasRenderingContext2D.prototype.drawImage;
  CanvasRenderingContext2D.prototype.drawImage = function (src, ...rest) {
    const out = draw.call(this, src, ...rest);
    if (src instanceof HTMLVideoElement) {
      const c = this.canvas, code = counter++ % 64;
      const side = Math.max(2, Math.round(Math.min(c.width, c.height) * SHARE));
      this.save(); this.setTransform(1, 0, 0, 1, 0, 0);
      this.fillStyle = `rgb(${LEVELS[code >> 4]}, ${LEVELS[(code >> 2) & 3]}, ${LEVELS[code & 3]})`;
      this.fillRect(Math.round((c.width - side) / 2), Math.round((c.height - side) / 2), side, side);
      this.restore();
      grabs.push([performance.now(), code]);
      c.fromVideo = true;
    }
    return out;
  };
  // frames encoded to be sent: the canvas a camera frame was drawn on, turned into an image file
  const sent = [];
  for (const name of ['toDataURL', 'toBlob']) {
    const encode = HTMLCanvasElement.prototype[name];
    HTMLCanvasElement.prototype[name] = function (...args) {
      if (this.fromVideo) sent.push(performance.now());
      return encode.apply(this, args);
    };
  }
  window.__grabs = grabs; window.__sent = sent;
})();""".replace("__LEVELS__", str(list(LEVELS))).replace("__SHARE__", str(STAMP_SHARE))

# The page's answers: each new src of the model's input and of the strip, each new prediction text.
RECORD_JS = """() => {
  const log = {input: [], strip: [], prediction: []}; const last = {};
  const note = (key, value) => {
    if (value && value !== last[key]) { last[key] = value; log[key].push([performance.now(), value]); }
  };
  const read = () => {
    // the live view's own images where the page has one (resnet_demo/view/live.py), else the page's components
    const input = document.querySelector('#live-input') || document.querySelector('#model-input img');
    const strip = document.querySelector('#live-strip') || document.querySelector('#block-grids img');
    const label = document.querySelector('#live-top') || document.querySelector('#predictions');
    note('input', input && input.getAttribute('src'));
    const s = strip ? (strip.getAttribute('src') || '') : '';
    note('strip', s && s.length + s.slice(-64));
    note('prediction', label && label.textContent);  // not innerText: it lays the page out, at every mutation
  };
  read();
  new MutationObserver(read).observe(document.body,
    {subtree: true, childList: true, attributes: true, attributeFilter: ['src'], characterData: true});
  window.__answers = log;
}"""


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def decode_stamp(src: str, base_url: str) -> int | None:
    """The stamp (0..63) at the centre of a model-input image (a data URL, or a file the server serves)."""
    try:
        if src.startswith("data:"):
            data = base64.b64decode(src.partition(",")[2])
        else:
            with urllib.request.urlopen(urllib.parse.urljoin(base_url, src), timeout=10) as r:
                data = r.read()
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:  # noqa: BLE001 - an image that cannot be read has no stamp
        return None
    w, h = img.size
    px = [img.getpixel((w // 2 + dx, h // 2 + dy)) for dx in (-1, 0) for dy in (-1, 0)]
    rgb = [statistics.fmean(p[c] for p in px) for c in range(3)]
    levels = [min(range(4), key=lambda i, v=v: abs(LEVELS[i] - v)) for v in rgb]
    if any(abs(LEVELS[lv] - v) > 30 for lv, v in zip(levels, rgb)):
        return None  # not a flat stamp colour: the stamp did not reach the model's input
    return levels[0] << 4 | levels[1] << 2 | levels[2]


def start_live(page, timeout_ms: int = 60_000) -> str:
    """Open the live webcam tab and start streaming, as a person would; returns what was clicked."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Live webcam").click()
    page.wait_for_selector("#live-start, button:has-text('Click to Access Webcam')", timeout=timeout_ms)
    live = page.locator("#live-start")  # the live camera's own start button, where the page has one
    if live.count():
        live.click()
        expect(live).to_have_text("Stop", timeout=timeout_ms)
        return "live camera: #live-start"
    page.get_by_role("button", name="Click to Access Webcam").click()
    record = page.get_by_role("button", name="capture photo")
    expect(record).to_have_text("Record", timeout=timeout_ms)
    record.click()
    # "Waiting": the stream is queued behind others (Gradio's concurrency limit); that visitor counts its 0 frames
    expect(record).to_have_text(re.compile("Stop|Waiting"), timeout=10_000)
    return "Gradio webcam: Record"


@dataclass
class Visitor:
    fps: float
    frames: int
    strip_updates: int
    prediction_updates: int
    grabbed: int = 0  # camera frames the page turned into pixels (sent or not)
    sent: int = 0  # camera frames the page encoded to send
    latencies_ms: list[float] = field(default_factory=list)
    unstamped: int = 0
    page_ms_per_frame: dict | None = None  # the page's main thread per answered frame (the first visitor's)


@dataclass
class Run:
    visitors: int
    seconds: float
    per_visitor: list[Visitor]
    server_cpu_ms_per_frame: float | None
    server_cpu_share: float | None  # cores busy with the server during the window
    browser_cpu_share: float | None
    load_before: tuple
    load_after: tuple
    photo: dict | None = None
    app: str = ""

    @property
    def latencies(self) -> list[float]:
        return sorted(x for v in self.per_visitor for x in v.latencies_ms)

    def row(self) -> dict:
        lat = self.latencies
        fps = [v.fps for v in self.per_visitor]
        return {
            "visitors": self.visitors,
            "seconds": round(self.seconds, 1),
            "fps_min": round(min(fps), 2) if fps else 0.0,
            "fps_mean": round(statistics.fmean(fps), 2) if fps else 0.0,
            "latency_p50_ms": round(percentile(lat, 0.5)) if lat else None,
            "latency_p95_ms": round(percentile(lat, 0.95)) if lat else None,
            "server_cpu_ms_per_frame": None if self.server_cpu_ms_per_frame is None
            else round(self.server_cpu_ms_per_frame, 1),
            "server_cores": None if self.server_cpu_share is None else round(self.server_cpu_share, 2),
            "browser_cores": None if self.browser_cpu_share is None else round(self.browser_cpu_share, 2),
            "load_before": [round(x, 2) for x in self.load_before],
            "load_after": [round(x, 2) for x in self.load_after],
            "photo_p95_ms": None if self.photo is None else self.photo.get("p95_ms"),
        }


def percentile(sorted_values: list[float], q: float) -> float:
    rank = max(1, min(len(sorted_values), round(q * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def analyse_page(log: dict, grabs: list, start: float, end: float, base_url: str) -> Visitor:
    """One page's answers in the window [start, end] (page clock): frames, rates and latencies."""
    inside = [(t, src) for t, src in log["input"] if start < t <= end]
    latencies, unstamped = [], 0
    for t, src in inside:
        code = decode_stamp(src, base_url)
        grabbed = [g for g, c in grabs if c == code and g <= t]
        if code is None or not grabbed:
            unstamped += 1
            continue
        latencies.append(t - grabbed[-1])
    seconds = (end - start) / 1000
    times = [t for t, _ in grabs if start < t <= end]
    # a mirrored capture draws the video twice in a row: one grab
    grabbed = sum(1 for i, t in enumerate(times) if i == 0 or t - times[i - 1] > 5)
    return Visitor(
        fps=len(inside) / seconds,
        frames=len(inside),
        strip_updates=sum(start < t <= end for t, _ in log["strip"]),
        prediction_updates=sum(start < t <= end for t, _ in log["prediction"]),
        grabbed=grabbed,
        latencies_ms=latencies,
        unstamped=unstamped,
    )


PAGE_METRICS = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration")


def page_metrics(cdp) -> dict[str, float]:
    """Seconds the page's main thread has spent so far: all tasks, scripts, layout, style (Chrome DevTools)."""
    got = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return {k: got.get(k, 0.0) for k in PAGE_METRICS}


def browser_processes(browser_pid: int | None):
    import psutil

    if browser_pid is None:
        return []
    try:
        root = psutil.Process(browser_pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def chromium_pid() -> int | None:
    """The newest Chromium started by this process (Playwright's launch gives no pid)."""
    import psutil

    me = psutil.Process()
    found = [p for p in me.children(recursive=True) if "chrom" in (p.name() or "").lower()]
    roots = [p for p in found if p.ppid() not in {q.pid for q in found}]
    return max(roots, key=lambda p: p.create_time()).pid if roots else None


def prepare_photos(clients: int, requests: int, weights_dir: Path, workdir: Path) -> tuple[list[Path], list]:
    """The photo load's images and the library's answer for each, computed before the measured window."""
    paths = make_images(requests + clients, workdir / "photo-images")
    return paths, expected_results(paths, weights_dir)


def photo_load(url: str, clients: int, paths: list[Path], expected: list, nice: int, out: dict) -> None:
    """The photo load test in a process of its own (run from a thread that waits for it); its figures go into
    ``out``. A process: in this one, its 16 clients would share one interpreter with Playwright's driver and
    measure this process's contention, not the server's; ``nice``: it stands for visitors on other machines."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_photo_child, args=(url, clients, paths, expected, nice, queue), daemon=True)
    child.start()
    out.update(queue.get())
    child.join()


def start_photo_load(url: str, photo: tuple | None, nice: int) -> tuple[threading.Thread | None, dict]:
    """The photo load (``(clients, images, expected answers)``, or ``None``: none) started in the background: the
    thread that waits for it, and the dict its figures will be in."""
    out: dict = {}
    if photo is None:
        return None, out
    clients, paths, expected = photo
    worker = threading.Thread(target=photo_load, args=(url, clients, paths, expected, nice, out), daemon=True)
    worker.start()
    return worker, out


def _photo_child(url: str, clients: int, paths: list[Path], expected: list, nice: int, queue) -> None:
    if nice:
        os.nice(nice)
    report = run_load(url, paths, expected, clients=clients, warmup=clients, log=lambda m: None)
    queue.put(dict(requests=report.requests, ok=report.ok, failures=report.failures, mismatches=report.mismatches,
                   p50_ms=round(report.p50_ms or 0), p95_ms=round(report.p95_ms or 0),
                   requests_per_s=round(report.requests_per_s, 1)))


def camera_frames(n: int = 30, side: int = 160) -> list[str]:
    """``n`` JPEG data URLs of a moving test pattern at the live page's frame size (a bright square crossing a
    gradient), as the live page sends them."""
    import numpy as np

    ramp = np.linspace(40, 200, side, dtype=np.float32)
    frames = []
    for i in range(n):
        arr = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side))], -1)
        x = i * (side - 40) // n  # the square crosses once over the n frames
        arr[60:100, x : x + 40] = (250, 230, 40)
        buf = io.BytesIO()
        Image.fromarray(arr.astype("uint8"), "RGB").save(buf, "JPEG", quality=80)
        frames.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return frames


def _live_component(url: str) -> tuple[str, int]:
    """The API prefix and the id of the live camera's component, from the app's config."""
    with urllib.request.urlopen(urllib.parse.urljoin(url, "config"), timeout=30) as r:
        config = json.loads(r.read())
    ids = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "webcam"]
    if not ids:
        raise RuntimeError(f"{url} has no live camera component (elem_id 'webcam')")
    return config.get("api_prefix", "/gradio_api"), ids[0]


def _light_visitor(url: str, prefix: str, component: int, frames: list[str], deadline: float, out: list) -> None:
    """One live camera's closed loop without a browser: a frame sent, its answer read, then the next."""
    import uuid

    import httpx

    session = uuid.uuid4().hex[:16]
    latencies, n = [], 0
    with httpx.Client(timeout=60) as client:
        while time.perf_counter() < deadline:
            body = {"session_hash": session, "component_id": component, "fn_name": "frame",
                    "data": {"session": session, "frame": frames[n % len(frames)]}}
            t0 = time.perf_counter()
            answer = client.post(urllib.parse.urljoin(url, prefix.strip("/") + "/component_server"), json=body).json()
            if not isinstance(answer, dict) or "predictions" not in answer:
                raise RuntimeError(f"the live call answered {str(answer)[:200]}")
            latencies.append((time.perf_counter() - t0) * 1e3)
            n += 1
    out.append(latencies)


def _light_child(url: str, n: int, seconds: float, nice: int, queue) -> None:
    if nice:
        os.nice(nice)
    prefix, component = _live_component(url)
    frames = camera_frames()
    out: list = []
    deadline = time.perf_counter() + seconds
    threads = [threading.Thread(target=_light_visitor, args=(url, prefix, component, frames, deadline, out))
               for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(out)


def run_light(url: str, n: int, seconds: float, server_pid: int | None, *, photo=None, nice: int = 0) -> Run:
    """N live cameras as plain HTTP closed loops (no browser: what the server gives when the visitors' browsers are
    elsewhere), each a thread of one process at ``nice``, for ``seconds``; with the photo load beside them."""
    import multiprocessing

    import psutil

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    server = psutil.Process(server_pid) if server_pid else None
    load_before = load_average()
    s0, w0 = (cpu_seconds(server, children=True) if server else 0.0), time.perf_counter()
    worker, photo_out = start_photo_load(url, photo, nice)
    child = ctx.Process(target=_light_child, args=(url, n, seconds, nice, queue), daemon=True)
    child.start()
    per_visitor = queue.get()
    child.join()
    if worker is not None:
        worker.join()
    wall = time.perf_counter() - w0
    s1 = cpu_seconds(server, children=True) if server else 0.0
    frames = sum(len(lat) for lat in per_visitor)
    visitors = [Visitor(fps=len(lat) / seconds, frames=len(lat), strip_updates=len(lat), prediction_updates=len(lat),
                        sent=len(lat), latencies_ms=lat) for lat in per_visitor]
    return Run(visitors=n, seconds=wall, per_visitor=visitors,
               server_cpu_ms_per_frame=(s1 - s0) * 1e3 / frames if server and frames else None,
               server_cpu_share=(s1 - s0) / wall if server else None, browser_cpu_share=None,
               load_before=load_before, load_after=load_average(), photo=photo_out or None)


def run_visitors(url: str, n: int, seconds: float, server_pid: int | None, *, warmup_s: float = 3.0,
                 photo: tuple[int, list[Path], list] | None = None, browser_nice: int = 0, log=print) -> Run:
    """N visitors' webcams on ``url`` for ``seconds`` after each has seen its first answer and ``warmup_s``.

    ``photo``: ``(clients, images, expected answers)`` of a photo load run during the window (:func:`prepare_photos`).
    ``browser_nice``: the niceness of Chromium's processes (its zygote included, so every page's renderer too) and of
    the photo load's process, to stand for visitors whose browsers and clients run on machines of their own and
    leave this one's cores to the server."""
    import psutil
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p, ExitStack() as stack:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        stack.callback(browser.close)
        bpid = chromium_pid()
        if browser_nice:
            for proc in browser_processes(bpid):
                try:
                    proc.nice(browser_nice)
                except psutil.Error:
                    pass
        pages = []
        for _ in range(n):
            context = browser.new_context(viewport={"width": 1400, "height": 1000}, permissions=["camera"])
            context.add_init_script(STAMP_JS)
            page = context.new_page()
            page.goto(url, wait_until="load", timeout=120_000)
            expect(page.locator("#photo")).to_be_visible(timeout=120_000)
            page.evaluate(RECORD_JS)
            pages.append(page)
        cdp = pages[0].context.new_cdp_session(pages[0])  # the first page's main-thread work, by kind
        cdp.send("Performance.enable")
        how = [start_live(page) for page in pages]
        log(f"{n} visitor(s) started ({how[0]}); waiting for each one's first answer")
        for page in pages:
            page.wait_for_function("() => window.__answers.input.length > 0", timeout=120_000)
        time.sleep(warmup_s)
        server = psutil.Process(server_pid) if server_pid else None
        procs = browser_processes(bpid)
        load_before = load_average()
        starts = [page.evaluate("() => performance.now()") for page in pages]
        m0 = page_metrics(cdp)
        s0, b0, w0 = (cpu_seconds(server, children=True) if server else 0.0), cpu_of(procs), time.perf_counter()
        worker, photo_out = start_photo_load(url, photo, browser_nice)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or (worker is not None and worker.is_alive()):
            pages[0].wait_for_timeout(250)  # keeps Playwright's event loop turning
        wall = time.perf_counter() - w0
        s1, b1 = (cpu_seconds(server, children=True) if server else 0.0), cpu_of(procs)
        ends = [page.evaluate("() => performance.now()") for page in pages]
        m1 = page_metrics(cdp)
        load_after = load_average()
        logs = [page.evaluate("() => window.__answers") for page in pages]
        grabs = [page.evaluate("() => window.__grabs") for page in pages]
        sent = [page.evaluate("() => window.__sent") for page in pages]
    visitors = [analyse_page(lg, gr, st, en, url) for lg, gr, st, en in zip(logs, grabs, starts, ends)]
    for v, times, st, en in zip(visitors, sent, starts, ends):
        v.sent = sum(st < t <= en for t in times)
    frames = sum(v.frames for v in visitors)
    if visitors[0].frames:
        visitors[0].page_ms_per_frame = {k: round((m1[k] - m0[k]) * 1e3 / visitors[0].frames, 1) for k in m0}
    return Run(
        visitors=n, seconds=wall, per_visitor=visitors,
        server_cpu_ms_per_frame=(s1 - s0) * 1e3 / frames if server and frames else None,
        server_cpu_share=(s1 - s0) / wall if server else None,
        browser_cpu_share=(b1 - b0) / wall if procs else None,
        load_before=load_before, load_after=load_after, photo=photo_out or None,
    )


def table(runs: list[Run]) -> str:
    head = ("visitors  fps/visitor (min, mean)  latency p50 / p95 ms  server CPU/frame  server cores  "
            "browser cores  load avg before -> after")
    lines = [head]
    for r in runs:
        d = r.row()
        if r.app:
            lines.append(f"app: {r.app}")
        lat = f"{d['latency_p50_ms']} / {d['latency_p95_ms']}" if d["latency_p50_ms"] is not None else "-"
        cpu = f"{d['server_cpu_ms_per_frame']} ms" if d["server_cpu_ms_per_frame"] is not None else "-"
        lines.append(f"{d['visitors']:>8}  {d['fps_min']:>10.2f}, {d['fps_mean']:<12.2f} {lat:>20}  {cpu:>15}  "
                     f"{d['server_cores'] if d['server_cores'] is not None else '-':>12}  "
                     f"{d['browser_cores'] if d['browser_cores'] is not None else '-':>13}  "
                     f"{d['load_before'][0]:.2f} -> {d['load_after'][0]:.2f}")
        for i, v in enumerate(r.per_visitor):
            lines.append(f"          visitor {i}: {v.frames} frames in {d['seconds']} s, strip {v.strip_updates}, "
                         f"prediction {v.prediction_updates}, grabbed {v.grabbed}, sent {v.sent}, "
                         f"stamped {len(v.latencies_ms)} (unstamped {v.unstamped})")
            if v.page_ms_per_frame:
                lines.append("            page main thread per frame (ms): " + ", ".join(
                    f"{k.removesuffix('Duration').lower()} {x}" for k, x in v.page_ms_per_frame.items()))
        if r.photo:
            p = r.photo
            lines.append(f"          photo load: {p['requests']} requests, {p['ok']} ok, {p['failures']} failed, "
                         f"{p['mismatches']} mismatched, p50 {p['p50_ms']} ms, p95 {p['p95_ms']} ms, "
                         f"{p['requests_per_s']} requests/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visitors", type=int, nargs="+", default=[1], help="visitors at once; several: one run each")
    parser.add_argument("--seconds", type=float, default=15.0, help="the measured window, after a warm-up")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after every visitor's first answer")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running app (default: start app.py on a free port)")
    where.add_argument("--app", type=Path, nargs="+", default=[ROOT], metavar="REPO",
                       help="start app.py of these checkouts (default: this one); several: their runs alternate, "
                       "round by round, so that they share the machine's load alike (a before/after comparison)")
    parser.add_argument("--rounds", type=int, default=1, help="with several --app: alternations")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its CPU")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--concurrency", type=int, default=None, help="app.py --concurrency, when started here")
    parser.add_argument("--photo-clients", type=int, default=0, help="also run the photo load test: its sessions")
    parser.add_argument("--photo-requests", type=int, default=200, help="the photo load test's measured requests")
    parser.add_argument("--no-browser", action="store_true",
                        help="live cameras as plain HTTP closed loops (the page's live call, a moving test pattern), "
                             "no Chromium: the server's capacity when visitors' browsers run elsewhere")
    parser.add_argument("--browser-nice", type=int, default=0,
                        help="run Chromium at this niceness (e.g. 10): the visitors' browsers share this machine's "
                        "cores with the server, as they would not in use; 0 (default): at the server's priority")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if not args.no_browser and not Path(CHROMIUM).is_file():
        print(f"error: Chromium not found at {CHROMIUM} (set CHROMIUM)", file=sys.stderr)
        return 2
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    workdir = Path(tempfile.mkdtemp(prefix="livebench-"))
    servers: list[tuple[str, str, int | None]] = []  # (name, url, pid)
    spawned: list[SpawnedServer] = []
    try:
        if args.url:
            pid = args.pid
            parsed = urlparse(args.url)
            if pid is None and parsed.hostname in ("127.0.0.1", "localhost"):
                pid = pid_listening_on(parsed.port or 80)
            servers.append((args.url, args.url, pid))
        else:
            for i, root in enumerate(args.app):
                spawned.append(SpawnedServer(args.weights_dir, args.concurrency, workdir / f"server-{i}.log",
                                             root=root.resolve()))
            for root, server in zip(args.app, spawned):
                server.wait_ready()
                servers.append((str(root), server.url, server.proc.pid))
                log(f"app.py of {root} at {server.url} (pid {server.proc.pid})")
        runs = []
        rounds = args.rounds if len(servers) > 1 else 1
        photo = None
        if args.photo_clients:
            photo = (args.photo_clients, *prepare_photos(args.photo_clients, args.photo_requests, args.weights_dir,
                                                         workdir))
        for n in args.visitors:
            for _ in range(rounds):
                for name, url, pid in servers:
                    if args.no_browser:
                        run = run_light(url, n, args.seconds, pid, photo=photo, nice=args.browser_nice)
                    else:
                        run = run_visitors(url, n, args.seconds, pid, warmup_s=args.warmup, photo=photo,
                                           browser_nice=args.browser_nice, log=log)
                    run.app = name
                    runs.append(run)
                    log(table(runs[-1:]))
    finally:
        for server in spawned:
            server.stop()
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps([{**r.row(), "app": r.app, "per_visitor": [asdict(v) for v in r.per_visitor],
                                          "photo": r.photo} for r in runs], indent=2) + "\n")
    return 0 if all(v.frames for r in runs for v in r.per_visitor) else 1


if __name__ == "__main__":
    sys.exit(main())
