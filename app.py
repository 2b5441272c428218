"""Residual Block Explorer: the page. Layout and event wiring only; the work happens in ``resnet_demo``.

    python app.py                      # http://127.0.0.1:7860
    python app.py --weights my_net.pth # also explore your own checkpoint of the tutorial's Net
    python app.py --arch resnet50 --weights resnet50.pth

The page is built tab by tab: each function below lays out one part of the page and wires its own
events. Handlers return typed results (``resnet_demo.view.results``) whose fields are mapped to
components by name. This file talks to ``resnet_demo.view`` only, and to the core's error types.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Nothing may leave the machine: no analytics, no version check, no hub lookups.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Gradio's queue recomputes a summary of every recorded event (a pandas group-by over up to 10,000 of them)
# after each event, for a monitoring page this app does not enable: 2 ms a request after 600 events, 6 ms
# after 10,000. Once per 1,000 events, over the last 1,000, it costs nothing measurable.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")
# Charts are drawn with matplotlib's object API; without a named backend, Gradio's first event resolves
# one by importing pyplot (~1 s of the first visitor's wait).
os.environ.setdefault("MPLBACKEND", "agg")

# Python's cyclic garbage collector runs hundreds of times while gradio and torch import (their modules
# allocate millions of objects, none of them garbage): off for the imports, it takes ~0.8 s less of the
# start. The objects of the imports then go to the permanent generation (gc.freeze), so later
# collections do not walk them either.
gc.disable()
import gradio as gr  # noqa: E402
from gradio.data_classes import ImageData  # noqa: E402
from gradio.utils import _parse_file_size  # noqa: E402
from PIL import Image  # noqa: E402

from resnet_demo.core.errors import WeightsError  # noqa: E402
from resnet_demo.view.analysis_view import METRIC_COLUMNS  # noqa: E402
from resnet_demo.view.channel_page import ChannelView  # noqa: E402
from resnet_demo.view.dataset_page import SHIPPED_SET, SORTS, USER_SET, SetFilter, SetView  # noqa: E402
from resnet_demo.view.insight_view import SWEEP_COLUMNS  # noqa: E402
from resnet_demo.view.live import SYNC_S, LiveCamera, canvas_frame, live_request  # noqa: E402
from resnet_demo.view.pages import Pages  # noqa: E402
from resnet_demo.view.registry import (  # noqa: E402
    AUTO,
    CUSTOM,
    HUB_PREFIX,
    Registry,
    default_registry,
    example_caption,
    example_kind,
    prepare_process,
    start_serving,
)
from resnet_demo.view.render import PART_LABELS, png_data_url  # noqa: E402
from resnet_demo.view.results import AnalysisView, InsideView, Settings, UploadRequest  # noqa: E402
from resnet_demo.view.timeline_view import Timelines  # noqa: E402
from resnet_demo.view.uploads import ARCH_CHOICES, MAX_HELD_BYTES, PRESET_CHOICES, UserModels  # noqa: E402

gc.freeze()
gc.enable()

try:  # Hugging Face Spaces with ZeroGPU: the decorated function gets a GPU for its duration.
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn):
        return fn


ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted((ROOT / "examples").glob("*.*"))
MAX_UPLOAD = "10mb"  # an image; the server refuses larger uploads outright when uploaded models are off
MAX_CHECKPOINT = "512mb"  # an uploaded checkpoint: well above ResNet-152's ~230 MB
THEME = gr.themes.Default(  # system fonts: the default theme would fetch Google Fonts
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)
PART_CHOICES = [(f"{label} ({key})", key) for key, label in PART_LABELS.items()]
# Gradio keeps every session's page state (~150 KB here: a copy of the page's component configs)
# until this many newer sessions have come; its default, 10,000, would let a public demo grow by
# ~1.5 GB. A session evicted while its tab is still open loses only the tools' memory of its image.
SESSIONS = 1000
STATUS_UPDATE_S = 1.0
# Feature maps and the model's input are sent at (near) their own resolution: the browser enlarges them
# the way PIL's nearest-neighbour would, for a fraction of the server's PNG encoding (view/analysis_view.py: SCREEN).
CSS = """.pixelated img { image-rendering: pixelated; object-fit: contain !important; }
#block-grids img { margin-top: 26px; }"""  # the strip sizes itself (deep models: rows by stage) below its label


def queue_options(concurrency: int, max_size: int = 256) -> dict:
    """The queue's settings. Queue positions go to waiting visitors once a second: by default ("auto")
    every waiting session gets a message each time any event starts, 14 messages a request with 16
    sessions waiting on 2 workers (the load test: 51 -> 48 ms of server CPU per request)."""
    return {"default_concurrency_limit": concurrency, "max_size": max_size, "status_update_rate": STATUS_UPDATE_S}


def launch_options(uploads: bool) -> dict:
    """What every launch of the page needs. Gradio has one upload limit for the whole server: with uploaded
    models on it is the checkpoint's, and images are held to :data:`MAX_UPLOAD` by :class:`PhotoInput`."""
    return {"max_file_size": MAX_CHECKPOINT if uploads else MAX_UPLOAD, "theme": THEME, "css": CSS}

# The live webcam (resnet_demo/view/live.py says how it works): its own camera view in the page and a closed
# loop, a frame grabbed, sent (one server call, not a queued event), answered, shown, then the next. Gradio's
# streaming webcam sends a frame every `stream_every` whether or not the last one was answered (half or more of them
# wasted) and each frame sent or answered costs the page tens of ms of Gradio's front-end state copies. Measured with
# `python -m resnet_demo.tools.livebench` on 2 cores, runs alternating at a load average of 7-8: that stream 2.9
# frames/s (p95 1.2-1.4 s), 9.7-10 once tuned (320x240 camera, stream_every 0.08, fewer outputs; p95 0.26-0.33 s),
# this loop 10.7-11.3 (p95 0.12-0.13 s); with 4 visitors, tuned stream 0.8-1 frames/s each, this loop 2-2.3.
LIVE_SIDE_PX = 160  # the frame sent: its long side (the model sees 32x32)
LIVE_TEMPLATE = """<div class="live">
  <div class="live-row">
    <div class="live-cam"><video playsinline muted></video>
      <button id="live-start" class="lg primary">Start the camera</button>
      <span id="live-rate"></span></div>
    <div class="live-side"><div id="live-top"></div>
      <img id="live-input" class="live-px" alt="the input as the model saw it"></div>
  </div>
  <p id="live-note"></p>
  <p class="live-hint">Live: the prediction, the input as the model saw it, every block's feature maps (strip) and
  residual magnitudes (chart), frame after frame. The rest of the page follows every few seconds and keeps the last
  frame when you stop.</p>
  <img id="live-strip" class="live-px" alt="every block's feature maps">
  <img id="live-chart" alt="the residual magnitudes">
</div>"""
LIVE_CSS = """
.live-row { display: flex; gap: 12px; align-items: flex-start; }
.live-cam { flex: 3; } .live-side { flex: 2; }
.live-cam video { width: 100%; max-height: 240px; background: #222; transform: scaleX(-1); border-radius: 6px; }
#live-rate { margin-left: 8px; font-size: 0.85em; opacity: 0.7; }
.live-px { image-rendering: pixelated; }
#live-input { width: 96px; height: 96px; margin-top: 6px; }
#live-strip, #live-chart { width: 100%; margin-top: 6px; }
#live-strip:not([src]), #live-chart:not([src]), #live-input:not([src]) { display: none; }
.live-bar { display: flex; gap: 6px; font-size: 0.9em; align-items: center; }
.live-bar span { width: 40%; overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }
.live-bar b { height: 0.7em; background: var(--color-accent); border-radius: 2px; }
#live-note:empty { display: none; }
#live-note { color: var(--error-text-color, #b91c1c); }
.live-hint { font-size: 0.85em; opacity: 0.75; margin: 4px 0; }
"""
LIVE_JS = """
const $ = s => element.querySelector(s);
const video = $('video'), button = $('#live-start'), rate = $('#live-rate'), note = $('#live-note');
const top = $('#live-top'), input = $('#live-input'), strip = $('#live-strip'), chart = $('#live-chart');
const session = Array.from(crypto.getRandomValues(new Uint8Array(12)), b => b.toString(16).padStart(2, '0')).join('');
const canvas = document.createElement('canvas');
const use = ' Use the Photo tab to upload or paste a picture instead.';
const why = {
  NotFoundError: 'No camera was found on this device.' + use,
  OverconstrainedError: 'No camera was found on this device.' + use,
  NotAllowedError: 'The camera was not allowed: allow it in the browser (the icon in the address bar), try again.',
  SecurityError: 'The camera was not allowed: allow it in the browser (the icon in the address bar), try again.',
  NotReadableError: 'The camera could not be started: another program may be using it.' + use,
  AbortError: 'The camera could not be started: another program may be using it.' + use,
};
const say = text => { note.textContent = text || ''; };
let stream = null, running = false, synced = 0, times = [];
if (!window.isSecureContext) {
  say('The browser offers the camera only to secure pages: open this app over https:// (or at http://localhost).'
      + use);
} else if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
  say('This browser offers no camera to web pages.' + use);
} else {
  navigator.mediaDevices.enumerateDevices().then(devices => {
    if (!devices.some(d => d.kind === 'videoinput')) say('No camera was found on this device.' + use);
  }).catch(() => {});
}
const grab = () => {
  const w = video.videoWidth, h = video.videoHeight;
  if (!w || !h) return null;
  const k = SIDE / Math.max(w, h);
  canvas.width = Math.round(w * k); canvas.height = Math.round(h * k);
  const g = canvas.getContext('2d');
  g.setTransform(-1, 0, 0, 1, canvas.width, 0);  // mirrored, as the preview shows it
  g.drawImage(video, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL('image/jpeg', 0.85);
};
const show = r => {
  top.replaceChildren(...r.predictions.slice(0, 5).map(([label, p]) => {
    const row = document.createElement('div'), name = document.createElement('span'), bar = document.createElement('b');
    const pct = document.createElement('i');
    row.className = 'live-bar'; name.textContent = label; bar.style.width = (p * 50).toFixed(1) + '%';
    pct.textContent = (p * 100).toFixed(1) + '%'; row.append(name, bar, pct); return row;
  }));
  input.src = r.input;
  if (r.strip) strip.src = r.strip;
  if (r.chart) chart.src = r.chart;
  say('');
};
const pause = ms => new Promise(done => setTimeout(done, ms));
const sync = frame => { synced = performance.now(); props.value = JSON.stringify({session, frame}); };
// a control of the page changed (model, top-k, which maps...): send its settings with the next frame
const changed = e => {
  if (running && !element.contains(e.target)) synced = Math.min(synced, performance.now() - SYNC_MS + 300);
};
document.addEventListener('input', changed, true);
document.addEventListener('change', changed, true);
const loop = async () => {
  while (running) {
    const frame = grab();
    if (!frame) { await pause(50); continue; }
    if (performance.now() - synced > SYNC_MS) sync(frame);  // the rest of the page follows, more slowly
    let answer;
    try { answer = await server.frame({session, frame}); }
    catch (e) { say('The server did not answer; trying again.'); await pause(1000); continue; }
    if (!running) break;
    if (answer.error) { say(answer.error); await pause(500); continue; }
    show(answer);
    const now = performance.now(); times.push(now); times = times.filter(t => now - t < 2000);
    rate.textContent = (times.length / 2).toFixed(1) + ' frames/s';
  }
};
const stop = () => {
  running = false;
  const last = grab();
  if (stream) stream.getTracks().forEach(t => t.stop());
  stream = null; video.srcObject = null; button.textContent = 'Start the camera'; rate.textContent = '';
  if (last) sync(last);  // the page and the tools keep the last frame
};
button.addEventListener('click', async () => {
  if (running) { stop(); return; }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) return;
  try {
    const want = {video: {width: {ideal: 320}, height: {ideal: 240}}, audio: false};
    stream = await navigator.mediaDevices.getUserMedia(want);
  } catch (e) { say(why[e.name] || ('The camera could not be started: ' + e.name + '.' + use)); return; }
  video.srcObject = stream;
  await video.play();
  running = true; synced = 0; times = []; button.textContent = 'Stop'; say('');
  loop();
});
""".replace("SIDE", str(LIVE_SIDE_PX)).replace("SYNC_MS", str(int(SYNC_S * 1000)))

