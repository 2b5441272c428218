"""Load test: many browser-like sessions on the running app at once, every answer checked against its own image.

    python -m resnet_demo.tools.loadtest --spawn                          # start app.py on a free port, shipped weights
    python -m resnet_demo.tools.loadtest --spawn --weights-dir DIR --json out.json
    python -m resnet_demo.tools.loadtest --url http://127.0.0.1:7860/     # a server you started (same weights!)
    python -m resnet_demo.tools.loadtest --spawn --untrained              # random weights, for a machine without any
    python -m resnet_demo.tools.loadtest --spawn --client gradio          # drive it with gradio_client instead

What it does:

1. Writes ``--requests`` + ``--warmup`` distinct RGB PNGs (32×32 and 48×40, seeded noise over a seeded
   colour) to a temporary folder, and computes each one's expected top-k and page summary with the
   library (``Explorer.from_weights(DIR/cifar10_resnet.safetensors, "cpu").analyze``).
2. Opens ``--clients`` sessions, each driven by its own thread. Requests are dealt round-robin: request
   ``i`` goes to session ``i % clients``; a session sends its next request when its previous answer has
   arrived (a closed loop, as a person clicking would).
3. Warm-up requests first; the server's RSS (its process and children, via psutil) is read after the
   warm-up and after the run. Between them the peak is sampled every 0.25 s.
4. Every answer must carry its own image's top-1 label and top-k probabilities (within ``1e-5``) and its
   own summary (the blocks that change their input most and least, with their ratios, and where the
   metrics leave the reference bands): an answer that matches another image's
   expected result is reported as cross-talk, naming that image.

The load generator (``--client``). The clients share this machine's cores with the server, so whatever
CPU they spend per request is taken from the server and shows up in its latencies. ``gradio_client``
spends about 90 ms of CPU per request, more than the server's own 60-110 ms: each call makes three new
``httpx`` clients (upload, join, event stream), each building a TLS context (~27 ms of CPU here), and
runs helper threads that poll every 50 ms. Its latencies measured the client. The
default, ``--client http`` (:class:`HttpSession`), makes the requests a browser tab makes, and no more,
with one keep-alive ``httpx.Client`` per session: (1) the image to ``/gradio_api/upload``, (2) the event
to ``/gradio_api/queue/join`` (``fn_index`` and ``trigger_id`` of the ``analyze_photo`` event from
``/config``, gr.State inputs as ``null``, the image as a ``gradio.FileData`` dict, a random
``session_hash`` per session), (3) the answer read from the ``/gradio_api/queue/data`` event stream up to
its ``process_completed``. It returns what ``gradio_client`` returns (the outputs less the gr.State ones;
a test checks the two agree value for value) and keeps the page's heartbeat stream open, as a tab does,
so that closing a session ends it on the server. It costs under a tenth of gradio_client's CPU per
request. ``--client gradio`` keeps the ``gradio_client.Client`` path, for comparison.

Latency is wall-clock per request: upload, queue, analysis and the result's arrival. The output images
are not fetched unless ``--download`` is given (then gradio_client saves them, and the lean client GETs
each output file's URL as the page's images would): fetching them costs the clients CPU too. CPU
seconds per request of the server and of this process (all its client threads) are reported, to show
where the time went, with the load generator and the machine's load average. The exit status is
non-zero when any request failed (an error answer, an HTTP error, a timeout), any answer did not
match, or the RSS grew by more than ``--max-rss-growth-mb`` (100).
"""

from __future__ import annotations

import argparse
import json
import math
import mimetypes
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.weights.cards import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parents[2]
PHOTO_WEIGHTS = "cifar10_resnet.safetensors"
SIZES = ((32, 32), (48, 40))  # (width, height), alternating
PROB_TOL = 1e-5
DETAIL_OUTPUT = 7  # the enlarged block's chooser among the outputs of /analyze_photo
P95_TARGET_MS = 1200.0  # the serving targets, with 16 sessions on a 2-core machine (README, "Speed")
SERVER_CPU_TARGET_MS = 50.0
API_NAME = "analyze_photo"
CLIENTS = ("http", "gradio")  # the lean client (the default) and gradio_client
REQUEST_TIMEOUT_S = 120.0  # the lean client gives up on a request after this long

