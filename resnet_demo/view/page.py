"""What the page shows, computed without Gradio: one analysis and each tool's result as typed values.

``app.py`` lays out components and maps these results' fields to them by name; everything here can be
tested and benchmarked without a server. The page asks the core's :class:`~resnet_demo.core.explorer.Explorer`
for every number and only turns results into pictures and words.

A browser session remembers a :class:`PageState`: the image, the model it was analysed with, and the
results of the tools already run on it, so that the export packs what the page has shown instead of
computing it again. It holds no tensors (Gradio keeps one per session).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.errors import WeightsError
from ..core.explorer import Analysis, Explorer
from ..core.insight import LesionResult, Readout
from ..core.metrics import METRIC_NAMES
from ..core.preprocess import InputError, load_image
from ..core.studies.bands import describe
from ..core.studies.evalsets import evalset_for, load_evalset
from ..core.studies.similarity import block_similarity
from ..core.studies.strangeness import strangeness
from .channel_page import ChannelView, channel_view, visualisation
from .dataset_page import (
    USER_SET,
    SetFilter,
    SetView,
    StudyView,
    UserSets,
    cell_filter,
    lesion_study,
    pick_image,
    set_view,
    the_set,
)
from .error_view import labelled_summary
from .export import export_zip
from .probe_charts import probe_chart, probe_summary
from .registry import Registry
from .render import (
    VIEWS,
    Strip,
    comparison_chart,
    feature_grid,
    feature_strip,
    grid_codes,
    input_image,
    lesion_sweep_chart,
    overlay,
    palette_image,
    rank_channels,
    readout_chart,
    residual_chart,
    similarity_map,
    slot_at,
    tile_at,
)
from .timeline_view import RUN_PREFIX, Timelines, TimelineView, timeline_view
from .uploads import UPLOAD_PREFIX, UserModels, load_upload, parse_class_names

__all__ = [
    "METRIC_COLUMNS",
    "SWEEP_COLUMNS",
    "AnalysisView",
    "ChannelView",
    "CompareView",
    "SimilarityView",
    "GradcamView",
    "LesionView",
    "Page",
    "PageState",
    "Pages",
    "ReadoutView",
    "ResidualView",
    "SCREEN",
    "FILES",
    "Settings",
    "UploadRequest",
    "UploadView",
    "Sizes",
    "SetFilter",
    "SetView",
    "StudyView",
    "SweepView",
    "TimelineView",
    "Timelines",
    "block_at",
    "build_page",
    "metrics_table",
    "upload_error",
]

METRIC_COLUMNS = ["block", "stage", *METRIC_NAMES]
SWEEP_COLUMNS = ["lesioned block", "new top-1", "p(original top-1)", "Δp", "KL (nats)"]
CAM_SIZE = 256  # pixels of the Grad-CAM overlay


@dataclass(frozen=True)
class Sizes:
    """Pixel sizes of a page's images: one channel tile (its feature map enlarged by a whole factor), the
    white line between tiles, and the side of the input as the model saw it."""

    grid_cell: int
    detail_cell: int
    pad: int
    input_px: int


# On screen, images are sent at (near) their own resolution and the browser enlarges them with
# ``image-rendering: pixelated`` (app.py's CSS), the nearest-neighbour enlargement PIL would do, so the
# page looks the same for a fraction of the PNG encoding. Files in the export are seen without that CSS.
SCREEN = Sizes(grid_cell=32, detail_cell=16, pad=1, input_px=32)
FILES = Sizes(grid_cell=48, detail_cell=40, pad=2, input_px=160)


# --- one analysis as pictures and words ------------------------------------------------------------


@dataclass
class Page:
    """Every output of one analysis, ready for the page's components."""

    analysis: Analysis
    predictions: dict[str, float]
    model_input: Image.Image
    grids: Strip | list[tuple[Image.Image, str]]  # one strip of every block's grid on screen; one image each in files
    chart: Image.Image | None
    table: list[list]
    summary: str
    detail: Image.Image | None = None


