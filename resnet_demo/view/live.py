"""The live paths: the webcam analysed at video rate, and the drawing pad while the pen moves.

**The webcam** (``LiveCamera``). The page grabs a small frame from its camera, asks the server for its analysis
(:meth:`LiveCamera.frame`, one call, not a queued Gradio event), shows the answer in the live view (prediction,
the input as the model saw it, the strip of feature maps, the residual bars) and only then grabs the next frame:
one frame in flight per visitor, so the rate is set by the analysis, and frames the server cannot take in time
are never taken (the camera keeps running; nothing is queued). Every ``SYNC_S`` (and when the camera stops) the
page also sends its current frame through the page's ordinary event, which updates every other component and
the session's state (the tools then work on that frame) and carries the page's settings (model, top-k, which
maps; a change of one of them sends a frame at once): the live calls use the settings last sent by their page.

Several live visitors share the machine: :class:`RateCap` gives each at most its share of a budget of analyses a
second (never less than a floor), and at most ``at_once`` live analyses run at the same time, so that live
webcams do not starve the visitors who upload photos.

**The drawing pad** (:func:`canvas_frame`): the page sends what the pad shows while the pen moves, as an image.

Nothing here draws: the analysis and its pictures are the page's own (``Pages.analyze``, ``build_page``).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from ..core.errors import InputError
from ..core.preprocess import load_image
from .render import png_data_url
from .results import AnalysisView, Settings

__all__ = ["MAX_FRAME_CHARS", "MAX_FRAME_SIDE", "SYNC_S", "LiveCamera", "RateCap", "canvas_frame", "live_answer"]

# A frame is a picture the page drew: the webcam's at 160 px on its long side (a few KB as a JPEG), the drawing
# pad's paper (280x280 at the page's zoom, x2 on a HiDPI screen) as a PNG. Anything far larger, or larger than
# any screen's canvas, did not come from the page.
MAX_FRAME_CHARS = 4_000_000
MAX_FRAME_SIDE = 4096
SYNC_S = 5.0  # the live page updates the rest of the page (and the session's state) this often, and soon after
# one of the page's controls changes
_FORMATS = ("data:image/png;base64,", "data:image/jpeg;base64,", "data:image/webp;base64,")
_SESSION = re.compile(r"[A-Za-z0-9_-]{8,64}")


def canvas_frame(data_url: str, what: str = "The drawing pad") -> Image.Image:
    """The picture in a ``data:image/...;base64`` URL the page drew, decoded as every upload is.

    Raises:
        InputError: not a PNG, JPEG or WebP data URL, too large, or not a readable image.
    """
    if not isinstance(data_url, str) or not data_url.startswith(_FORMATS):
        raise InputError(f"{what} sent something that is not a picture.")
    if len(data_url) > MAX_FRAME_CHARS:
        raise InputError(f"{what}'s picture is too large ({len(data_url) / 1e6:.1f} MB).")
    try:
        data = base64.b64decode(data_url.partition(",")[2], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what}'s picture could not be decoded.") from None
    try:  # the size from the header, before anything is decoded
        with Image.open(io.BytesIO(data)) as head:
            width, height = head.size
    except Exception:  # noqa: BLE001 - PIL raises many types for what is not an image; load_image says which
        width = height = 0
    if max(width, height) > MAX_FRAME_SIDE:
        raise InputError(f"{what}'s picture is {width}x{height}; at most {MAX_FRAME_SIDE} a side.")
    return load_image(data)


def live_answer(view: AnalysisView) -> dict:
    """What the live view shows of one analysis, as JSON: top-k, the input as the model saw it, the strip of
    every block's feature maps, the residual chart (PNG data URLs) and the summary's first line (plain text)."""
    page = view.page
    strip = page.grids.image if hasattr(page.grids, "image") else None
    first = page.summary.split("\n", 1)[0].replace("**", "").rstrip()
    return {
        "predictions": [[label, round(float(p), 4)] for label, p in page.predictions.items()],
        "input": png_data_url(page.model_input),
        "strip": png_data_url(strip) if strip is not None else None,
        "chart": png_data_url(page.chart) if page.chart is not None else None,
        "summary": first,
    }


def _default_budget() -> float:
    """Live analyses a second for all live visitors together: 6 per core (an analysis takes ~50 ms of one core),
    so that live visitors leave about half of a CPU machine to everyone else; one live visitor on 2 cores gets
    12 a second."""
    return float(os.environ.get("RESNET_DEMO_LIVE_FPS", 6 * (os.cpu_count() or 1)))


class RateCap:
    """How often one live session is analysed: a shared budget of analyses a second, split evenly between the
    sessions live in the last ``window_s``, never below ``floor`` a session.

    :meth:`delay` is how long a session's frame waits for its turn; the page sends its next frame only once
    this one is answered, so a session that waits holds nothing else back.
    """

    def __init__(self, budget: float | None = None, floor: float = 3.0, window_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = _default_budget() if budget is None else float(budget)
        self.floor, self.window_s, self.clock = float(floor), float(window_s), clock
        self._due: dict[str, float] = {}  # session -> when its last frame was (or will be) analysed
        self._seen: dict[str, float] = {}  # session -> when it last sent a frame
        self._lock = threading.Lock()

    def rate(self, now: float | None = None) -> float:
        """Analyses a second each live session gets now."""
        now = self.clock() if now is None else now
        live = sum(now - t <= self.window_s for t in self._seen.values())
        return max(self.floor, self.budget / max(1, live))

    def delay(self, session: str) -> float:
        """Seconds until this frame of ``session`` may be analysed (0: now); its turn is taken."""
        with self._lock:
            now = self.clock()
            self._seen[session] = now
            for gone in [s for s, t in self._seen.items() if now - t > 60 * self.window_s]:
                self._seen.pop(gone, None)
                self._due.pop(gone, None)
            last = self._due.get(session)
            due = now if last is None else max(now, last + 1.0 / self.rate(now))
            self._due[session] = due
            return due - now


@dataclass(frozen=True)
class LiveRequest:
    session: str  # chosen by the page (not Gradio's session: the live calls do not go through the queue)
    frame: str  # the frame as a data URL


def live_request(payload) -> LiveRequest:
    """The page's ``{"session": ..., "frame": ...}`` (a dict, or its JSON text), checked."""
    if isinstance(payload, str):
        import json

        try:
            payload = json.loads(payload)
        except ValueError:
            raise InputError("The live camera sent something that is not a frame.") from None
    if not isinstance(payload, dict):
        raise InputError("The live camera sent something that is not a frame.")
    session, frame = payload.get("session"), payload.get("frame")
    if not isinstance(session, str) or not _SESSION.fullmatch(session):
        raise InputError("The live camera's session is not valid.")
    if not isinstance(frame, str):
        raise InputError("The live camera sent no frame.")
    return LiveRequest(session, frame)