__all__ = ["Expected", "HttpEndpoint", "HttpSession", "LoadReport", "RemoteError", "expected_results", "make_images",
           "run_load", "run_loadtest", "main"]


# --- inputs and what the answers must be -----------------------------------------------------------


def make_images(n: int, folder: Path, seed: int = 0) -> list[Path]:
    """``n`` distinct RGB PNGs, deterministic for ``seed``: noise over a random colour, two sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        colour = rng.integers(0, 256, 3)
        noise = rng.integers(0, 256, (h, w, 3))
        mix = rng.uniform(0.2, 0.8)
        arr = np.clip(mix * colour + (1 - mix) * noise, 0, 255).astype(np.uint8)
        arr[0, 0] = (i % 256, (i // 256) % 256, 7)  # distinct by construction, whatever the generator does
        path = folder / f"load-{i:04d}.png"
        Image.fromarray(arr, "RGB").save(path)
        paths.append(path)
    return paths


@dataclass
class Expected:
    """What the page must show for one image: top-1, top-k probabilities and the summary under them.

    The summary names the blocks that change their input most and least with their ratios, and where
    the image's metrics leave the reference bands: an answer computed for another image differs there.
    (The metrics table is sent only while its tab is open, so a load of first views does not carry it.)
    """

    label: str
    probs: dict[str, float]
    summary: str

    def signature(self) -> tuple:
        return (self.label, *(round(p, 5) for p in self.probs.values()), self.summary)


def expected_results(paths: list[Path], weights_dir: Path, k: int = 5) -> list[Expected]:
    """The library's answer for each image, computed in this process (the reference for cross-talk)."""
    import torch

    from ..core.explorer import Explorer
    from ..view.analysis_view import summarise

    explorer = Explorer.from_weights(Path(weights_dir) / PHOTO_WEIGHTS, "cpu")
    out = []
    threads = torch.get_num_threads()
    # One small image at a time: a second intra-op thread gains nothing, and next to a busy server it
    # makes each analysis 5-15 times slower.
    torch.set_num_threads(1)
    try:
        for path in paths:
            analysis = explorer.analyze(str(path), k=k)
            out.append(
                Expected(
                    label=analysis.predictions[0].label,
                    probs={p.label: p.prob for p in analysis.predictions},
                    summary=summarise(analysis),
                )
            )
    finally:
        torch.set_num_threads(threads)
    return out


def check_answer(result: tuple, want: Expected) -> str | None:
    """``None`` if ``result`` (the outputs of ``/analyze_photo``) is ``want``'s page, else what differs."""
    preds, summary = result[0], result[5]
    if not isinstance(preds, dict) or preds.get("label") != want.label:
        return f"top-1 {preds.get('label') if isinstance(preds, dict) else preds!r} != {want.label!r}"
    got = {c["label"]: c["confidence"] for c in preds.get("confidences", [])}
    if set(got) != set(want.probs):
        return f"top-k classes {sorted(got)} != {sorted(want.probs)}"
    for label, p in want.probs.items():
        if abs(got[label] - p) > PROB_TOL:
            return f"p({label}) = {got[label]:.7f}, expected {p:.7f}"
    if summary != want.summary:
        return f"summary {summary!r} != {want.summary!r}"
    return None