# The drawing pad answers while the pen moves. Gradio's sketchpad reports a change only at pen lift, and only after
# encoding its layers as PNGs in the browser's idle time (1-2 s on a busy machine). This script reads the pad's
# picture itself, at most every LIVE_PAD_MS while the pen is down: the editor draws with WebGL, whose canvas can be
# read outside the frame it was drawn in only when made with preserveDrawingBuffer, so the script asks for that on
# every WebGL canvas made after it runs (at page load; the editor makes its canvas when the Draw tab opens). It
# sends the paper only: the bounding box of the near-white pixels, less its 2-pixel border, as a PNG data URL in
# the hidden component's value, whose change the server analyses (always_last: frames that come while one is
# analysed are dropped but the last). Pen lift still sends Gradio's own value, which has the last word.
LIVE_PAD_MS = 150
LIVE_PAD_JS = """
const make = HTMLCanvasElement.prototype.getContext;
if (!make.keepsFrame) {
  const keep = function (type, attrs) {
    if (type === 'webgl' || type === 'webgl2') attrs = Object.assign({}, attrs, {preserveDrawingBuffer: true});
    return make.call(this, type, attrs);
  };
  keep.keepsFrame = true;
  HTMLCanvasElement.prototype.getContext = keep;
}
let down = false, last = 0, timer = null;
const paper = () => {
  const c = document.querySelector('#sketchpad canvas');
  if (!c || !c.width || !c.height) return null;
  const o = document.createElement('canvas'); o.width = c.width; o.height = c.height;
  const g = o.getContext('2d', {willReadFrequently: true}); g.drawImage(c, 0, 0);
  const px = g.getImageData(0, 0, o.width, o.height).data;
  let x0 = o.width, y0 = o.height, x1 = -1, y1 = -1;
  for (let y = 0, i = 0; y < o.height; y++) for (let x = 0; x < o.width; x++, i += 4) {
    if (px[i] > 235 && px[i + 1] > 235 && px[i + 2] > 235) {
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
  }
  if (x1 - x0 < 16 || y1 - y0 < 16) return null;  // no paper to be seen: the canvas could not be read
  const out = document.createElement('canvas'); out.width = x1 - x0 - 3; out.height = y1 - y0 - 3;
  out.getContext('2d').drawImage(o, x0 + 2, y0 + 2, out.width, out.height, 0, 0, out.width, out.height);
  return out.toDataURL('image/png');
};
const send = () => {
  timer = null;
  if (!down) return;
  const url = paper();
  last = performance.now();
  if (url && url !== props.value) props.value = url;
};
const onPad = e => e.target instanceof HTMLCanvasElement && e.target.closest('#sketchpad');
document.addEventListener('pointerdown', e => { if (onPad(e)) { down = true; last = performance.now(); } }, true);
document.addEventListener('pointermove', () => {
  if (down && !timer) timer = setTimeout(send, Math.max(0, EVERY_MS - (performance.now() - last)));
}, true);
const up = () => { down = false; if (timer) { clearTimeout(timer); timer = null; } };
document.addEventListener('pointerup', up, true);
document.addEventListener('pointercancel', up, true);
""".replace("EVERY_MS", str(LIVE_PAD_MS))

# The editor appears some time after the tab opens (~2 s on a slow machine): look for the brush for up to 10 s.
SELECT_BRUSH_JS = """() => { let tries = 0; const pick = () => {
  const b = document.querySelector('#sketchpad button[aria-label="Brush"]');
  if (b) { b.click(); } else if (++tries < 100) { setTimeout(pick, 100); } }; setTimeout(pick, 100); }"""