def metrics_table(analysis: Analysis, digits: int = 4) -> list[list]:
    return [[m.name, m.stage, *(round(getattr(m, k), digits) for k in METRIC_NAMES)] for m in analysis.metrics]


def block_tensor(analysis: Analysis, block: str, view: str):
    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, got {view!r}")
    for rec in analysis.blocks:
        if rec.name == block:
            return getattr(rec, view)[0]
    raise KeyError(f"unknown block {block!r}; this model's blocks are {[r.name for r in analysis.blocks]}")


def block_detail(
    analysis: Analysis, block: str, view: str = "f", max_channels: int = 256, sizes: Sizes = SCREEN
) -> Image.Image:
    """All channels of one block (up to ``max_channels``), each scaled to its own range, most active first."""
    fmap = block_tensor(analysis, block, view)
    n = min(fmap.shape[0], max_channels)
    return feature_grid(fmap, signed=view == "f", max_channels=n, cell=sizes.detail_cell, pad=sizes.pad,
                        per_channel_scale=True)


def detail_channel(analysis: Analysis, block: str, view: str, x: float, y: float, max_channels: int = 256,
                   sizes: Sizes = SCREEN) -> int | None:
    """The channel whose tile is under pixel (x, y) of :func:`block_detail`'s picture (tiles are in order of
    activity on this image, so the same pixel is another channel on another image)."""
    fmap = block_tensor(analysis, block, view)
    n = min(fmap.shape[0], max_channels)
    tile = tile_at(n, fmap.shape[1], fmap.shape[2], sizes.detail_cell, sizes.pad, x, y)
    return None if tile is None else int(rank_channels(fmap)[tile])


def summarise(analysis: Analysis) -> str:
    top = analysis.predictions[0]
    metrics = analysis.metrics
    busiest = max(metrics, key=lambda m: m.ratio)
    quietest = min(metrics, key=lambda m: m.ratio)
    against = [m.name for m in metrics if m.cosine < -0.2]
    lines = [
        f"**{analysis.card.name}** predicts **{top.label}** ({top.prob:.1%}).",
    ]
    odd = strangeness(metrics, analysis.logits, analysis.card)
    if odd is not None and odd.strange:
        lines.append(f"⚠ {odd.message}")
    lines += [
        f"Block **{busiest.name}** changes its input most (‖F‖/‖s‖ = {busiest.ratio:.2f}); "
        f"**{quietest.name}** least ({quietest.ratio:.2f}).",
    ]
    if against:
        lines.append(f"Branches that mostly cancel their input (cosine < −0.2): {', '.join(against)}.")
    if analysis.card.reference_bands:
        lines += describe(metrics, analysis.card.reference_bands, outside=10)[:3]
    if not analysis.card.trained:
        lines.append("These weights are **untrained**: the predictions are noise.")
    return "  \n".join(lines)


def build_page(
    analysis: Analysis,
    *,
    view: str = "f",
    detail_block: str | None = None,
    max_channels: int = 16,
    chart: bool = True,
    sizes: Sizes = SCREEN,
) -> Page:
    """Render one analysis: top-k, the input as the model saw it, a grid per block, chart and table.

    ``chart=False`` leaves the residual chart out (``None``): the page draws it only while its tab is open.
    """
    captions = [f"{m.name} · {m.ratio:.2f}" for m in analysis.metrics]  # metrics follow the records, in order
    # F(x)'s channels are ranked by mean |F|, which the metrics hold already (channel_f); x and y are ranked here.
    ranked = [np.argsort(-m.channel_f, kind="stable")[:max_channels] if view == "f" else None for m in analysis.metrics]
    codes = [grid_codes(getattr(rec, view)[0], signed=view == "f", channels=order, max_channels=max_channels,
                        cell=sizes.grid_cell, pad=sizes.pad) for rec, order in zip(analysis.blocks, ranked)]
    cmap = "RdBu_r" if view == "f" else "magma"
    if sizes == SCREEN:
        grids = feature_strip(codes, captions, cmap)
    else:
        grids = [(palette_image(c, cmap), caption) for c, caption in zip(codes, captions)]
    return Page(
        analysis=analysis,
        predictions={p.label: p.prob for p in analysis.predictions},
        model_input=input_image(analysis.input, analysis.card, size=sizes.input_px),
        grids=grids,
        chart=residual_chart(analysis.metrics, bands=analysis.card.reference_bands or None) if chart else None,
        table=metrics_table(analysis),
        summary=summarise(analysis),
        detail=block_detail(analysis, detail_block, view, sizes=sizes) if detail_block else None,
    )


