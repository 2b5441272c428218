"""The page's handlers without Gradio: :class:`Pages` takes a session's state and settings, asks the
core's :class:`~resnet_demo.core.explorer.Explorer` (or a study over one) for the numbers, and returns one
typed result of :mod:`.results`, drawn by :mod:`.analysis_view` and :mod:`.insight_view`.

Everything here can be tested and benchmarked without a server; ``app.py`` only maps the results' fields to
components by name.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from ..core.errors import InputError, WeightsError
from ..core.explorer import Analysis, Explorer
from ..core.preprocess import load_image
from ..core.studies.evalsets import evalset_for, load_evalset
from ..core.studies.similarity import block_similarity
from ..core.weights.hub import normalise_model_id, open_from_hub
from .analysis_view import FILES, block_detail, build_page, compare_text, detail_channel, metrics_table, side_by_side
from .channel_page import ChannelView, channel_view, visualisation
from .dataset_page import (
    SHIPPED_SET,
    USER_SET,
    SetFilter,
    SetView,
    StudyView,
    UserSets,
    cell_filter,
    lesion_study,
    pick_image,
    set_key,
    set_view,
    the_set,
)
from .error_view import labelled_summary
from .export import export_zip, jsonable
from .inside_view import inside_figure, sentence, unit_text, words_markdown
from .insight_view import cam_image, lesion_text, readout_text, sweep_rows
from .probe_charts import probe_chart, probe_summary
from .registry import Registry
from .render import comparison_chart, lesion_sweep_chart, readout_chart, residual_chart, similarity_map, slot_at
from .results import (
    AnalysisView,
    CompareView,
    GradcamView,
    InsideView,
    LesionView,
    PageState,
    ReadoutView,
    ResidualView,
    Settings,
    SimilarityView,
    SweepView,
    UploadRequest,
    UploadView,
)
from .timeline_view import RUN_PREFIX, Timelines, TimelineView, timeline_view
from .uploads import UPLOAD_PREFIX, UserModels, load_upload, parse_class_names, read_config_files

__all__ = ["Pages"]


class Pages:
    """The page's handlers without Gradio: each takes the session's state and settings, returns a typed view."""

    def __init__(self, registry: Registry, uploads: UserModels | None = None,
                 timelines: Timelines | None = None, hub: bool = True) -> None:
        self.registry = registry
        self.uploads = uploads
        self.hub = hub  # whether visitors may ask for a model from the Hugging Face Hub (with uploads on)
        self.timelines = timelines if timelines is not None else Timelines(shipped=False)
        self.user_sets = UserSets()
        self._results: dict[tuple, Any] = {}  # see _cached
        self._lock = threading.Lock()

    @staticmethod
    def block_at(state: PageState | None, x: float, y: float) -> str | None:
        """The block whose slot is under pixel (x, y) of the session's feature-map strip, if any."""
        if state is None or not state.choices:
            return None
        i = slot_at(x, y, state.strip)
        names = state.choices[0]
        return names[i] if i is not None and i < len(names) else None

    @staticmethod
    def upload_error(path: str) -> str:
        """The sentence to show for an upload Gradio could not decode: the project's decoder says what is wrong."""
        try:
            load_image(path)
        except InputError as exc:
            return str(exc)
        return "The upload could not be read as an image."

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
        try:
            names = parse_class_names(request.class_text, request.class_file)
            config, preprocessor = read_config_files(request.config_files)
        except BaseException:
            Path(checkpoint).unlink(missing_ok=True)  # as load_upload would have: nothing uploaded stays on disk
            raise
        explorer = load_upload(checkpoint, arch=request.arch, preset=request.preset, class_names=names,
                               size=request.size, mean=request.mean, std=request.std, config=config,
                               preprocessor=preprocessor)
        return self._offer(session, explorer, f"Yours: {Path(request.file_name or checkpoint).name}")

    def from_hub(self, session: str, model_id: str | None,
                 progress: Callable[[float, str], None] | None = None) -> UploadView:
        """A model from the Hugging Face Hub into this session's models, as an upload is (the same bounds, the same
        least-recently-used eviction). The download may take minutes; ``progress(fraction, words)`` says so."""
        if self.uploads is None:
            raise WeightsError("uploaded models are turned off on this server")
        if not self.hub:
            raise WeightsError("models from the Hugging Face Hub are turned off on this server")
        if not model_id or not model_id.strip():
            raise ValueError("Type a model id from the Hugging Face Hub first, e.g. timm/resnet50.a1_in1k.")
        model_id = normalise_model_id(model_id)
        if progress is not None:
            progress(0.0, f"Downloading {model_id} from the Hugging Face Hub (a large model takes minutes) …")
        explorer = Explorer(*open_from_hub(model_id))
        return self._offer(session, explorer, f"Hub: {explorer.card.name}")

    def _offer(self, session: str, explorer: Explorer, label: str) -> UploadView:
        key, evicted = self.uploads.add(session, explorer, label)
        card = explorer.card
        text = (f"Loaded **{label}**: {card.training.get('architecture', card.arch)}; {len(card.classes)} classes, "
                f"{card.input_size}×{card.input_size} {card.input_kind}s. It is in the model selector for this "
                "browser session only.")
        if evicted:
            text += f" Made room by removing {', '.join(evicted)} (least recently used)."
        return UploadView(key, label, text, self.model_choices(session))

    def compare(self, state: PageState | None, settings: Settings, model_b: str, part: str = "f") -> CompareView:
        """The session's image through model A (the page's selection) and model B, each with its own preprocessing."""
        state, a, analysis_a = self._current(state, settings)
        _, b = self.explorer(model_b, state.kind, settings.session)
        analysis_b = b.analyze(state.source, k=int(settings.k))
        name_a, name_b = a.card.name, b.card.name
        chart = comparison_chart(analysis_a.metrics, analysis_b.metrics, name_a, name_b,
                                 bands_a=a.card.reference_bands or None)
        details = [block_detail(x, x.metrics[-1].name, part) for x in (analysis_a, analysis_b)]
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
        """Linear CKA between every block of A and of B over A's shipped evaluation set, else the session's labelled
        set for A, else B's shipped set (B takes each image through its own preprocessing); cached per pair and set."""
        _, a = self.explorer(settings.model_key, kind, settings.session)
        _, b = self.explorer(model_b, kind, settings.session)
        images, words, ident = self._cka_set(settings.session, a, b)
        key = ("cka", id(a), a.card.weights_sha256, id(b), b.card.weights_sha256, *ident)
        sim = self._cached(key, lambda: block_similarity(a, b, images(), data=ident[0], progress=progress))
        image = similarity_map(sim.matrix, sim.blocks_a, sim.blocks_b, a.card.name, b.card.name)
        matches = ", ".join(f"{x}→{y} ({v:.2f})" for x, y, v in sim.best_match())
        text = (f"Linear CKA over {sim.n} images of {words} (each block's output flattened; minibatch CKA, "
                f"Nguyen et al. 2021). For each block of A, the most similar block of B: {matches}.")
        return SimilarityView(image, text)

    def _cka_set(self, session: str, a: Explorer, b: Explorer) -> tuple[Callable[[], Any], str, tuple]:
        """The images block similarity runs over (loaded when called), words naming them, and their identity for
        the cache: A's shipped evaluation set, else the session's labelled set for A, else B's shipped set."""
        name = evalset_for(a.card)
        data = self.user_sets.find(session, a) if name is None else None
        if data is not None:
            return lambda: data.images, f"your ZIP `{data.name}`", set_key(data)
        name = name or evalset_for(b.card)
        if name is None:
            raise ValueError(f"No evaluation set ships for {a.card.name}'s data (block similarity needs labelled "
                             "images in its format): load a labelled ZIP of yours for it in the Data set tab (one "
                             "folder per class), then compute the block similarity again.")
        return lambda: load_evalset(name).images, f"`{name}`", (name,)

    def end_session(self, session: str) -> None:
        if self.uploads is not None and session:
            self.uploads.end_session(session)
        if session:
            self.user_sets.end_session(session)

    # --- what a channel responds to --------------------------------------------------------------------

    def channel(self, state: PageState | None, settings: Settings, channel: int,
                progress: Callable[[float], None] | None = None) -> ChannelView:
        """Channel ``channel`` of the enlarged block (``settings.detail_block``) in the chosen part."""
        state, explorer, analysis = self._current(state, settings)
        block = settings.detail_block or analysis.metrics[-1].name
        return channel_view(explorer, analysis, block, settings.part, int(channel), progress)

    def channel_click(self, state: PageState | None, settings: Settings, x: float, y: float,
                      progress: Callable[[float], None] | None = None) -> ChannelView | None:
        """The channel whose tile is under pixel (x, y) of the enlarged block's picture (``None``: no tile)."""
        state, explorer, analysis = self._current(state, settings)
        block = settings.detail_block or analysis.metrics[-1].name
        channel = detail_channel(analysis, block, settings.part, x, y)
        return None if channel is None else channel_view(explorer, analysis, block, settings.part, channel, progress)

    def visualise(self, state: PageState | None, settings: Settings, channel: int) -> tuple[Image.Image, str]:
        state, explorer, analysis = self._current(state, settings)
        block = settings.detail_block or analysis.metrics[-1].name
        return visualisation(explorer, analysis, block, settings.part, int(channel))

    # --- inside one block ------------------------------------------------------------------------------

    def inside(self, state: PageState | None, settings: Settings, block: str | None, channel: int | None
               ) -> InsideView:
        """Inside ``block`` (the enlarged one, else the last, when empty or not this model's) for its output channel
        ``channel`` on the session's image: re-runs that block only. The state keeps it for the export."""
        state, explorer, analysis = self._current(state, settings)
        names = [m.name for m in analysis.metrics]
        if block not in names:
            block = settings.detail_block if settings.detail_block in names else names[-1]
        channel = int(channel or 0)
        try:
            inside = explorer.inside(analysis, block, channel)
        except IndexError as exc:  # a channel the block does not have: a sentence on the page, as other refusals
            raise ValueError(str(exc)) from None
        # Kept per session: the contribution maps (in_channels x H x W in float64) are the one large part, and
        # neither the picture, the numbers of a position nor the export's JSON reads them.
        kept = dataclasses.replace(inside, contribution_maps=inside.contribution_maps[:0])
        h, w = inside.y.shape
        return InsideView(dataclasses.replace(state, inside=kept), block, channel, names,
                          inside_figure(inside).image, words_markdown(inside), sentence(inside),
                          unit_text(inside, h // 2, w // 2), jsonable(inside.to_dict(maps=True)))

    def inside_click(self, state: PageState | None, settings: Settings, x: float, y: float) -> InsideView | None:
        """Inside the enlarged block for the channel whose tile is under pixel (x, y) of its picture (``None``: no
        tile). With the part x shown, the tile is an input channel: the same number of the block's output."""
        state, explorer, analysis = self._current(state, settings)
        block = settings.detail_block or analysis.metrics[-1].name
        channel = detail_channel(analysis, block, settings.part, x, y)
        return None if channel is None else self.inside(state, settings, block, channel)

    def inside_unit(self, state: PageState | None, settings: Settings, block: str | None, channel: int | None,
                    x: float, y: float) -> tuple[PageState, str | None]:
        """One position's numbers under pixel (x, y) of the inside picture (``None``: no map there); the block is
        re-run only when the session's state does not hold it for this image."""
        same = state is not None and state.same_request(settings.model_key, int(settings.k))
        inside = state.inside if same else None
        if inside is None or inside.block != block or inside.channel != int(channel or 0):
            v = self.inside(state, settings, block, channel)
            state, inside = v.state, v.state.inside
        position = inside_figure(inside).position_at(x, y)
        return state, None if position is None else unit_text(inside, *position)

    # --- the data-set tab ------------------------------------------------------------------------------

    def dataset(self, settings: Settings, kind: str, which: str, filt: SetFilter,
                progress: Callable[[float], None] | None = None) -> SetView:
        """Where the model fails on the shipped evaluation set or the session's labelled set."""
        _, explorer = self.explorer(settings.model_key, kind, settings.session)
        data = the_set(explorer, which, settings.session, self.user_sets)
        note = labelled_summary(data) if which == USER_SET else ""
        return set_view(explorer, data, filt, progress, note)

    def lesion_study(self, settings: Settings, kind: str, which: str = SHIPPED_SET,
                     progress: Callable[[float], None] | None = None) -> StudyView:
        """Which blocks each class needs over the set the data-set tab shows: the session's labelled set
        (``which == USER_SET``), else stored with the model or computed over its test images; cached per set."""
        _, explorer = self.explorer(settings.model_key, kind, settings.session)
        data = self.user_sets.get(settings.session, explorer) if which == USER_SET else None
        return self._cached(("lesions", id(explorer), explorer.card.weights_sha256, *set_key(data)),
                            lambda: lesion_study(explorer, progress, data))

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
        page = build_page(analysis, part=settings.part, detail_block=chosen, chart=chart)
        return AnalysisView(
            state=PageState(source, kind, settings.model_key, int(settings.k), choices,
                            page.grids.layout),
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
        return GradcamView(state, cam_image(analysis, cam), title, blocks, list(classes), block)

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
        images[f"grad-cam {cam[0]}"] = cam_image(analysis, cam_map)
        if state.inside is not None:  # the inside view was opened on this image: its picture and inside.json
            images[f"inside {state.inside.block} channel {state.inside.channel}"] = inside_figure(state.inside).image
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = export_zip(analysis, images=images, lesion=lesion, sweep=sweep, readout=readout, inside=state.inside,
                          path=folder / f"residual-analysis-{analysis.card.name}-{stamp}.zip")
        return state, path