HOW_TO_READ = {
    "predictions": "The model's top-k classes with softmax probabilities. The small image is the input "
    "**as the network saw it** after preprocessing (32×32 for the shipped models).",
    "maps": "One tile per channel, the 16 most active first. **F(x)** is the residual branch — what the "
    "block *adds*: red is positive, blue negative, white zero. **x** and **y** are the block's input and output "
    "(after ReLU, so never negative: dark = 0, bright = large). Each grid shares one colour scale, so strong "
    "channels look strong. Pick a block below (or click a grid) to see all its channels, each on its own scale.",
    "channel": "**What does a channel respond to?** Click a tile of the enlarged block (or give a channel number): "
    "its map on your image, the shipped test images that excite it most (each cropped where the channel peaks, "
    "with its mean value) and, for F(x), those it pushes down most: the branch both adds and removes. *Optimise* "
    "draws an image that excites the channel as much as it can (Olah et al., Distill 2017), for F(x) and y.",
    "residual": "Bars: **‖F(x)‖ / ‖s(x)‖**, how much each block changes what flows through it "
    "(Jastrzębski et al. 2018). Near 0 the block is almost an identity; near 1 it rewrites its input. "
    "The line: **cosine(F, s)**: positive = the branch amplifies the input, negative = it suppresses it. "
    "Grey bands, when shown, are the 5–95 and 25–75 percentile ranges over the test set.",
    "lesions": "**Lesion** a block (Veit et al. 2016): remove its branch so that y = relu(s(x)) — only the "
    "shortcut remains. Residual networks often survive losing one block (they behave like ensembles of shallower "
    "paths); the sweep shows which blocks this image cannot do without. KL is the divergence of the lesioned "
    "prediction from the intact one.",
    "readout": "**Readout**: the classifier head (pool + linear) applied to the output of every block as wide as "
    "the head. It shows how the prediction forms with depth, and the block from which it no longer changes. "
    "**Linear probes** (for the shipped models): a linear classifier trained on each block's pooled output, "
    "measured on held-out test images, beside the head's own accuracy at that block: where the class is already "
    "linearly readable, against where the network's head can use it. Dots: the probes' probability of this "
    "image's predicted class.",
    "gradcam": "**Grad-CAM** (Selvaraju et al. 2017): the block's channels weighted by the gradient of the class "
    "score, summed, kept where positive: where in the image the evidence for the class sits at that depth.",
    "upload": "Explore **your own ResNet**: a `.safetensors` file or a PyTorch state dict saved with "
    "`torch.save(model.state_dict(), path)` (a whole pickled model is refused: it could run code). The architecture "
    "is recognised from the keys and shapes: the tutorial's Net or any configuration of this project's ResNet, "
    "torchvision ResNet-18 to 152, wide ResNets and ResNeXt. Give the class names (a file, one per line, or typed) "
    "and how inputs were prepared. The model is kept for this browser session only, at most 3 per session; the "
    "file is deleted once read.",
    "compare": "**Compare** the model chosen above (A) with another (B) on the same image: both predictions, "
    "the residual magnitudes of both on one chart (blocks paired by depth), each model's last block, and the "
    "lesion sweep and readout of both. **Block similarity** computes linear CKA (Kornblith et al. 2019) between "
    "every block of A and every block of B over A's shipped test images (for a model without them, your labelled ZIP "
    "given for A in the Data set tab): a bright cell means the two blocks "
    "represent those images alike (up to rotation and scale). A against itself shows the network's own block "
    "structure; two trainings of one architecture show where they diverge.",
    "timeline": "**Training timeline**: the same image through snapshots of one training run (saved with "
    "`train --snapshots N`, log-spaced: early steps change most). Move the slider to see the prediction, the residual "
    "magnitudes and the readout at that moment. The chart below follows every block's **median** ‖F(x)‖/‖s(x)‖ and "
    "cosine over the shipped test images across the run: how the blocks settle, as the network learns, from "
    "rewriting their input to refining it. Snapshots can also be model B in *Compare*.",
    "dataset": "**The data set behind one image.** The model's predictions over the shipped test images of its "
    "data (or a labelled ZIP of yours: one folder per class, named as the model's classes, at most 2,000 images). "
    "The **confusion matrix** counts true classes (rows) against predicted ones (columns); click a cell to see "
    "those images, or a class name for all of its row or column. The gallery shows the most confidently wrong "
    "first; click an image to analyse it in the main view.",
    "study": "**Which blocks each class needs** (Veit et al.'s lesion study, by class): each block's branch removed in "
    "turn over the set this tab shows (the shipped test images, or your labelled ZIP). A red cell: that class loses "
    "accuracy without that block. The chart scales one "
    "branch at a time by α from 0 (removed) through 1 (intact) to 2 (doubled): how much of a block's size matters.",
    "inside": "**Inside the block**: what one block does to one of its output channels, step by step, on your image. "
    "Pick a block and a channel (or click a tile of the enlarged block above). Top: the block's real layers, the "
    "residual branch F(x) above, the shortcut s(x) below, joined at the sum. Middle: the map after every step; "
    "**F(x)**, **s(x)**, **F(x)+s(x)** and **y** share one colour scale (red positive, blue negative), since they add "
    "up. Bottom left: the input channels that feed this channel most; right: where y comes from, orange where the "
    "branch dominates, purple where the shortcut does. Click any of those maps for that position's numbers. "
    "Opening it re-runs this one block (not the network).",
    "export": "Download the current analysis: a JSON with predictions, every per-block metric, the lesion of the "
    "blocks chosen in *Lesions*, the sweep, the readout and a reference to the model card, plus the images as PNG.",
}


def to_gr_error(fn):
    """Turn the library's input and weights errors into a message on the page."""

    @functools.wraps(fn)  # keeps the signature: Gradio reads it to pass gr.Request and gr.SelectData
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, KeyError, WeightsError) as exc:  # InputError is a ValueError
            raise gr.Error(str(exc).strip("'\""), print_exception=False) from None

    return wrapper


class PhotoInput(gr.Image):
    """``gr.Image`` that lets the project's decoder judge a bad upload, so the page shows its clear message.

    ``is_template`` makes the front end render it as a plain image component.
    """

    is_template = True

    def preprocess(self, payload):
        if payload is not None and payload.path and os.path.getsize(payload.path) > _parse_file_size(MAX_UPLOAD):
            size = os.path.getsize(payload.path) / 2**20
            raise gr.Error(f"The image file is {size:.1f} MiB; the limit is {MAX_UPLOAD[:-2]} MiB.",
                           print_exception=False)
        try:
            return super().preprocess(payload)
        except Exception:  # noqa: BLE001 - PIL raises many types for hostile files
            raise gr.Error(Pages.upload_error(payload.path), print_exception=False) from None


class InlineImage(gr.Image):
    """An output ``gr.Image`` sent inside the event's message as a PNG data URL.

    For the three images every analysis (and every frame of a drawing or the webcam) sends. A plain
    ``gr.Image`` output is encoded at zlib level 6, hashed, written to Gradio's cache and checked against
    the allowed paths, and then the browser fetches each file with a request of its own: with a dozen
    small images a second per session, that was the largest part of the server's work after the model.
    Here: one encoding at level 1 (:func:`png_data_url`), no file, no second request. The component,
    its events (a click's coordinates) and what the person sees are unchanged.
    """

    is_template = True

    def postprocess(self, value):
        if isinstance(value, Image.Image):
            return ImageData(url=png_data_url(value), mime_type="image/png")
        return super().postprocess(value)


# --- the parts of the page, each laid out (and, for the tools, wired) by a function of its own --------


@dataclass
class Controls:
    """What every handler reads: the session's state and the model and top-k chosen."""

    state: gr.State
    model_key: gr.Dropdown
    k: gr.Slider


@dataclass
class InputsPanel:
    photo: gr.Image
    sketch: gr.Sketchpad
    webcam: gr.HTML  # the live camera (LIVE_JS); its value is the frame it last synced with the page
    gallery: gr.Gallery
    pen: gr.HTML  # the drawing pad's picture while the pen moves (LIVE_PAD_JS)
    camera: LiveCamera  # the live camera's server side


def inputs_panel(camera: LiveCamera) -> InputsPanel:
    with gr.Tabs():
        with gr.Tab("Photo", id="photo"):
            photo = PhotoInput(sources=["upload", "clipboard", "webcam"], type="filepath", image_mode=None,
                               label="Upload, paste or snap", height=260, elem_id="photo")
        with gr.Tab("Draw", id="draw") as draw_tab:
            sketch = gr.Sketchpad(
                label="Draw a digit (updates while you draw)", type="numpy", image_mode="RGBA",
                canvas_size=(280, 280), brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"),
                elem_id="sketchpad",
            )
        with gr.Tab("Live webcam", id="webcam"):
            webcam = gr.HTML("", html_template=LIVE_TEMPLATE, css_template=LIVE_CSS, js_on_load=LIVE_JS,
                             server_functions=[camera.frame], elem_id="webcam", padding=True)
        with gr.Tab("Examples", id="examples"):
            gallery = gr.Gallery(value=[(str(p), example_caption(p)) for p in EXAMPLES], columns=6, height=260,
                                 object_fit="contain", allow_preview=False, label="Test-set examples",
                                 elem_id="examples")
    # Made with the page, before the Draw tab's editor makes its canvas (LIVE_PAD_JS needs that order).
    pen = gr.HTML("", html_template="<span></span>", js_on_load=LIVE_PAD_JS, visible="hidden", elem_id="pen")
    # The sketchpad starts with no tool selected; pick the brush so the user can draw at once.
    draw_tab.select(None, None, None, js=SELECT_BRUSH_JS)
    return InputsPanel(photo, sketch, webcam, gallery, pen, camera)


@dataclass
class ResultsPanel:
    predictions: gr.Label
    model_input: gr.Image
    summary: gr.Markdown

    def show(self, result: AnalysisView) -> dict:
        return {self.predictions: result.page.predictions, self.model_input: result.page.model_input,
                self.summary: result.page.summary}


def results_panel() -> ResultsPanel:
    with gr.Row():
        predictions = gr.Label(label="Predictions", num_top_classes=10, elem_id="predictions")
        model_input = InlineImage(label="Input as the model saw it", height=180, interactive=False, format="png",
                                  elem_classes=["pixelated"], elem_id="model-input")
    summary = gr.Markdown(elem_id="summary")
    gr.Markdown(HOW_TO_READ["predictions"])
    return ResultsPanel(predictions, model_input, summary)


@dataclass
class FeatureMapsTab:
    tab: gr.Tab
    part: gr.Radio
    grids: gr.Image
    detail_block: gr.Dropdown
    detail: gr.Image
    channels: ChannelPanel
    inside: InsidePanel

    def show(self, result: AnalysisView) -> dict:
        return {self.grids: result.page.grids.image, self.detail: result.page.detail,
                self.detail_block: chooser(result.choices_changed, result.blocks, result.detail_block)}


def feature_maps_tab() -> FeatureMapsTab:
    with gr.Tab("Feature maps") as tab:
        part = gr.Radio(PART_CHOICES, value="f", label="Show")
        grids = InlineImage(label="Blocks (most active channels): click one to enlarge it", height="auto",
                            interactive=False, format="png", elem_id="block-grids")
        gr.Markdown(HOW_TO_READ["maps"])
        detail_block = gr.Dropdown([], label="Block to enlarge", allow_custom_value=True, elem_id="detail-block")
        detail = InlineImage(label="All channels of the chosen block: click one to see what it responds to",
                             interactive=False, height=480, format="png", elem_classes=["pixelated"], elem_id="detail")
        channels = channel_panel()
        inside = inside_panel()
    return FeatureMapsTab(tab, part, grids, detail_block, detail, channels, inside)