# --- the server --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnedServer:
    """``python app.py --port P --weights-dir DIR`` of the repository at ``root`` (this one by default; another
    checkout for a before/after comparison) in a subprocess, run from that repository."""

    def __init__(self, weights_dir: Path, concurrency: int | None = None, log_path: Path | None = None,
                 root: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = [sys.executable, str(root / "app.py"), "--port", str(self.port), "--weights-dir", str(weights_dir)]
        if concurrency:
            cmd += ["--concurrency", str(concurrency)]
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="loadtest-server-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"app.py did not answer at {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._log.close()


def pid_listening_on(port: int) -> int | None:
    """The process that listens on ``port`` on this machine (for ``--url``), if it can be found."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.AccessDenied, PermissionError):
        pass
    return None


def cpu_seconds(proc, children: bool = False) -> float:
    """User + system CPU time of ``proc`` (and its live descendants)."""
    return cpu_of([proc, *(proc.children(recursive=True) if children else [])])


def cpu_of(procs) -> float:
    """User + system CPU time of the processes ``procs`` (psutil), those that have exited left out."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # noqa: BLE001 - a child may have exited
            pass
    return total


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants."""
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except Exception:  # noqa: BLE001 - the process may be gone; the run reports that itself
                return
            self._stop_event.wait(self.every)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(5)
        return self.peak


# --- the lean client: Gradio's HTTP API, as a browser tab speaks it ------------------------------------

# Components whose values gradio_client leaves out of an endpoint's outputs (gradio_client.utils.SKIP_COMPONENTS).
SKIP_TYPES = frozenset({"state", "row", "column", "tabs", "tab", "tabitem", "box", "form", "accordion", "group",
                        "interpretation", "dataset", "sidebar"})
FILE_META = {"_type": "gradio.FileData"}


class RemoteError(Exception):
    """The server answered, but with an error instead of the outputs (``success: false``, a lost session...)."""


@dataclass(frozen=True)
class HttpEndpoint:
    """One event of the page, as the front end calls it: read once from ``{root}/config``."""

    root: str  # the app's address without the trailing slash
    api_prefix: str  # "/gradio_api"
    fn_index: int
    trigger_id: int | None  # the component whose event it is (the browser sends it; EventData reads it)
    state_inputs: tuple[bool, ...]  # per input of the event: a gr.State, whose value the server keeps (sent as null)
    kept_outputs: tuple[bool, ...]  # per output: part of the answer (gradio_client drops State and layout blocks)
    heartbeat: bool  # the page keeps a heartbeat stream open (it has unload events)

    @classmethod
    def from_config(cls, url: str, api_name: str = API_NAME, timeout: float = 30.0) -> HttpEndpoint:
        import httpx

        root = url.rstrip("/")
        try:
            with httpx_client(timeout) as http:
                response = http.get(f"{root}/config")
                response.raise_for_status()
                config = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RuntimeError(f"no Gradio config at {root}/config: {exc}") from exc
        if config.get("protocol") != "sse_v3":
            raise RuntimeError(f"the app speaks {config.get('protocol')!r}; the lean client speaks sse_v3 (Gradio 6)")
        types = {c["id"]: (c["type"], c.get("skip_api", c["type"] in SKIP_TYPES)) for c in config["components"]}
        for i, dep in enumerate(config["dependencies"]):
            if dep.get("api_name") == api_name.lstrip("/"):
                targets = dep.get("targets") or [[None, None]]
                return cls(
                    root=root,
                    api_prefix=config.get("api_prefix", "/gradio_api"),
                    fn_index=dep.get("id", i),
                    trigger_id=targets[0][0],
                    state_inputs=tuple(types[c][0] == "state" for c in dep["inputs"]),
                    kept_outputs=tuple(not types[c][1] for c in dep["outputs"]),
                    heartbeat=bool(config.get("connect_heartbeat", False)),
                )
        raise ValueError(f"the app at {url} has no event with api_name {api_name!r}")

    def url(self, route: str) -> str:
        return f"{self.root}{self.api_prefix}/{route}"


def httpx_client(timeout: float):
    import httpx

    return httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0))


class HttpSession:
    """One browser tab on the page: its own ``session_hash`` and one keep-alive ``httpx.Client``.

    :meth:`predict` makes the three requests the front end makes for an upload: the file to
    ``/gradio_api/upload``, the event to ``/gradio_api/queue/join``, and the answer read from the
    ``/gradio_api/queue/data`` event stream. It returns what ``gradio_client``'s ``predict`` returns
    (with ``download_files=False``): the outputs, without the gr.State ones. Not thread-safe: one thread each.
    """

    def __init__(self, endpoint: HttpEndpoint, *, timeout: float = REQUEST_TIMEOUT_S, download: bool = False) -> None:
        self.endpoint, self.timeout, self.download = endpoint, timeout, download
        self.session_hash = uuid.uuid4().hex[:11]  # the front end's form: 11 random characters
        self.http = httpx_client(timeout)
        self.downloaded_bytes = 0
        self._closed = threading.Event()
        self._heartbeat_socket = None
        self._heartbeat = None
        if endpoint.heartbeat:  # as an open page does; closing it is what ends the session on the server
            self._heartbeat = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{self.session_hash}")
            self._heartbeat.start()

    # -- the three steps

    def upload(self, path: Path) -> dict:
        """Step 1: the file to the server's upload folder; the FileData the event then refers to."""
        path = Path(path)
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        response = self.http.post(self.endpoint.url("upload"), files=[("files", (path.name, path.read_bytes(), mime))])
        response.raise_for_status()
        return {"path": response.json()[0], "meta": dict(FILE_META), "orig_name": path.name}

    def join(self, data: list) -> str:
        """Step 2: the event into the queue; its ``event_id``."""
        body = {"data": data, "event_data": None, "fn_index": self.endpoint.fn_index,
                "trigger_id": self.endpoint.trigger_id, "session_hash": self.session_hash}
        response = self.http.post(self.endpoint.url("queue/join"), json=body)
        if response.status_code == 503:
            raise RemoteError("the queue is full")
        if response.status_code == 422:
            raise RemoteError(f"validation: {response.text[:200]}")
        response.raise_for_status()
        return response.json()["event_id"]

    def answer(self, event_id: str, deadline: float) -> list:
        """Step 3: the session's event stream, read until ``process_completed`` for ``event_id``: its outputs."""
        url = self.endpoint.url("queue/data")
        with self.http.stream("GET", url, params={"session_hash": self.session_hash}) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no answer within {self.timeout:.0f} s")
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                kind = msg.get("msg")
                if kind == "process_completed" and msg.get("event_id") == event_id:
                    output = msg.get("output") or {}
                    if not msg.get("success") or "error" in output:
                        raise RemoteError(output.get("error") or "the app raised an error and did not say which")
                    return output["data"]
                if kind == "unexpected_error":
                    raise RemoteError(msg.get("message") or "unexpected error")
                if kind == "close_stream":
                    break
        raise RemoteError(f"the event stream closed before event {event_id} completed")

    def predict(self, *args: Any) -> tuple:
        """The event's outputs for ``args`` (its API inputs, without State): ``Path`` arguments are uploaded."""
        deadline = time.monotonic() + self.timeout
        given = [self.upload(a) if isinstance(a, Path) else a for a in args]
        api_inputs = self.endpoint.state_inputs.count(False)
        if len(given) != api_inputs:
            raise ValueError(f"the event takes {api_inputs} inputs, got {len(given)}")
        values = iter(given)
        data = [None if is_state else next(values) for is_state in self.endpoint.state_inputs]
        outputs = self.answer(self.join(data), deadline)
        if self.download:
            self.fetch_files(outputs)
        return tuple(v for v, kept in zip(outputs, self.endpoint.kept_outputs) if kept)

    def fetch_files(self, value: Any) -> None:
        """GET every file among the outputs (a dict with a ``url``), as the page's <img> elements do."""
        if isinstance(value, dict):
            if isinstance(value.get("url"), str) and value.get("meta", {}).get("_type") == FILE_META["_type"]:
                if value["url"].startswith("data:"):  # sent inside the answer: nothing to fetch
                    return
                response = self.http.get(value["url"])
                response.raise_for_status()
                self.downloaded_bytes += len(response.content)
                return
            value = list(value.values())
        if isinstance(value, list):
            for v in value:
                self.fetch_files(v)

    # -- the session's life

    def _beat(self) -> None:
        import httpx

        try:
            with httpx_client(30.0) as http, http.stream(
                    "GET", self.endpoint.url(f"heartbeat/{self.session_hash}"),
                    timeout=httpx.Timeout(None, connect=10.0)) as response:
                stream = response.extensions.get("network_stream")
                self._heartbeat_socket = stream.get_extra_info("socket") if stream is not None else None
                for _ in response.iter_lines():
                    if self._closed.is_set():
                        return
        except (httpx.HTTPError, OSError):
            return

    def close(self) -> None:
        """End the session as a closed tab does: the heartbeat stream drops and the server runs its unload."""
        self._closed.set()
        sock = self._heartbeat_socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the heartbeat thread, which waits up to 15 s otherwise
            except OSError:
                pass
        if self._heartbeat is not None:
            self._heartbeat.join(2)
        self.http.close()


# --- driving it --------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    url: str
    clients: int
    requests: int
    warmup: int
    client: str = "http"  # the load generator: "http" (the lean client) or "gradio" (gradio_client)
    ok: int = 0
    failures: int = 0
    warmup_failures: int = 0
    mismatches: int = 0
    cross_talk: int = 0
    distinct_expected: int = 0
    wall_s: float = 0.0
    requests_per_s: float = 0.0
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    max_ms: float = math.nan
    mean_ms: float = math.nan
    rss_after_warmup_mb: float | None = None
    rss_after_mb: float | None = None
    rss_peak_mb: float | None = None
    rss_delta_mb: float | None = None
    max_rss_growth_mb: float = 100.0
    server_cpu_s_per_request: float | None = None
    client_cpu_s_per_request: float | None = None
    downloads: bool = False
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    load_average: tuple | None = field(default_factory=lambda: os.getloadavg() if hasattr(os, "getloadavg") else None)
    p95_target_ms: float = P95_TARGET_MS
    errors: list[str] = field(default_factory=list)  # the first few failures and mismatches, for a person

    @property
    def passed(self) -> bool:
        memory_ok = self.rss_delta_mb is None or self.rss_delta_mb <= self.max_rss_growth_mb
        clean = self.failures == 0 and self.warmup_failures == 0 and self.mismatches == 0
        return clean and self.ok == self.requests and memory_ok

    @property
    def server_cpu_target_met(self) -> bool | None:
        cpu = self.server_cpu_s_per_request
        return None if cpu is None else cpu * 1e3 <= SERVER_CPU_TARGET_MS

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "p95_target_met": self.p95_ms <= self.p95_target_ms,
                "server_cpu_target_met": self.server_cpu_target_met}

    def table(self) -> str:
        def mb(v):
            return "n/a" if v is None else f"{v:,.1f} MB"

        rows = [
            ("server", self.url),
            ("load generator", CLIENT_NAMES.get(self.client, self.client)),
            ("clients (sessions)", self.clients),
            ("requests (distinct images)", f"{self.requests} after {self.warmup} warm-up"),
            ("ok / failed / mismatched", f"{self.ok} / {self.failures} / {self.mismatches}"
             + (f" ({self.warmup_failures} failed in the warm-up)" if self.warmup_failures else "")
             + (f" ({self.cross_talk} matched another image: cross-talk)" if self.cross_talk else "")),
            ("distinct expected results", f"{self.distinct_expected} of {self.requests}"),
            ("latency p50 / p95 / max", f"{self.p50_ms:,.0f} / {self.p95_ms:,.0f} / {self.max_ms:,.0f} ms"),
            ("p95 target", f"≤ {self.p95_target_ms:,.0f} ms: "
             + ("met" if self.p95_ms <= self.p95_target_ms else "NOT met")),
            ("throughput", f"{self.requests_per_s:.2f} requests/s over {self.wall_s:.1f} s"),
            ("CPU per request: server / clients", f"{fmt_s(self.server_cpu_s_per_request)} / "
             f"{fmt_s(self.client_cpu_s_per_request)}" + (" (clients fetch the images)" if self.downloads else "")),
            ("server CPU target", f"≤ {SERVER_CPU_TARGET_MS:.0f} ms: "
             + {True: "met", False: "NOT met", None: "not measured"}[self.server_cpu_target_met]),
            ("machine", f"{self.cpu_count} cores, load average {fmt_load(self.load_average)} at the start"),
            ("server RSS after warm-up", mb(self.rss_after_warmup_mb)),
            ("server RSS after the run", mb(self.rss_after_mb)),
            ("server RSS peak during the run", mb(self.rss_peak_mb)),
            ("RSS growth", f"{mb(self.rss_delta_mb)} (limit {self.max_rss_growth_mb:.0f} MB)"),
            ("result", "PASS" if self.passed else "FAIL"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"  ! {e}" for e in self.errors]
        return "\n".join(lines)


CLIENT_NAMES = {"http": "http (httpx: upload, queue/join, queue/data)", "gradio": "gradio (gradio_client.Client)"}


def fmt_s(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1e3:,.0f} ms"


def fmt_load(load: tuple | None) -> str:
    return "n/a" if not load else " ".join(f"{x:.2f}" for x in load)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (the value below which ``q`` of the samples lie)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _settings(k: int) -> tuple:
    return ("auto", k, "f", "", [])  # as a fresh page: auto model, top-k, the maps of F(x), last block enlarged


def run_load(
    url: str,
    paths: list[Path],
    expected: list[Expected],
    *,
    clients: int = 16,
    warmup: int = 20,
    k: int = 5,
    server_pid: int | None = None,
    download_dir: Path | None = None,
    max_rss_growth_mb: float = 100.0,
    client: str = "http",
    timeout: float = REQUEST_TIMEOUT_S,
    log: Callable[[str], None] = print,
) -> LoadReport:
    """Send ``paths[warmup:]`` through ``clients`` concurrent sessions, after ``paths[:warmup]`` as warm-up.

    ``client``: ``"http"``, the lean client (:class:`HttpSession`), or ``"gradio"``, ``gradio_client.Client``.
    ``download_dir``: fetch every output image, as a browser would (gradio_client saves them there; the lean
    client reads and drops them); ``None``: do not fetch them. ``timeout``: per request, lean client only.
    """
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}, not {client!r}")
    if len(paths) != len(expected) or len(paths) <= warmup:
        raise ValueError("need one expected result per image and more images than warm-up requests")
    measured = list(range(warmup, len(paths)))
    report = LoadReport(url=url, clients=clients, requests=len(measured), warmup=warmup, client=client,
                        max_rss_growth_mb=max_rss_growth_mb)
    report.distinct_expected = len({expected[i].signature() for i in measured})
    call, sessions = open_sessions(url, client, clients, _settings(k), download_dir, timeout)
    report.downloads = download_dir is not None
    tally = _Tally(report, paths, expected)

    def drive(indices: list[int], record: bool) -> float:
        return _drive(call, sessions, indices, tally, record)

    try:
        log(f"warm-up: {warmup} requests over {clients} sessions")
        drive(list(range(warmup)), record=False)
        if report.errors:
            log("warm-up errors: " + "; ".join(report.errors[:3]))
        log(f"run: {len(measured)} requests over {clients} sessions")
        _measure(report, server_pid, lambda: drive(measured, record=True))
    finally:
        for session in sessions:
            try:
                session.close()
            except Exception:  # noqa: BLE001 - a session that cannot close cleanly changes no figure
                pass
    lat = sorted(tally.latencies)
    report.requests_per_s = len(measured) / report.wall_s if report.wall_s else 0.0
    if lat:
        report.p50_ms, report.p95_ms = percentile(lat, 0.50), percentile(lat, 0.95)
        report.max_ms, report.mean_ms = lat[-1], statistics.fmean(lat)
    return report


@dataclass
class _Tally:
    """The answers of the sessions' threads, counted into ``report``; warm-up answers count as failures only."""

    report: LoadReport
    paths: list[Path]
    expected: list[Expected]
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, msg: str) -> None:
        with self.lock:
            if len(self.report.errors) < 10:
                self.report.errors.append(msg)

    def failed(self, i: int, exc: Exception, record: bool) -> None:
        with self.lock:
            if record:
                self.report.failures += 1
            else:
                self.report.warmup_failures += 1
        self.note(f"{self.paths[i].name}: {type(exc).__name__}: {str(exc)[:200]}")

    def answered(self, i: int, result: tuple, elapsed_ms: float, record: bool) -> None:
        problem = check_answer(result, self.expected[i])
        with self.lock:
            if record:
                self.latencies.append(elapsed_ms)
                self.report.ok += problem is None
                self.report.mismatches += problem is not None
        if problem:
            other = next((j for j, e in enumerate(self.expected) if j != i and check_answer(result, e) is None), None)
            if other is not None and record:
                with self.lock:
                    self.report.cross_talk += 1
            whose = f" (it is {self.paths[other].name}'s result)" if other is not None else ""
            self.note(f"{self.paths[i].name}: {problem}{whose}")