# --- what one browser session remembers, and the results the page shows ----------------------------


@dataclass(frozen=True)
class Settings:
    """The page's controls that every analysis and tool reads."""

    model_key: str = "auto"
    k: int = 5
    view: str = "f"
    detail_block: str | None = None
    lesion_blocks: tuple[str, ...] = ()
    session: str = ""  # the browser session: uploaded models are visible to theirs only
    alpha: float = 0.0  # the lesion tab's branch factor: 0 removes the chosen branches, 1 leaves them intact


@dataclass
class PageState:
    """The session's image and what the tools have computed for it with one model and top-k.

    ``tools`` is emptied whenever the image, the model or k changes (a new state is made).
    """

    source: Any
    kind: str
    model_key: str = ""
    k: int = 5
    choices: tuple = ()  # the block names and classes the page's choosers offer for this model
    strip: tuple[int, int] = (0, 0)  # (pitch, slot) of the feature-map strip, to find the block under a click
    lesion: LesionResult | None = None
    sweep: list[LesionResult] | None = None
    readout: Readout | None = None
    cam: tuple[str, int, np.ndarray] | None = None  # (block, class index, map over the input)

    def same_request(self, model_key: str, k: int) -> bool:
        return self.model_key == model_key and self.k == k


@dataclass
class AnalysisView:
    """The main analysis: what every component outside the tools' own tabs shows."""

    state: PageState
    page: Page
    blocks: list[str]  # this model's block names, for the block choosers
    detail_block: str  # the block enlarged
    lesion_blocks: list[str]  # the lesion choice, kept where the blocks still exist
    classes: list[str]
    choices_changed: bool  # the session's first analysis, or another model: the choosers need the new names


@dataclass(frozen=True)
class UploadRequest:
    """What the "Your model" panel asks for besides the checkpoint itself."""

    preset: str = "cifar10"  # a key of uploads.PRESET_CHOICES
    arch: str | None = None  # None: recognised from the keys and shapes
    class_file: str | None = None
    class_text: str | None = None
    size: int | None = None  # custom preset only
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    file_name: str | None = None  # as the visitor named it


@dataclass
class UploadView:
    key: str
    label: str
    text: str
    choices: list[tuple[str, str]]


@dataclass
class CompareView:
    """Model A (the page's) and model B on the session's image, side by side."""

    state: PageState
    predictions_a: dict[str, float]
    predictions_b: dict[str, float]
    chart: Image.Image
    detail_a: Image.Image
    detail_b: Image.Image
    sweeps: Image.Image
    readouts: Image.Image | None
    text: str


@dataclass
class SimilarityView:
    image: Image.Image
    text: str


@dataclass
class ResidualView:
    state: PageState | None
    chart: Image.Image | None
    table: list[list] | None


@dataclass
class LesionView:
    state: PageState
    predictions: dict[str, float]
    text: str


@dataclass
class SweepView:
    state: PageState
    chart: Image.Image
    rows: list[list]


@dataclass
class ReadoutView:
    state: PageState
    chart: Image.Image
    text: str
    probes: Image.Image | None = None  # linear probes per block beside the head, where the card has them


@dataclass
class GradcamView:
    state: PageState
    image: Image.Image
    label: str
    blocks: list[str]  # the model's, for the choosers
    classes: list[str]
    block: str  # the block explained