@dataclass
class ChannelPanel:
    channel: gr.Number
    show: gr.Button
    visualise: gr.Button
    text: gr.Markdown
    on_image: gr.Image
    exemplars: gr.Image
    picture: gr.Image
    picture_text: gr.Markdown

    def outputs(self) -> list:
        return [self.channel, self.text, self.on_image, self.exemplars]

    def shown(self, v: ChannelView) -> dict:
        return {self.channel: v.channel, self.text: v.text, self.on_image: v.on_image, self.exemplars: v.exemplars}


def channel_panel() -> ChannelPanel:
    gr.Markdown(HOW_TO_READ["channel"])
    with gr.Row():
        channel = gr.Number(0, precision=0, minimum=0, label="Channel", elem_id="channel-index")
        show = gr.Button("Show this channel", elem_id="channel-show")
        visualise = gr.Button("Optimise an image for it (a few seconds)", elem_id="channel-visualise")
    text = gr.Markdown(elem_id="channel-text")
    with gr.Row():
        on_image = gr.Image(label="The channel on your image", interactive=False, format="png",
                            elem_id="channel-map", show_label=False)
        picture = gr.Image(label="Images optimised to excite it: F(x) and y", interactive=False, format="png",
                           elem_id="channel-picture", show_label=False)
    picture_text = gr.Markdown()
    exemplars = gr.Image(label="Test images that excite it most (and, for F(x), least)", interactive=False,
                         format="png", elem_id="channel-exemplars", show_label=False)
    return ChannelPanel(channel, show, visualise, text, on_image, exemplars, picture, picture_text)