def _drive(call: Callable[[Any, Path], tuple], sessions: list, indices: list[int], tally: _Tally,
           record: bool) -> float:
    """Request ``indices`` round-robin over the sessions, one thread each (a closed loop); the wall time."""

    def worker(session, mine: list[int]) -> None:
        for i in mine:
            t0 = time.perf_counter()
            try:
                result = call(session, tally.paths[i])
            except Exception as exc:  # noqa: BLE001 - every kind of failure is counted and reported
                tally.failed(i, exc, record)
                continue
            tally.answered(i, result, (time.perf_counter() - t0) * 1e3, record)

    threads = [threading.Thread(target=worker, args=(s, indices[c :: len(sessions)]), daemon=True)
               for c, s in enumerate(sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _measure(report: LoadReport, server_pid: int | None, run: Callable[[], float]) -> None:
    """``run()`` (which returns its wall time) with this process's CPU and, given its id, the server's CPU
    and memory (after, and the peak sampled during) written into ``report``."""
    import psutil

    me = psutil.Process()
    cpu0 = cpu_seconds(me)
    if server_pid is None:
        report.wall_s = run()
        report.client_cpu_s_per_request = (cpu_seconds(me) - cpu0) / report.requests
        return
    server = psutil.Process(server_pid)
    report.rss_after_warmup_mb = rss_bytes(server_pid) / 2**20
    server_cpu0 = cpu_seconds(server, children=True)
    sampler = PeakSampler(server_pid)
    sampler.start()
    report.wall_s = run()
    report.client_cpu_s_per_request = (cpu_seconds(me) - cpu0) / report.requests
    report.server_cpu_s_per_request = (cpu_seconds(server, children=True) - server_cpu0) / report.requests
    report.rss_after_mb = rss_bytes(server_pid) / 2**20
    report.rss_peak_mb = max(sampler.stop(), rss_bytes(server_pid)) / 2**20
    report.rss_delta_mb = report.rss_after_mb - report.rss_after_warmup_mb


def open_sessions(url: str, client: str, n: int, settings: tuple, download_dir: Path | None,
                  timeout: float = REQUEST_TIMEOUT_S) -> tuple[Callable[[Any, Path], tuple], list]:
    """``n`` sessions of the chosen client on ``url``, and how one of them analyses one image file.

    Each session sends what a browser tab would: ``settings`` first, then the enlarged block the page's
    chooser holds since the last answer (the page sets it to the last block on a session's first image).
    """
    if client == "http":
        endpoint = HttpEndpoint.from_config(url)
        sessions = [HttpSession(endpoint, timeout=timeout, download=download_dir is not None) for _ in range(n)]

        def predict(session, path: Path, args: tuple) -> tuple:
            return session.predict(Path(path), *args)
    else:
        from gradio_client import Client, handle_file

        fetch = str(download_dir) if download_dir is not None else False
        sessions = [Client(url, verbose=False, download_files=fetch) for _ in range(n)]

        def predict(session, path: Path, args: tuple) -> tuple:
            return session.predict(handle_file(str(path)), *args, api_name="/" + API_NAME)

    held: dict[int, str] = {}  # per session: the enlarged block's chooser (each session has one thread)

    def call(session, path: Path) -> tuple:
        model, k, part, detail, lesioned = settings
        result = predict(session, path, (model, k, part, held.get(id(session), detail), lesioned))
        chosen = result[DETAIL_OUTPUT]
        held[id(session)] = chosen.get("value", "") if isinstance(chosen, dict) else chosen
        return result

    return call, sessions


def write_untrained_weights(folder: Path, seed: int = 0) -> Path:
    """Random (untrained) tutorial Nets for both shipped names: a load test needs weights, not good ones."""
    import torch

    from ..core.model import TUTORIAL_CONFIG, build_model
    from ..core.weights.cards import SHIPPED, ModelCard
    from ..core.weights.files import save_weights

    torch.manual_seed(seed)
    for shipped in SHIPPED.values():
        preset = shipped.preset
        card = ModelCard.from_preset(preset, shipped.name, config=TUTORIAL_CONFIG.to_dict(), trained=False)
        # the tutorial's Net takes 3 channels: a gray preset's statistics are replicated to each
        reps = TUTORIAL_CONFIG.in_channels // len(preset.mean)
        card.mean, card.std = list(preset.mean) * reps, list(preset.std) * reps
        save_weights(build_model(), card, folder / f"{shipped.name}.safetensors")
    return folder


def run_loadtest(
    url: str | None = None,
    *,
    spawn: bool = False,
    weights_dir: Path = WEIGHTS_DIR,
    clients: int = 16,
    requests: int = 400,
    warmup: int = 20,
    k: int = 5,
    seed: int = 0,
    concurrency: int | None = None,
    server_pid: int | None = None,
    max_rss_growth_mb: float = 100.0,
    download: bool = False,
    client: str = "http",
    workdir: Path | None = None,
    log: Callable[[str], None] = print,
) -> LoadReport:
    """The whole load test: images, expected results, the server (spawned or at ``url``), the run."""
    if (url is None) == (not spawn):
        raise ValueError("give either url or spawn=True")
    weights_dir = Path(weights_dir)
    if not (weights_dir / PHOTO_WEIGHTS).is_file():
        raise FileNotFoundError(f"{weights_dir / PHOTO_WEIGHTS} not found: pass --weights-dir, or --untrained")
    own_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="loadtest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server = SpawnedServer(weights_dir, concurrency, workdir / "server.log") if spawn else None
    try:
        t0 = time.perf_counter()
        paths = make_images(warmup + requests, workdir / "images", seed)
        expected = expected_results(paths, weights_dir, k)
        log(f"{len(paths)} images and their expected results in {time.perf_counter() - t0:.1f} s")
        if server is not None:
            server.wait_ready()
            url, server_pid = server.url, server.proc.pid
        elif server_pid is None:
            from urllib.parse import urlparse

            parsed = urlparse(url)
            if parsed.hostname in ("127.0.0.1", "localhost", "::1"):
                server_pid = pid_listening_on(parsed.port or 80)
            if server_pid is None:
                log("the server's process was not found on this machine: its memory is not measured")
        report = run_load(url, paths, expected, clients=clients, warmup=warmup, k=k, server_pid=server_pid,
                          download_dir=workdir / "downloads" if download else None,
                          max_rss_growth_mb=max_rss_growth_mb, client=client, log=log)
        if server is not None and server.proc.poll() is not None:
            report.failures += 1
            report.errors.append(f"the server exited during the run:\n{server.log_tail()}")
        return report
    finally:
        if server is not None:
            server.stop()
        if own_workdir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running app, e.g. http://127.0.0.1:7860/ (it must serve --weights-dir)")
    where.add_argument("--spawn", action="store_true", help="start `python app.py` on a free port for the test")
    parser.add_argument("--clients", type=int, default=16, help="concurrent sessions (default 16)")
    parser.add_argument("--requests", type=int, default=400, help="measured requests, one distinct image each")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests before memory is read")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR,
                        help="folder with cifar10_resnet.safetensors (default: the shipped weights/)")
    parser.add_argument("--untrained", action="store_true",
                        help="with --spawn: serve random untrained weights written to a temporary folder")
    parser.add_argument("--concurrency", type=int, default=None, help="with --spawn: app.py --concurrency")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's process id, for its RSS")
    parser.add_argument("--k", type=int, default=5, help="top-k asked for and checked (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=100.0)
    parser.add_argument("--download", action="store_true",
                        help="fetch every output image as a browser would (costs this machine's CPU too)")
    parser.add_argument("--client", choices=CLIENTS, default="http",
                        help="the load generator: http, a lean httpx client speaking Gradio's HTTP API as a browser "
                        "does (default), or gradio, gradio_client.Client (costs this machine more CPU per request)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    weights_dir = args.weights_dir
    scratch = None
    if args.untrained:
        if not args.spawn:
            parser.error("--untrained needs --spawn")
        scratch = tempfile.TemporaryDirectory(prefix="loadtest-weights-")
        weights_dir = write_untrained_weights(Path(scratch.name))
    try:
        report = run_loadtest(
            args.url, spawn=args.spawn, weights_dir=weights_dir, clients=args.clients, requests=args.requests,
            warmup=args.warmup, k=args.k, seed=args.seed, concurrency=args.concurrency, server_pid=args.pid,
            max_rss_growth_mb=args.max_rss_growth_mb, download=args.download, client=args.client,
            log=lambda m: print(m, file=sys.stderr),
        )
    except (FileNotFoundError, RuntimeError, TimeoutError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if scratch is not None:
            scratch.cleanup()
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