class LiveCamera:
    """The server's side of the live webcam: each page's settings, the rate cap, and the live analyses' bound.

    ``analyze(image, kind, settings, previous, chart=...)`` is the page's analysis (``Pages.analyze``, wrapped as
    every handler that computes is).
    """

    def __init__(self, analyze: Callable[..., AnalysisView], cap: RateCap | None = None,
                 at_once: int | None = None, sessions: int = 1000) -> None:
        self.analyze = analyze
        self.cap = cap or RateCap()
        self._slots = threading.BoundedSemaphore(at_once or max(1, os.cpu_count() or 1))
        self._settings: OrderedDict[str, tuple[Settings, bool]] = OrderedDict()
        self._sessions = sessions
        self._lock = threading.Lock()

        def frame(payload) -> dict:  # a plain function (Gradio marks the functions a page may call): server.frame()
            return self.answer(payload)

        self.frame = frame

    def remember(self, session: str, settings: Settings, chart: bool) -> None:
        """The settings a page sent with its last synced frame: its live frames are analysed with them."""
        with self._lock:
            self._settings[session] = (settings, bool(chart))
            self._settings.move_to_end(session)
            while len(self._settings) > self._sessions:
                self._settings.popitem(last=False)

    def settings(self, session: str) -> tuple[Settings, bool]:
        with self._lock:
            return self._settings.get(session, (Settings(), False))

    def answer(self, payload) -> dict:
        """One live frame analysed: :func:`live_answer`'s JSON, or ``{"error": message}``."""
        try:
            req = live_request(payload)
            time.sleep(self.cap.delay(req.session))
            image = canvas_frame(req.frame, "The live camera")
            settings, chart = self.settings(req.session)
            with self._slots:
                view = self.analyze(image, "photo", settings, None, chart=chart)
            return live_answer(view)
        except (ValueError, KeyError) as exc:  # InputError is a ValueError; a model that is gone is a KeyError
            return {"error": str(exc).strip("'\"")}