def lesion_text(result: LesionResult) -> str:
    after = result.predictions[0]
    names = ", ".join(result.lesioned)
    what = (f"Without the branch of **{names}**" if result.alpha == 0
            else f"With the branch of **{names}** scaled by α = {result.alpha:g} (y = relu(α·F(x) + s(x)))")
    return (
        f"{what}, the network predicts **{after.label}** "
        f"({after.prob:.1%}). The original top-1 **{result.orig_label}** goes from "
        f"{result.p_orig_top1_before:.1%} to {result.p_orig_top1_after:.1%} (Δ {result.delta:+.1%}); "
        f"KL(intact ‖ lesioned) = {result.kl:.3f} nats."
        + (" **The top-1 changed.**" if result.top1_changed else " The top-1 is unchanged.")
    )


def sweep_rows(results: list[LesionResult]) -> list[list]:
    return [[r.lesioned[0], r.predictions[0].label, round(r.p_orig_top1_after, 4), round(r.delta, 4), round(r.kl, 4)]
            for r in results]


def readout_text(result: Readout) -> str:
    steps = ", ".join(f"{r.name}: {r.top1.label} ({r.p_final:.0%})" for r in result)
    settles = (f"The prediction settles at **{result.settles_at}**." if result.settles_at
               else "The readouts never agree with the final prediction.")
    return f"Final top-1: **{result.final.label}**. Probability of it, read out after each block: {steps}. {settles}"


def block_at(state: PageState | None, x: float) -> str | None:
    """The block whose grid is under pixel column ``x`` of the session's feature-map strip, if any."""
    if state is None or not state.choices:
        return None
    i = slot_at(x, *state.strip)
    names = state.choices[0]
    return names[i] if i is not None and i < len(names) else None


def side_by_side(images: list[Image.Image], gap: int = 12) -> Image.Image:
    """Images next to each other on white, top-aligned."""
    out = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)),
                    "white")
    x = 0
    for img in images:
        out.paste(img.convert("RGB"), (x, 0))
        x += img.width + gap
    return out


def compare_text(a: Analysis, b: Analysis) -> str:
    """What differs between the two analyses of one image, in words."""
    ta, tb = a.predictions[0], b.predictions[0]
    agree = "agree" if ta.label == tb.label else "disagree"
    lines = [f"A (**{a.card.name}**) predicts **{ta.label}** ({ta.prob:.1%}); B (**{b.card.name}**) predicts "
             f"**{tb.label}** ({tb.prob:.1%}): they {agree}."]
    pairs = list(zip(a.metrics, b.metrics))
    if pairs:
        i, (ma, mb) = max(enumerate(pairs), key=lambda p: abs(math.log(max(p[1][0].ratio, 1e-9))
                                                               - math.log(max(p[1][1].ratio, 1e-9))))
        lines.append(f"Blocks paired by depth: the largest difference in ‖F‖/‖s‖ is at depth {i + 1} "
                     f"({ma.name}: {ma.ratio:.2f} in A, {mb.name}: {mb.ratio:.2f} in B).")
    if len(a.metrics) != len(b.metrics):
        lines.append(f"A has {len(a.metrics)} blocks, B {len(b.metrics)}: the chart pairs them by position.")
    return "  \n".join(lines)


def upload_error(path: str) -> str:
    """The sentence to show for an upload Gradio could not decode: the project's decoder says what is wrong."""
    try:
        load_image(path)
    except InputError as exc:
        return str(exc)
    return "The upload could not be read as an image."