def wire_channels(pages: Pages, c: Controls, maps: FeatureMapsTab) -> None:
    p = maps.channels
    settings = [c.state, c.model_key, c.k, maps.part, maps.detail_block]

    @to_gr_error
    @gpu
    def clicked(state, model_key, k, part, block, evt: gr.SelectData, request: gr.Request,
                progress=gr.Progress()):  # noqa: B008
        v = pages.channel_click(state, settings_of(request, model_key, k, part, block), *evt.index,
                                progress=lambda share: progress(share, desc="Scanning the test images"))
        return gr.skip() if v is None else p.shown(v)

    @to_gr_error
    @gpu
    def show(state, model_key, k, part, block, channel, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        v = pages.channel(state, settings_of(request, model_key, k, part, block), int(channel or 0),
                          progress=lambda share: progress(share, desc="Scanning the test images"))
        return p.shown(v)

    @to_gr_error
    @gpu
    def visualise(state, model_key, k, part, block, channel, request: gr.Request):
        return pages.visualise(state, settings_of(request, model_key, k, part, block), int(channel or 0))

    maps.detail.select(clicked, settings, p.outputs(), api_visibility="private")
    p.show.click(show, [*settings, p.channel], p.outputs(), api_name="channel")
    p.visualise.click(visualise, [*settings, p.channel], [p.picture, p.picture_text], api_name="visualise")


@dataclass
class InsidePanel:
    """Inside one block: drawn only while its accordion is open (``is_open``); opening it re-runs one block."""

    accordion: gr.Accordion
    block: gr.Dropdown
    channel: gr.Number
    show: gr.Button
    figure: gr.Image
    words: gr.Markdown
    unit: gr.Markdown
    # Never sent to the page: what the API endpoint "inside" returns, inside.json's text (every map included). Text,
    # not gr.JSON: gradio_client takes any dict with a string "path" (a layer's, here) for a file to download.
    data: gr.Textbox
    api: gr.Button  # never shown: its click is that endpoint
    is_open: gr.State

    def outputs(self) -> list:
        return [self.figure, self.words, self.unit, self.block, self.channel]

    def shown(self, v: InsideView) -> dict:
        return {self.figure: v.image, self.words: v.words, self.unit: v.unit,
                self.block: gr.update(choices=v.blocks, value=v.block), self.channel: v.channel}


def inside_panel() -> InsidePanel:
    with gr.Accordion("Inside the block: every step of F(x), the shortcut and the sum", open=False,
                      elem_id="inside") as accordion:
        gr.Markdown(HOW_TO_READ["inside"])
        with gr.Row():
            block = gr.Dropdown([], label="Block", allow_custom_value=True, elem_id="inside-block")
            channel = gr.Number(0, precision=0, minimum=0, label="Output channel", elem_id="inside-channel")
            show = gr.Button("Look inside", variant="primary", elem_id="inside-show")
        words = gr.Markdown(elem_id="inside-words")
        figure = gr.Image(label="Inside the block: click a map for one position's numbers", interactive=False,
                          format="png", elem_id="inside-figure", show_label=False)
        unit = gr.Markdown(elem_id="inside-unit")
        data = gr.Textbox(visible=False)
        api = gr.Button(visible=False)
    return InsidePanel(accordion, block, channel, show, figure, words, unit, data, api, gr.State(False))


def wire_inside(pages: Pages, c: Controls, maps: FeatureMapsTab) -> None:
    """Nothing runs until the accordion is opened: a tile click on the enlarged block only copies its channel there
    (in the browser); while it is open, a tile click draws that channel."""
    p = maps.inside
    outputs = [*p.outputs(), c.state]
    run, run_click, run_unit = gpu(pages.inside), gpu(pages.inside_click), gpu(pages.inside_unit)

    @to_gr_error
    def show(state, model_key, k, detail, block, channel, request: gr.Request):
        v = run(state, settings_of(request, model_key, k, detail_block=detail), block or None, channel)
        return {c.state: v.state, **p.shown(v)}

    @to_gr_error
    def numbers(state, model_key, k, detail, block, channel, request: gr.Request):
        v = run(state, settings_of(request, model_key, k, detail_block=detail), block or None, channel)
        return {c.state: v.state, p.data: json.dumps(v.data, allow_nan=False)}

    def opened(state, model_key, k, detail, block, channel, request: gr.Request):
        if state is None:
            return gr.skip()
        return show(state, model_key, k, detail, block, channel, request)

    @to_gr_error
    def tile(state, model_key, k, part, detail, is_open, evt: gr.SelectData, request: gr.Request):
        if not is_open:
            return gr.skip()
        v = run_click(state, settings_of(request, model_key, k, part, detail), *evt.index)
        return gr.skip() if v is None else {c.state: v.state, **p.shown(v)}

    @to_gr_error
    def position(state, model_key, k, detail, block, channel, evt: gr.SelectData, request: gr.Request):
        state, text = run_unit(state, settings_of(request, model_key, k, detail_block=detail), block or None,
                               channel, *evt.index)
        return gr.skip() if text is None else {c.state: state, p.unit: text}

    inputs = [c.state, c.model_key, c.k, maps.detail_block, p.block, p.channel]
    p.accordion.expand(lambda: True, None, p.is_open, api_visibility="private", show_progress="hidden").then(
        opened, inputs, outputs, api_visibility="private")
    p.accordion.collapse(lambda: False, None, p.is_open, api_visibility="private", show_progress="hidden")
    p.show.click(show, inputs, outputs, api_visibility="private")
    # The API: the numbers of (block, channel) for the session's image (the page's own events never send them).
    p.api.click(numbers, inputs, [p.data, c.state], api_name="inside")
    maps.detail.select(tile, [c.state, c.model_key, c.k, maps.part, maps.detail_block, p.is_open], outputs,
                       api_visibility="private")
    # The channel view's number (a tile click sets it) and the enlarged block, copied in the browser: no request.
    maps.channels.channel.change(None, [maps.channels.channel, maps.detail_block], [p.block, p.channel],
                                 js="(channel, block) => [block, channel]")
    p.figure.select(position, inputs, [p.unit, c.state], api_visibility="private")


@dataclass
class ResidualTab:
    """The chart and the table are sent only while the tab is open (``is_open``); opening it sends both."""

    tab: gr.Tab
    chart: gr.Image
    table: gr.Dataframe
    is_open: gr.State

    def show(self, result: AnalysisView) -> dict:
        if result.page.chart is None:  # the tab is closed: emptied (no work, see `chooser`); opening it draws both
            return {self.chart: None, self.table: None}
        return {self.chart: result.page.chart, self.table: result.page.table}


def residual_tab(pages: Pages, c: Controls, is_open: gr.State) -> ResidualTab:
    """``is_open`` must be made outside the ``gr.Tabs``: a non-tab child there shifts the tabs' labels."""
    with gr.Tab("Residual magnitudes") as tab:
        chart = gr.Image(label="‖F(x)‖ / ‖s(x)‖ and cosine per block", interactive=False, format="png",
                         elem_id="residual-chart")
        gr.Markdown(HOW_TO_READ["residual"])
        table = gr.Dataframe(headers=METRIC_COLUMNS, label="Per-block metrics", interactive=False,
                             elem_id="metrics-table")

    @to_gr_error
    @gpu
    def opened(state, model_key, k, request: gr.Request):
        v = pages.residual(state, settings_of(request, model_key, k))
        shown = {is_open: True}
        if v.chart is not None:
            shown.update({c.state: v.state, chart: v.chart, table: v.table})
        return shown

    tab.select(opened, [c.state, c.model_key, c.k], [chart, table, c.state, is_open], api_name="residual",
               show_progress="hidden")
    return ResidualTab(tab, chart, table, is_open)


def chooser(changed: bool, choices: list, value):
    """A chooser's output in the analysis: new choices only when the model's names changed, else its value.

    Never ``gr.skip()`` there: Gradio (6.x) answers any update dict, an empty one included, by building the
    component anew and re-writing the session's page config (with its JSON schema): ~0.5 ms an output per
    request, on the hot path of every analysis and every frame of a drawing. A plain value costs nothing.
    """
    return gr.update(choices=choices, value=value) if changed else value


def settings_of(request: gr.Request | None, model_key, k, part="f", detail_block=None, lesion_blocks=None) -> Settings:
    session = (request.session_hash if request is not None else None) or ""
    return Settings(model_key, int(k), part, detail_block, tuple(lesion_blocks or ()), session)


@dataclass
class LesionsTab:
    tab: gr.Tab
    blocks: gr.CheckboxGroup

    def show(self, result: AnalysisView) -> dict:
        return {self.blocks: chooser(result.choices_changed, result.blocks, result.lesion_blocks)}


def lesions_tab(pages: Pages, c: Controls) -> LesionsTab:
    with gr.Tab("Lesions") as tab:
        gr.Markdown(HOW_TO_READ["lesions"])
        with gr.Row():
            blocks = gr.CheckboxGroup([], label="Remove the residual branch of these blocks")
            alpha = gr.Slider(0, 2, value=0, step=0.05, label="α: scale their branch, y = relu(α·F(x) + s(x))",
                              info="0 removes it (the lesion), 1 leaves the block intact, 2 doubles it",
                              elem_id="lesion-alpha")
            lesion_btn = gr.Button("Lesion", variant="primary", scale=0)
        with gr.Row():
            preds = gr.Label(label="Predictions with the lesion", num_top_classes=10)
            text = gr.Markdown()
        sweep_btn = gr.Button("Lesion each block alone")
        sweep_chart = gr.Image(label="Each block lesioned alone", interactive=False)
        sweep_table = gr.Dataframe(headers=SWEEP_COLUMNS, interactive=False)

    @to_gr_error
    @gpu
    def lesion(state, model_key, k, chosen, factor, request: gr.Request):
        v = pages.lesion(state, dataclasses.replace(settings_of(request, model_key, k, lesion_blocks=chosen),
                                                    alpha=float(factor)))
        return {c.state: v.state, preds: v.predictions, text: v.text}

    @to_gr_error
    @gpu
    def sweep(state, model_key, k, request: gr.Request):
        v = pages.sweep(state, settings_of(request, model_key, k))
        return {c.state: v.state, sweep_chart: v.chart, sweep_table: v.rows}

    lesion_btn.click(lesion, [c.state, c.model_key, c.k, blocks, alpha], [preds, text, c.state], api_name="lesion")
    alpha.release(lesion, [c.state, c.model_key, c.k, blocks, alpha], [preds, text, c.state],
                  api_visibility="private", trigger_mode="always_last")
    sweep_btn.click(sweep, [c.state, c.model_key, c.k], [sweep_chart, sweep_table, c.state], api_name="lesion_sweep")
    return LesionsTab(tab, blocks)


def readout_tab(pages: Pages, c: Controls) -> gr.Tab:
    with gr.Tab("Readout") as tab:
        gr.Markdown(HOW_TO_READ["readout"])
        button = gr.Button("Read out every block", variant="primary")
        chart = gr.Image(label="The classifier head applied after each block", interactive=False)
        text = gr.Markdown()
        probes = gr.Image(label="Linear probes: where the class becomes linearly readable", interactive=False,
                          format="png", elem_id="readout-probes")

    @to_gr_error
    @gpu
    def readout(state, model_key, k, request: gr.Request):
        v = pages.readout(state, settings_of(request, model_key, k))
        return {c.state: v.state, chart: v.chart, text: v.text, probes: v.probes}

    button.click(readout, [c.state, c.model_key, c.k], [chart, text, c.state, probes], api_name="readout")
    return tab


def gradcam_tab(pages: Pages, c: Controls) -> gr.Tab:
    """Its choosers are filled when the tab is opened and whenever Explain runs (for the model then in use),
    not by every analysis: most analyses would only have left them as they were, which costs Gradio a
    rebuild of each component (see :func:`chooser`)."""
    with gr.Tab("Grad-CAM") as tab:
        gr.Markdown(HOW_TO_READ["gradcam"])
        with gr.Row():
            block = gr.Dropdown([], label="Block", allow_custom_value=True, elem_id="gradcam-block")
            label = gr.Dropdown([], label="Class (empty: the predicted one)", allow_custom_value=True,
                                elem_id="gradcam-class")
            button = gr.Button("Explain", variant="primary", scale=0, elem_id="gradcam-run")
        image = gr.Image(label="Grad-CAM", interactive=False, height=300, elem_id="gradcam-image")

    @to_gr_error
    @gpu
    def gradcam(state, model_key, k, chosen_block, chosen_label, request: gr.Request):
        v = pages.gradcam(state, settings_of(request, model_key, k), chosen_block or None, chosen_label or None)
        return {c.state: v.state, image: gr.update(value=v.image, label=v.label),
                block: gr.update(choices=v.blocks, value=v.block), label: gr.update(choices=["", *v.classes])}

    def opened(state, chosen_block, chosen_label):
        if state is None or not state.choices:
            return gr.skip()
        blocks, classes = state.choices
        return {block: gr.update(choices=list(blocks), value=chosen_block if chosen_block in blocks else blocks[-1]),
                label: gr.update(choices=["", *classes], value=chosen_label if chosen_label in classes else "")}

    button.click(gradcam, [c.state, c.model_key, c.k, block, label], [image, c.state, block, label],
                 api_name="gradcam")
    tab.select(opened, [c.state, block, label], [block, label], api_visibility="private", show_progress="hidden")
    return tab


@dataclass
class CompareTab:
    tab: gr.Tab
    model_b: gr.Dropdown


def compare_tab(pages: Pages, c: Controls, model_choices: list, part: gr.Radio) -> CompareTab:
    with gr.Tab("Compare") as tab:
        gr.Markdown(HOW_TO_READ["compare"])
        with gr.Row():
            model_b = gr.Dropdown(model_choices, value=model_choices[-1][1], label="Model B", elem_id="model-b")
            button = gr.Button("Compare on this image", variant="primary", elem_id="compare-run")
            cka_button = gr.Button("Block similarity (CKA)", elem_id="compare-cka")
        text = gr.Markdown(elem_id="compare-text")
        with gr.Row():
            preds_a = gr.Label(label="A", num_top_classes=5, elem_id="compare-a")
            preds_b = gr.Label(label="B", num_top_classes=5, elem_id="compare-b")
        chart = gr.Image(label="‖F(x)‖ / ‖s(x)‖ and cosine of A and B", interactive=False, format="png")
        with gr.Row():
            detail_a = gr.Image(label="A: all channels of its last block", interactive=False, format="png",
                                height=320, elem_classes=["pixelated"])
            detail_b = gr.Image(label="B: all channels of its last block", interactive=False, format="png",
                                height=320, elem_classes=["pixelated"])
        sweeps = gr.Image(label="Lesion sweep of A and B", interactive=False)
        readouts = gr.Image(label="Readout of A and B", interactive=False)
        cka_map = gr.Image(label="Block similarity (linear CKA)", interactive=False, elem_id="compare-cka-map")
        cka_text = gr.Markdown()

    @to_gr_error
    @gpu
    def compare(state, model_key, k, chosen_b, shown, request: gr.Request):
        v = pages.compare(state, settings_of(request, model_key, k), chosen_b, shown)
        return {c.state: v.state, text: v.text, preds_a: v.predictions_a, preds_b: v.predictions_b, chart: v.chart,
                detail_a: v.detail_a, detail_b: v.detail_b, sweeps: v.sweeps, readouts: v.readouts}

    @to_gr_error
    @gpu
    def similarity(state, model_key, k, chosen_b, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        kind = state.kind if state is not None else "photo"
        v = pages.similarity(settings_of(request, model_key, k), chosen_b, kind,
                             progress=lambda share: progress(share, desc="CKA over the images"))
        return {cka_map: v.image, cka_text: v.text}

    button.click(compare, [c.state, c.model_key, c.k, model_b, part],
                 [c.state, text, preds_a, preds_b, chart, detail_a, detail_b, sweeps, readouts], api_name="compare")
    cka_button.click(similarity, [c.state, c.model_key, c.k, model_b], [cka_map, cka_text], api_name="similarity")
    return CompareTab(tab, model_b)


def timeline_tab(pages: Pages, c: Controls) -> gr.Tab:
    runs = pages.timelines.choices()
    first = pages.timelines.runs[runs[0][1]] if runs else None
    with gr.Tab("Timeline") as tab:
        gr.Markdown(HOW_TO_READ["timeline"])
        if first is None:
            gr.Markdown("No training run on this server: start the app with `--timeline <run folder>`.")
            return tab
        with gr.Row():
            run = gr.Dropdown(runs, value=runs[0][1], label="Training run", elem_id="timeline-run")
            index = gr.Slider(1, len(first), value=len(first), step=1, label="Snapshot (in step order)",
                              elem_id="timeline-snapshot")
            button = gr.Button("Show this snapshot", variant="primary", elem_id="timeline-show")
        text = gr.Markdown(elem_id="timeline-text")
        with gr.Row():
            predictions = gr.Label(label="Prediction at this snapshot", num_top_classes=5, elem_id="timeline-preds")
            residual = gr.Image(label="Residual magnitudes at this snapshot", interactive=False, format="png",
                                show_label=False)
        readout = gr.Image(label="Readout at this snapshot", interactive=False, show_label=False)
        history = gr.Image(label="Every block over the run (medians over the test images)", interactive=False,
                           elem_id="timeline-history", show_label=False)

    @to_gr_error
    @gpu
    def show(state, model_key, k, name, position, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        v = pages.timeline(state, settings_of(request, model_key, k), name, int(position) - 1,
                           progress=lambda share: progress(share, desc="Blocks over the run"))
        return {predictions: v.predictions, residual: v.residual, readout: v.readout, history: v.history, text: v.text}

    def pick_run(name):
        n = len(pages.timelines.get(name))
        return gr.update(maximum=n, value=n)

    outputs = [predictions, residual, readout, history, text]
    button.click(show, [c.state, c.model_key, c.k, run, index], outputs, api_name="timeline")
    index.release(show, [c.state, c.model_key, c.k, run, index], outputs, api_visibility="private",
                  trigger_mode="always_last")
    run.input(pick_run, run, index, api_visibility="private").then(
        show, [c.state, c.model_key, c.k, run, index], outputs, api_visibility="private")
    return tab


ANY_CLASS = "(any)"


@dataclass
class DatasetTab:
    source: gr.Radio
    zip_file: gr.File
    scan: gr.Button
    summary: gr.Markdown
    confusion: gr.Image
    which: gr.Radio
    true: gr.Dropdown
    predicted: gr.Dropdown
    sort: gr.Dropdown
    count: gr.Markdown
    gallery: gr.Gallery
    shown: gr.State
    study: StudyPanel

    @property
    def filters(self) -> list:
        return [self.which, self.true, self.predicted, self.sort]

    @property
    def outputs(self) -> list:
        return [self.summary, self.confusion, self.gallery, self.shown, self.count, self.true, self.predicted]

    def show(self, v: SetView) -> dict:
        names = [ANY_CLASS, *v.classes]
        return {self.summary: v.summary, self.confusion: v.confusion, self.gallery: v.gallery, self.shown: v.shown,
                self.count: v.count, self.true: gr.update(choices=names), self.predicted: gr.update(choices=names)}


def set_filter(which, true, predicted, sort) -> SetFilter:
    return SetFilter(which, None if true in (None, ANY_CLASS) else true,
                     None if predicted in (None, ANY_CLASS) else predicted, sort)


def dataset_tab() -> DatasetTab:
    with gr.Tab("Data set") as _tab:
        gr.Markdown(HOW_TO_READ["dataset"])
        with gr.Row():
            source = gr.Radio([("Shipped test images", SHIPPED_SET), ("Your labelled ZIP", USER_SET)],
                              value=SHIPPED_SET, label="Images", elem_id="dataset-source")
            zip_file = gr.File(label="A labelled ZIP (one folder per class)", file_types=[".zip"], type="filepath",
                               elem_id="dataset-zip")
            scan = gr.Button("Scan the set", variant="primary", elem_id="dataset-scan")
        summary = gr.Markdown(elem_id="dataset-summary")
        with gr.Row():
            confusion = gr.Image(label="Confusion matrix (click a cell)", interactive=False, format="png",
                                 elem_id="dataset-confusion", show_label=False)
            with gr.Column():
                which = gr.Radio(["wrong", "right", "all"], value="wrong", label="Show")
                true = gr.Dropdown([ANY_CLASS], value=ANY_CLASS, label="True class", elem_id="dataset-true")
                predicted = gr.Dropdown([ANY_CLASS], value=ANY_CLASS, label="Predicted class",
                                        elem_id="dataset-predicted")
                sort = gr.Dropdown(list(SORTS), value="confidently_wrong", label="Order")
                count = gr.Markdown(elem_id="dataset-count")
        gallery = gr.Gallery(columns=10, height=420, object_fit="contain", allow_preview=False,
                             label="Images (true → predicted, confidence)", elem_id="dataset-gallery")
        study = study_panel()
    return DatasetTab(source, zip_file, scan, summary, confusion, which, true, predicted, sort, count, gallery,
                      gr.State([]), study)


@dataclass
class StudyPanel:
    button: gr.Button
    text: gr.Markdown
    lesion_map: gr.Image
    alpha_chart: gr.Image


def study_panel() -> StudyPanel:
    gr.Markdown(HOW_TO_READ["study"])
    button = gr.Button("Which blocks each class needs", elem_id="study-run")
    text = gr.Markdown(elem_id="study-text")
    with gr.Row():
        lesion_map = gr.Image(label="Accuracy change per class with each block lesioned", interactive=False,
                              format="png", elem_id="study-map", show_label=False)
        alpha_chart = gr.Image(label="Accuracy with one block's branch scaled by α", interactive=False,
                               format="png", elem_id="study-alpha", show_label=False)
    return StudyPanel(button, text, lesion_map, alpha_chart)


def wire_dataset(pages: Pages, c: Controls, t: DatasetTab, photo: gr.Image) -> None:
    def kind(state) -> str:
        return state.kind if state is not None else "photo"

    @to_gr_error
    @gpu
    def scan(state, model_key, k, source, which, true, predicted, sort, request: gr.Request,
             progress=gr.Progress()):  # noqa: B008
        v = pages.dataset(settings_of(request, model_key, k), kind(state), source,
                          set_filter(which, true, predicted, sort),
                          progress=lambda share: progress(share, desc="Predicting every image"))
        return t.show(v)

    @to_gr_error
    @gpu
    def upload(state, model_key, k, path, which, true, predicted, sort, request: gr.Request,
               progress=gr.Progress()):  # noqa: B008
        v = pages.dataset_upload(settings_of(request, model_key, k), kind(state), path, None,
                                 set_filter(which, true, predicted, sort),
                                 progress=lambda share: progress(share, desc="Predicting every image"))
        return {**t.show(v), t.source: USER_SET, t.zip_file: None}

    @to_gr_error
    def click(state, model_key, k, source, which, true, predicted, sort, evt: gr.SelectData, request: gr.Request):
        filt, v = pages.dataset_click(settings_of(request, model_key, k), kind(state), source,
                                      set_filter(which, true, predicted, sort), *evt.index)
        return {**t.show(v), t.which: filt.which, t.true: filt.true or ANY_CLASS,
                t.predicted: filt.predicted or ANY_CLASS}

    @to_gr_error
    def pick(state, model_key, k, source, shown, evt: gr.SelectData, request: gr.Request):
        return pages.dataset_pick(settings_of(request, model_key, k), kind(state), source, shown, evt.index)

    inputs = [c.state, c.model_key, c.k, t.source, *t.filters]
    t.scan.click(scan, inputs, t.outputs, api_name="dataset")
    t.zip_file.upload(upload, [c.state, c.model_key, c.k, t.zip_file, *t.filters],
                      [*t.outputs, t.source, t.zip_file], api_name="dataset_upload")
    for control in t.filters:
        control.input(scan, inputs, t.outputs, api_visibility="private", trigger_mode="always_last")
    t.confusion.select(click, inputs, [*t.outputs, t.which], api_visibility="private")
    t.gallery.select(pick, [c.state, c.model_key, c.k, t.source, t.shown], photo, api_name="dataset_pick")

    @to_gr_error
    @gpu
    def study(state, model_key, k, source, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        v = pages.lesion_study(settings_of(request, model_key, k), kind(state), source,
                               progress=lambda share: progress(share, desc="Lesioning each block over the images"))
        return v.text, v.lesion_map, v.alpha_chart

    p = t.study
    p.button.click(study, [c.state, c.model_key, c.k, t.source], [p.text, p.lesion_map, p.alpha_chart],
                   api_name="lesion_study")


def export_tab(pages: Pages, c: Controls, lesion_blocks: gr.CheckboxGroup) -> gr.Tab:
    with gr.Tab("Export") as tab:
        gr.Markdown(HOW_TO_READ["export"])
        button = gr.Button("Build the ZIP", variant="primary")
        file = gr.File(label="Analysis (JSON + PNG images)", interactive=False)

    @to_gr_error
    @gpu
    def export(state, model_key, k, blocks, request: gr.Request):
        folder = Path(tempfile.gettempdir()) / "residual-block-explorer" / (request.session_hash or "anon")
        for old in folder.glob("*.zip"):  # one export per session on disk; Gradio serves its own copy
            old.unlink(missing_ok=True)
        state, path = pages.export(state, settings_of(request, model_key, k, lesion_blocks=blocks), folder)
        return {c.state: state, file: str(path)}

    button.click(export, [c.state, c.model_key, c.k, lesion_blocks], [file, c.state], api_name="export")
    return tab


@dataclass
class YourModelPanel:
    checkpoint: gr.File
    class_file: gr.File
    class_text: gr.Textbox
    preset: gr.Radio
    arch: gr.Dropdown
    size: gr.Number
    mean: gr.Textbox
    std: gr.Textbox
    button: gr.Button
    status: gr.Markdown
    config_files: gr.File  # config.json / preprocessor_config.json uploaded with the checkpoint
    hub_id: gr.Textbox | None  # None: --no-hub
    hub_button: gr.Button | None


def your_model_panel(hub: bool = True) -> YourModelPanel:
    with gr.Accordion("Your model: upload a checkpoint", open=False, elem_id="your-model"):
        gr.Markdown(HOW_TO_READ["upload"])
        with gr.Row():
            checkpoint = gr.File(label="Checkpoint (.safetensors, .pt, .pth, .pth.tar)", file_types=[
                                 ".safetensors", ".pt", ".pth", ".tar", ".bin", ".ckpt"], type="filepath",
                                 elem_id="upload-checkpoint")
            class_file = gr.File(label="Class names (optional: one per line)", file_types=[".txt", ".json"],
                                 type="filepath")
            config_files = gr.File(label="config.json / preprocessor_config.json (optional: timm, transformers)",
                                   file_types=[".json"], file_count="multiple", type="filepath",
                                   elem_id="upload-configs")
        class_text = gr.Textbox(label="…or type the class names (one per line, or comma-separated)", lines=2)
        preset = gr.Radio(PRESET_CHOICES, value=PRESET_CHOICES[0][1], label="Inputs were prepared as")
        with gr.Row():
            size = gr.Number(label="Custom: input size (px)", value=32, precision=0, minimum=8, maximum=1024)
            mean = gr.Textbox(label="Custom: mean (one, or one per channel)", value="0.5")
            std = gr.Textbox(label="Custom: std", value="0.25")
        arch = gr.Dropdown(ARCH_CHOICES, value="", label="Architecture")
        button = gr.Button("Load my model", variant="primary", elem_id="upload-load")
        hub_id = hub_button = None
        if hub:
            with gr.Row():
                hub_id = gr.Textbox(label="Model from the Hugging Face Hub (e.g. timm/resnet50.a1_in1k)",
                                    placeholder="owner/name", scale=4, elem_id="hub-id")
                hub_button = gr.Button("Load from the Hub", scale=1, elem_id="hub-load")
        status = gr.Markdown(elem_id="upload-status")
    return YourModelPanel(checkpoint, class_file, class_text, preset, arch, size, mean, std, button, status,
                          config_files, hub_id, hub_button)


def _numbers(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"The {what} must be numbers separated by spaces or commas, got {text!r}.") from None
    if not values:
        raise ValueError(f"Give the {what} of the inputs the model was trained on.")
    return values


def wire_uploads(pages: Pages, panel: YourModelPanel, c: Controls, analysis: AnalysisWiring,
                 model_b: gr.Dropdown) -> None:
    @to_gr_error
    @gpu
    # config_files defaults to None: Gradio then tells clients the parameter is optional (sent by older clients or not).
    def load(checkpoint, class_file, class_text, preset, arch, size, mean, std, config_files=None,
             request: gr.Request = None):
        custom = preset == "custom"
        ask = UploadRequest(
            preset=preset, arch=arch or None, class_file=class_file, class_text=class_text,
            size=int(size) if custom and size else None, mean=_numbers(mean, "mean") if custom else None,
            std=_numbers(std, "std") if custom else None, config_files=tuple(config_files or ()),
        )
        return offered(pages.upload(request.session_hash or "", checkpoint, ask))

    def offered(v) -> dict:
        choices = [("Auto (photo → CIFAR-10, drawing → MNIST)", AUTO), *v.choices]
        return {c.model_key: gr.update(choices=choices, value=v.key),
                model_b: gr.update(choices=choices + pages.timelines.snapshot_choices()),
                panel.status: v.text, panel.checkpoint: None, panel.config_files: None}

    # The config files come last: a client that sends the first eight (as before they existed) still works.
    inputs = [panel.checkpoint, panel.class_file, panel.class_text, panel.preset, panel.arch, panel.size, panel.mean,
              panel.std, panel.config_files]
    outputs = [c.model_key, panel.status, panel.checkpoint, model_b, panel.config_files]
    panel.button.click(load, inputs, outputs, api_name="upload_model").success(
        analysis.reanalyze, analysis.settings, analysis.outputs, api_visibility="private", show_progress="hidden")
    if panel.hub_button is None:
        return

    # Not under @gpu: a download may take minutes, and holds no accelerator while it runs.
    @to_gr_error
    def from_hub(model_id, request: gr.Request, progress=gr.Progress()):  # noqa: B008 - Gradio's idiom
        v = pages.from_hub(request.session_hash or "", model_id, lambda f, words: progress(f, desc=words))
        return {**offered(v), panel.hub_id: ""}

    panel.hub_button.click(from_hub, [panel.hub_id], [*outputs, panel.hub_id], api_name="model_from_hub").success(
        analysis.reanalyze, analysis.settings, analysis.outputs, api_visibility="private", show_progress="hidden")


# --- the whole page ----------------------------------------------------------------------------------


def make_demo(registry: Registry, default_model: str = AUTO, uploads: UserModels | None = None,
              timelines: Timelines | None = None, hub: bool = True) -> gr.Blocks:
    """The page; ``uploads`` holds visitors' own models (``None``: the "Your model" panel is not shown);
    ``timelines``: the training runs offered (the shipped ones by default); ``hub``: whether the panel offers
    models from the Hugging Face Hub (``--no-hub``: no box, and the call is refused)."""
    pages = Pages(registry, uploads, timelines if timelines is not None else Timelines(), hub=hub)
    model_choices = [("Auto (photo → CIFAR-10, drawing → MNIST)", AUTO)] + [
        (c.label, c.key) for c in registry.choices.values()
    ]
    # Every response writes its images to Gradio's cache: sweep files older than an hour every 10 minutes.
    with gr.Blocks(title="Residual Block Explorer", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "# Residual Block Explorer\n"
            "Every residual block computes **y = relu(F(x) + x)**: it keeps its input *x* and adds a correction "
            "*F(x)*. Give the network an image and see, block by block, what each correction looks like and "
            "how large it is."
        )
        gr.Markdown("  \n".join(registry.status()), elem_id="model-status")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=4):
                inputs = inputs_panel(LiveCamera(gpu(pages.analyze)))
                with gr.Row():
                    model_key = gr.Dropdown(model_choices, value=default_model, label="Model", elem_id="model-key")
                    k = gr.Slider(1, 10, value=5, step=1, label="Top-k")
                panel = your_model_panel(hub) if uploads is not None else None
            with gr.Column(scale=5):
                results = results_panel()
        controls = Controls(state, model_key, k)
        residual_is_open = gr.State(False)
        with gr.Tabs() as tabs:
            maps = feature_maps_tab()
            residual = residual_tab(pages, controls, residual_is_open)
            lesions = lesions_tab(pages, controls)
            readout_tab(pages, controls)
            gradcam_tab(pages, controls)
            compare = compare_tab(pages, controls, model_choices + pages.timelines.snapshot_choices(), maps.part)
            timeline_tab(pages, controls)
            dataset = dataset_tab()
            export_tab(pages, controls, lesions.blocks)
        # Which tab is open decides whether analyses draw the residual chart.
        tabs.select(residual_open, None, residual.is_open, api_visibility="private", show_progress="hidden")
        analysis = wire_analysis(pages, registry, inputs, controls, results, maps, residual, lesions)
        wire_dataset(pages, controls, dataset, inputs.photo)
        wire_channels(pages, controls, maps)
        wire_inside(pages, controls, maps)
        if panel is not None:
            wire_uploads(pages, panel, controls, analysis, compare.model_b)
        demo.unload(end_session_for(pages))
    return demo


def residual_open(evt: gr.SelectData) -> bool:
    return evt.value == "Residual magnitudes"


def end_session_for(pages: Pages):
    def end_session(request: gr.Request) -> None:  # a closed tab ends its session: its uploaded models go too
        pages.end_session(request.session_hash or "")

    return end_session


@dataclass
class AnalysisWiring:
    """What other parts of the page need to re-run the analysis: the function, its inputs and outputs."""

    reanalyze: object
    settings: list
    outputs: list


def wire_analysis(pages: Pages, registry: Registry, inputs: InputsPanel, c: Controls, results: ResultsPanel,
                  maps: FeatureMapsTab, residual: ResidualTab, lesions: LesionsTab) -> AnalysisWiring:
    """Every way to analyse an image (or re-analyse it with new settings) updates the same components."""
    # The order of the outputs is the order of the API's return values (gradio_client).
    outputs = [results.predictions, results.model_input, maps.grids, residual.chart, residual.table,
               results.summary, maps.detail, maps.detail_block, lesions.blocks, c.state]
    # The session's state and whether the residual tab is open come first; gr.State is not part of the API.
    settings = [c.state, residual.is_open, c.model_key, c.k, maps.part, maps.detail_block, lesions.blocks]
    run = gpu(pages.analyze)

    @to_gr_error
    def analyze(source, kind, previous, chart, model_key, k, part, detail, lesioned, request):
        s = settings_of(request, model_key, k, part, detail, lesioned)
        v = run(source, kind, s, previous, chart=bool(chart))
        return {c.state: v.state, **results.show(v), **maps.show(v), **residual.show(v), **lesions.show(v)}

    # One function per source, each naming its parameters: Gradio passes gr.Request by annotation.
    def photo(img, previous, chart, model_key, k, part, detail, lesioned, request: gr.Request):
        if img is None:
            return {}
        return analyze(img, "photo", previous, chart, model_key, k, part, detail, lesioned, request)

    def drawing(value, previous, chart, model_key, k, part, detail, lesioned, request: gr.Request):
        return analyze(value, "drawing", previous, chart, model_key, k, part, detail, lesioned, request)

    def example(evt: gr.SelectData, previous, chart, model_key, k, part, detail, lesioned, request: gr.Request):
        path = EXAMPLES[evt.index]
        return analyze(str(path), example_kind(registry, path), previous, chart, model_key, k, part, detail,
                       lesioned, request)

    def reanalyze(state, chart, model_key, k, part, detail, lesioned, request: gr.Request):
        if state is None:
            return {}
        return analyze(state.source, state.kind, state, chart, model_key, k, part, detail, lesioned, request)

    def block_clicked(state, evt: gr.SelectData):  # a click on a block's grid in the strip enlarges that block
        return Pages.block_at(state, *evt.index[:2]) or gr.skip()

    inputs.photo.change(photo, [inputs.photo, *settings], outputs, api_name="analyze_photo",
                        trigger_mode="always_last")
    inputs.sketch.change(drawing, [inputs.sketch, *settings], outputs, api_name="analyze_drawing",
                         trigger_mode="always_last", show_progress="hidden")
    wire_live(inputs, analyze, settings, outputs)
    inputs.gallery.select(example, settings, outputs, api_name="analyze_example")
    for control in (c.model_key, c.k, maps.part, maps.detail_block):
        control.input(reanalyze, settings, outputs, api_visibility="private",
                      trigger_mode="always_last", show_progress="hidden")
    maps.grids.select(block_clicked, c.state, maps.detail_block, api_visibility="private").then(
        reanalyze, settings, outputs, api_visibility="private", show_progress="hidden")
    return AnalysisWiring(reanalyze, settings, outputs)


def wire_live(inputs: InputsPanel, analyze, settings: list, outputs: list) -> None:
    """The drawing pad while the pen moves, and the live camera's frames sent to the whole page: each analysed as
    any drawing or photo (``analyze`` is ``wire_analysis``'s), the last one winning."""

    def pen_moved(frame, previous, chart, model_key, k, part, detail, lesioned, request: gr.Request):
        if not frame:
            return {}
        return analyze(canvas_frame(frame), "drawing", previous, chart, model_key, k, part, detail, lesioned,
                       request)

    inputs.pen.change(to_gr_error(pen_moved), [inputs.pen, *settings], outputs, api_visibility="private",
                      trigger_mode="always_last", show_progress="hidden")

    def webcam(value, previous, chart, model_key, k, part, detail, lesioned, request: gr.Request):
        """The live camera's frame every SYNC_S and at stop: the whole page follows, and its live calls take these
        settings from now on."""
        if not value:
            return {}
        frame = live_request(value)
        inputs.camera.remember(frame.session, settings_of(request, model_key, k, part, detail, lesioned), True)
        return analyze(canvas_frame(frame.frame, "The live camera"), "photo", previous, chart, model_key, k, part,
                       detail, lesioned, request)

    inputs.webcam.change(to_gr_error(webcam), [inputs.webcam, *settings], outputs, api_name="analyze_webcam",
                         trigger_mode="always_last", show_progress="hidden")


# --- command line --------------------------------------------------------------------------------------


def build_registry(args: argparse.Namespace) -> Registry:
    registry = default_registry(args.device, args.weights_dir)
    if args.weights or args.arch:
        registry.add_custom(args.weights, args.arch, device=args.device, download=args.download_weights,
                            classes=args.classes)
    for model_id in args.hub:
        try:
            registry.add_hub(model_id, device=args.device)
        except WeightsError as exc:
            sys.exit(f"error: --hub {model_id}: {exc}")
    registry.load_all()
    return registry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Residual Block Explorer: see what each residual block does.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (needs internet)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument("--weights", help="your own checkpoint (.safetensors, .pt, .pth): read and recognised from "
                        "its keys and shapes exactly as an uploaded one is (the tutorial's Net, this project's ResNet, "
                        "torchvision's ResNets); a project .safetensors with its card .json beside it loads as the "
                        "card says")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="folder holding cifar10_resnet.* and mnist_resnet.* (default: the shipped weights/)")
    parser.add_argument("--arch", help="the architecture instead of the recognised one: tutorial, resnet, or a "
                        "torchvision ResNet (resnet18/34/50/101/152, wide_resnet50_2, resnext50_32x4d ...), "
                        "timm/<name> for one of timm's ResNets (timm/resnet50d, timm/seresnet50 ...), or auto; "
                        "add :maxpool or :no-maxpool to say whether a max-pool follows the stem (the weights cannot "
                        "say: assumed after a 7x7 stem, not after a 3x3 one), e.g. resnet18:no-maxpool; without "
                        "--weights, the torchvision ResNet whose published weights --download-weights fetches")
    parser.add_argument("--download-weights", action="store_true",
                        help="with --arch and no --weights: fetch torchvision's published ImageNet weights (needs "
                        "internet); nothing is ever downloaded without it")
    parser.add_argument("--classes", help="a file of class names (one per line, or JSON), one per class of the "
                        "checkpoint's classifier")
    parser.add_argument("--hub", action="append", default=[], metavar="MODEL_ID",
                        help="a ResNet from the Hugging Face Hub (timm/resnet50.a1_in1k, microsoft/resnet-50), "
                        "downloaded at start (or taken from the cache) and offered in the selector; repeatable")
    parser.add_argument("--no-hub", action="store_true",
                        help="no 'Model from the Hugging Face Hub' box in the 'Your model' panel: visitors cannot "
                        "make the server download")
    parser.add_argument("--timeline", action="append", default=[], metavar="RUN_FOLDER",
                        help="a training run's snapshot folder (train --snapshots N) for the Timeline tab; repeatable")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="analyses run at once (default: 2 on a CPU, 4 on a GPU)")
    parser.add_argument("--no-uploads", action="store_true",
                        help="turn the 'Your model' panel off (a public demo that serves its own models only)")
    parser.add_argument("--uploads-per-session", type=int, default=3, help="uploaded models one session may hold")
    parser.add_argument("--uploaded-models", type=int, default=8,
                        help="uploaded models the server holds in all; the least recently used go first")
    parser.add_argument("--uploaded-mib", type=int, default=MAX_HELD_BYTES // 2**20,
                        help="MiB of weights of uploaded models the server holds in all (default: "
                             f"{MAX_HELD_BYTES // 2**20}); the least recently used go first, a larger model is refused")
    parser.add_argument("--sessions", type=int, default=SESSIONS,
                        help=f"browser sessions whose page state is kept, most recent first (default {SESSIONS})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gc.disable()  # as for the imports: loading the models and building the page make no garbage worth a pass
    prepare_process(args.device)
    registry = build_registry(args)
    for line in registry.status():
        print(line)
    if CUSTOM in registry.failed:
        sys.exit(f"error: {registry.failed[CUSTOM]}")
    for key, error in registry.failed.items():
        if key.startswith(HUB_PREFIX):  # asked for by name, as --weights is: no page without it
            sys.exit(f"error: --hub {key.removeprefix(HUB_PREFIX)}: {error}")
    if not registry.loaded:
        sys.exit("error: no model could be loaded; see the lines above for where the weights should be.")
    uploads = None if args.no_uploads else UserModels(args.uploads_per_session, args.uploaded_models,
                                                    args.uploaded_mib * 2**20)
    timelines = Timelines(args.timeline, device=args.device)
    for folder, error in timelines.errors.items():
        print(f"training run {folder} not offered: {error}")
    given = [k for k in registry.choices if k == CUSTOM or k.startswith(HUB_PREFIX)]
    demo = make_demo(registry, default_model=given[0] if given else AUTO, uploads=uploads, timelines=timelines,
                     hub=not args.no_hub)
    concurrency = start_serving(registry, args.concurrency)
    demo.queue(**queue_options(concurrency))
    gc.freeze()
    gc.enable()
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, footer_links=["api"],
                state_session_capacity=args.sessions, **launch_options(uploads is not None))


if __name__ == "__main__":
    main()