class Pages:
    """The page's handlers without Gradio: each takes the session's state and settings, returns a typed view."""

    def __init__(self, registry: Registry, uploads: UserModels | None = None,
                 timelines: Timelines | None = None) -> None:
        self.registry = registry
        self.uploads = uploads
        self.timelines = timelines if timelines is not None else Timelines(shipped=False)
        self.user_sets = UserSets()
        self._results: dict[tuple, Any] = {}  # see _cached
        self._lock = threading.Lock()

    def explorer(self, model_key: str, kind: str, session: str = "") -> tuple[str, Explorer]:
        if model_key.startswith(UPLOAD_PREFIX):
            if self.uploads is None:
                raise WeightsError("uploaded models are turned off on this server")
            return model_key, self.uploads.get(session, model_key)
        if model_key.startswith(RUN_PREFIX):
            return model_key, self.timelines.explorer(model_key)
        key = self.registry.resolve(model_key, kind)
        return key, self.registry.get(key)

    def model_choices(self, session: str) -> list[tuple[str, str]]:
        """(label, key) of the models this session may choose: the server's, then its own uploads."""
        shipped = [(c.label, c.key) for c in self.registry.choices.values()]
        return shipped + (self.uploads.choices(session) if self.uploads is not None else [])

    def compare_choices(self, session: str) -> list[tuple[str, str]]:
        """Model B's choices: the session's models and every snapshot of the server's training runs."""
        return self.model_choices(session) + self.timelines.snapshot_choices()

    def timeline(self, state: PageState | None, settings: Settings, run: str, index: int,
                 progress: Callable[[float], None] | None = None) -> TimelineView:
        """The session's image through snapshot ``index`` of ``run``, with the run's block history."""
        if state is None:
            raise ValueError("Analyse an image first: upload, paste, photograph or draw one, or pick an example.")
        timeline = self.timelines.get(run)
        history = self.timelines.history(run, progress)
        return timeline_view(timeline, int(index), state.source, state.kind, int(settings.k), history)

    def upload(self, session: str, checkpoint: str | None, request: UploadRequest) -> UploadView:
        """Load an uploaded checkpoint into this session's models (the file is deleted once read)."""
        if self.uploads is None:
            raise WeightsError("uploaded models are turned off on this server")
        if not checkpoint:
            raise ValueError("Choose a checkpoint file first (.safetensors, or a .pt/.pth state dict).")
        names = parse_class_names(request.class_text, request.class_file)
        explorer = load_upload(checkpoint, arch=request.arch, preset=request.preset, class_names=names,
                               size=request.size, mean=request.mean, std=request.std)
        label = f"Yours: {Path(request.file_name or checkpoint).name}"
        key, evicted = self.uploads.add(session, explorer, label)
        card = explorer.card
        text = (f"Loaded **{label}**: {card.training.get('architecture', card.arch)}; {len(card.classes)} classes, "
                f"{card.input_size}×{card.input_size} {card.input_kind}s. It is in the model selector for this "
                "browser session only.")
        if evicted:
            text += f" Made room by removing {', '.join(evicted)} (least recently used)."
        return UploadView(key, label, text, self.model_choices(session))

    def compare(self, state: PageState | None, settings: Settings, model_b: str, view: str = "f") -> CompareView:
        """The session's image through model A (the page's selection) and model B, each with its own preprocessing."""
        state, a, analysis_a = self._current(state, settings)
        _, b = self.explorer(model_b, state.kind, settings.session)
        analysis_b = b.analyze(state.source, k=int(settings.k))
        name_a, name_b = a.card.name, b.card.name
        chart = comparison_chart(analysis_a.metrics, analysis_b.metrics, name_a, name_b,
                                 bands_a=a.card.reference_bands or None)
        details = [block_detail(x, x.metrics[-1].name, view) for x in (analysis_a, analysis_b)]
        sweeps = [lesion_sweep_chart(e.sweep(x), title=f"{e.card.name}: lesion sweep")
                  for e, x in ((a, analysis_a), (b, analysis_b))]
        try:
            readouts = [readout_chart(e.readout(x), title=f"{e.card.name}: readout")
                        for e, x in ((a, analysis_a), (b, analysis_b))]
        except ValueError:  # a model whose head reads no block
            readouts = None
        return CompareView(
            state, {p.label: p.prob for p in analysis_a.predictions}, {p.label: p.prob for p in analysis_b.predictions},
            chart, details[0], details[1], side_by_side(sweeps), side_by_side(readouts) if readouts else None,
            compare_text(analysis_a, analysis_b),
        )

    def similarity(self, settings: Settings, model_b: str, kind: str = "photo",
                   progress: Callable[[float], None] | None = None) -> SimilarityView:
        """Linear CKA between every block of A and of B over A's shipped evaluation set; cached per pair."""
        _, a = self.explorer(settings.model_key, kind, settings.session)
        _, b = self.explorer(model_b, kind, settings.session)
        name = evalset_for(a.card) or evalset_for(b.card)
        if name is None:
            raise ValueError(f"No evaluation set ships for {a.card.name}'s data: block similarity needs the shipped "
                             "CIFAR-10 or MNIST test images (its classes must be theirs).")
        key = ("cka", id(a), a.card.weights_sha256, id(b), b.card.weights_sha256, name)
        sim = self._cached(key, lambda: block_similarity(a, b, load_evalset(name).images, data=name, progress=progress))
        image = similarity_map(sim.matrix, sim.blocks_a, sim.blocks_b, a.card.name, b.card.name)
        matches = ", ".join(f"{x}→{y} ({v:.2f})" for x, y, v in sim.best_match())
        text = (f"Linear CKA over {sim.n} images of `{sim.data}` (each block's output flattened; minibatch CKA, "
                f"Nguyen et al. 2021). For each block of A, the most similar block of B: {matches}.")
        return SimilarityView(image, text)

    def end_session(self, session: str) -> None:
        if self.uploads is not None and session:
            self.uploads.end_session(session)
        if session:
            self.user_sets.end_session(session)

    # --- what a channel responds to --------------------------------------------------------------------

    def channel(self, state: PageState | None, settings: Settings, channel: int,
                progress: Callable[[float], None] | None = None) -> ChannelView:
        """Channel ``channel`` of the enlarged block (``settings.detail_block``) in the chosen view."""
        state, explorer, analysis = self._current(state, settings)
        block = settings.detail_block or analysis.metrics[-1].name
        return channel_view(explorer, analysis, block, settings.view, int(channel), progress)

    def channel_click(self, state: PageState | None, settings: Settings, x: float, y: float,
                      progress: Callable[[float], None] | None = None) -> ChannelView | None:
        """The channel whose tile is under pixel (x, y) of the enlarged block's picture (``None``: no tile)."""
        state, explorer, analysis = self._current(state, settings)
        block = settings.detail_block or analysis.metrics[-1].name
        channel = detail_channel(analysis, block, settings.view, x, y)
        return None if channel is None else channel_view(explorer, analysis, block, settings.view, channel, progress)

    def visualise(self, state: PageState | None, settings: Settings, channel: int) -> tuple[Image.Image, str]:
        state, explorer, analysis = self._current(state, settings)
        block = settings.detail_block or analysis.metrics[-1].name
        return visualisation(explorer, analysis, block, settings.view, int(channel))

    # --- the data-set tab ------------------------------------------------------------------------------

    def dataset(self, settings: Settings, kind: str, which: str, filt: SetFilter,
                progress: Callable[[float], None] | None = None) -> SetView:
        """Where the model fails on the shipped evaluation set or the session's labelled set."""
        _, explorer = self.explorer(settings.model_key, kind, settings.session)
        data = the_set(explorer, which, settings.session, self.user_sets)
        note = labelled_summary(data) if which == USER_SET else ""
        return set_view(explorer, data, filt, progress, note)

    def lesion_study(self, settings: Settings, kind: str,
                     progress: Callable[[float], None] | None = None) -> StudyView:
        """Which blocks each class needs: stored with the model, or computed once over its test images (cached)."""
        _, explorer = self.explorer(settings.model_key, kind, settings.session)
        return self._cached(("lesions", id(explorer), explorer.card.weights_sha256),
                            lambda: lesion_study(explorer, progress))

    def _cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """A data-set result kept for the server (CKA maps, lesion studies), the 32 most recent; computed
        outside the lock, so two first requests for one key may both compute it."""
        with self._lock:
            found = self._results.get(key)
        if found is None:
            found = compute()
            with self._lock:
                self._results[key] = found
                while len(self._results) > 32:
                    self._results.pop(next(iter(self._results)))
        return found

    def dataset_upload(self, settings: Settings, kind: str, path: str | None, name: str | None,
                       filt: SetFilter, progress: Callable[[float], None] | None = None) -> SetView:
        """Read the session's labelled ZIP (deleted once read) and scan it."""
        if not path:
            raise ValueError("Choose a ZIP file first: one folder per class, named as the model's classes.")
        _, explorer = self.explorer(settings.model_key, kind, settings.session)
        self.user_sets.read(settings.session, explorer, path, name)
        return self.dataset(settings, kind, USER_SET, filt, progress)

    def dataset_click(
        self, settings: Settings, kind: str, which: str, filt: SetFilter, x: float, y: float
    ) -> tuple[SetFilter, SetView]:
        """A click on the confusion matrix: filter by the clicked cell's (or name's) classes."""
        _, explorer = self.explorer(settings.model_key, kind, settings.session)
        filt = cell_filter(list(explorer.classes), x, y, filt)
        return filt, self.dataset(settings, kind, which, filt)

    def dataset_pick(self, settings: Settings, kind: str, which: str, shown: list[int], position: int) -> Image.Image:
        """The image behind a gallery item, for the main view."""
        _, explorer = self.explorer(settings.model_key, kind, settings.session)
        return pick_image(the_set(explorer, which, settings.session, self.user_sets), shown, position)

    def analyze(
        self, source: Any, kind: str, settings: Settings, previous: PageState | None = None, *, chart: bool = True
    ) -> AnalysisView:
        """Analyse a new image (or the session's image with new settings).

        ``previous``: the session's state before, to tell whether the choosers' names change.
        ``chart``: draw the residual chart (the page does while its tab is open).
        """
        if source is None:
            raise ValueError("No image yet: upload, paste, photograph or draw one, or pick an example.")
        key, explorer = self.explorer(settings.model_key, kind, settings.session)
        analysis = explorer.analyze(source, k=int(settings.k))
        names = [m.name for m in analysis.metrics]
        chosen = settings.detail_block if settings.detail_block in names else names[-1]
        choices = (tuple(names), tuple(analysis.card.classes))
        page = build_page(analysis, view=settings.view, detail_block=chosen, chart=chart)
        return AnalysisView(
            state=PageState(source, kind, settings.model_key, int(settings.k), choices,
                            (page.grids.pitch, page.grids.slot)),
            page=page,
            blocks=names,
            detail_block=chosen,
            lesion_blocks=[name for name in settings.lesion_blocks if name in names],
            classes=list(analysis.card.classes),
            choices_changed=previous is None or previous.choices != choices,
        )

    def residual(self, state: PageState | None, settings: Settings) -> ResidualView:
        """The residual chart and table of the session's image, drawn when their tab is opened."""
        if state is None:
            return ResidualView(state, None, None)
        state, explorer, analysis = self._current(state, settings)
        chart = residual_chart(analysis.metrics, bands=analysis.card.reference_bands or None)
        return ResidualView(state, chart, metrics_table(analysis))

    def _current(self, state: PageState | None, settings: Settings) -> tuple[PageState, Explorer, Analysis]:
        """The session's image analysed again (a forward pass is cheap); tools' results kept if still valid."""
        if state is None:
            raise ValueError("Analyse an image first: upload, paste, photograph or draw one, or pick an example.")
        _, explorer = self.explorer(settings.model_key, state.kind, settings.session)
        if not state.same_request(settings.model_key, int(settings.k)):
            state = PageState(state.source, state.kind, settings.model_key, int(settings.k), state.choices, state.strip)
        return state, explorer, explorer.analyze(state.source, k=int(settings.k))

    def lesion(self, state: PageState | None, settings: Settings) -> LesionView:
        state, explorer, analysis = self._current(state, settings)
        result = explorer.lesion(analysis, list(settings.lesion_blocks), int(settings.k), alpha=float(settings.alpha))
        state = dataclasses.replace(state, lesion=result)
        return LesionView(state, {p.label: p.prob for p in result.predictions}, lesion_text(result))

    def sweep(self, state: PageState | None, settings: Settings) -> SweepView:
        state, explorer, analysis = self._current(state, settings)
        results = explorer.sweep(analysis)
        return SweepView(dataclasses.replace(state, sweep=results), lesion_sweep_chart(results), sweep_rows(results))

    def readout(self, state: PageState | None, settings: Settings) -> ReadoutView:
        state, explorer, analysis = self._current(state, settings)
        result = explorer.readout(analysis)
        study = explorer.card.studies.get("probes")
        probes = None
        if study:
            readings = explorer.probe_readings(analysis)
            probes = probe_chart(study, readings=readings)
        text = readout_text(result) + (f"  \n{probe_summary(study)}" if study else "")
        return ReadoutView(dataclasses.replace(state, readout=result), readout_chart(result), text, probes)

    def gradcam(self, state: PageState | None, settings: Settings, block: str | None, label: str | None) -> GradcamView:
        """Grad-CAM of ``label`` (the predicted class if empty) at ``block`` (the last if empty).

        A block or class of another model (the page's choosers still hold the last model's after a switch)
        is replaced by the default, and the title says which was not this model's.
        """
        state, explorer, analysis = self._current(state, settings)
        classes, blocks = explorer.classes, [m.name for m in analysis.metrics]
        foreign = [f"“{name}” is not a {what} of {explorer.card.name}"
                   for name, what, known in ((block, "block", blocks), (label, "class", classes))
                   if name and name not in known]
        block = block if block in blocks else blocks[-1]
        index = classes.index(label) if label in classes else analysis.predictions[0].index
        cam = explorer.gradcam(analysis, block, index)
        state = dataclasses.replace(state, cam=(block, index, cam))
        title = f"Grad-CAM for “{classes[index]}” at {block}" + (f" ({'; '.join(foreign)})" if foreign else "")
        return GradcamView(state, self._cam_image(analysis, cam), title, blocks, list(classes), block)

    @staticmethod
    def _cam_image(analysis: Analysis, cam: np.ndarray) -> Image.Image:
        return overlay(cam, input_image(analysis.input, analysis.card, size=CAM_SIZE))

    def export(self, state: PageState | None, settings: Settings, folder: Path) -> tuple[PageState, Path]:
        """A ZIP of everything the page shows for the session's image; tools already run are not run again."""
        state, explorer, analysis = self._current(state, settings)
        blocks = tuple(settings.lesion_blocks)
        lesion = state.lesion if state.lesion is not None and state.lesion.lesioned == blocks else None
        if lesion is None and blocks:
            lesion = explorer.lesion(analysis, list(blocks), int(settings.k), alpha=float(settings.alpha))
        sweep = state.sweep if state.sweep is not None else explorer.sweep(analysis)
        readout = state.readout
        if readout is None:
            try:
                readout = explorer.readout(analysis)
            except ValueError:  # a model without a head of any block's width
                readout = None
        cam = state.cam if state.cam is not None else (analysis.metrics[-1].name, analysis.predictions[0].index, None)
        cam_map = cam[2] if cam[2] is not None else explorer.gradcam(analysis, cam[0], cam[1])
        state = dataclasses.replace(state, lesion=lesion, sweep=sweep, readout=readout, cam=(cam[0], cam[1], cam_map))
        page = build_page(analysis, sizes=FILES)
        images = {"input (as the model saw it)": page.model_input, "residual chart": page.chart}
        images.update({f"feature maps {caption.split(' · ')[0]} F(x)": img for img, caption in page.grids})
        images["lesion sweep"] = lesion_sweep_chart(sweep)
        if readout is not None:
            images["readout"] = readout_chart(readout)
        images[f"grad-cam {cam[0]}"] = self._cam_image(analysis, cam_map)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = export_zip(analysis, images=images, lesion=lesion, sweep=sweep, readout=readout,
                          path=folder / f"residual-analysis-{analysis.card.name}-{stamp}.zip")
        return state, path
