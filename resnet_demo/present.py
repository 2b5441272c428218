"""What the page shows, computed without Gradio: the models on offer and one analysis turned into outputs.

``app.py`` only lays components out and wires events to these functions; everything here can be
tested and benchmarked without a server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .analysis import METRIC_NAMES
from .checkpoints import WEIGHTS_DIR, WeightsError
from .explorer import Analysis, Explorer
from .render import VIEWS, feature_grid, input_image, residual_chart

__all__ = ["METRIC_COLUMNS", "ModelChoice", "Page", "Registry", "build_page", "default_registry"]

METRIC_COLUMNS = ["block", "stage", *METRIC_NAMES]
AUTO = "auto"


@dataclass
class ModelChoice:
    """One entry of the model selector: how to load it, and what went wrong if it cannot be."""

    key: str
    label: str
    load: Callable[[], Explorer]
    where: str = ""
    explorer: Explorer | None = None
    error: str | None = None


class Registry:
    """The models the page offers, loaded once at start-up and shared by all sessions.

    A model that cannot be loaded stays listed with its error, so the page and the terminal say
    what is missing instead of silently serving something else.
    """

    def __init__(self, choices: list[ModelChoice]) -> None:
        self.choices = {c.key: c for c in choices}
        self._lock = threading.Lock()

    def load_all(self) -> None:
        for choice in self.choices.values():
            self._load(choice)

    def _load(self, choice: ModelChoice) -> None:
        with self._lock:
            if choice.explorer is None and choice.error is None:
                try:
                    choice.explorer = choice.load()
                except (WeightsError, ValueError, OSError) as exc:
                    choice.error = str(exc)

    def get(self, key: str) -> Explorer:
        """The explorer for ``key``; raises ``WeightsError`` saying what is missing and where."""
        if key not in self.choices:
            raise WeightsError(f"unknown model '{key}'; choose one of {list(self.choices)}")
        choice = self.choices[key]
        self._load(choice)
        if choice.explorer is None:
            raise WeightsError(f"The {choice.label} model is not available: {choice.error}")
        return choice.explorer

    def resolve(self, key: str, kind: str) -> str:
        """``auto`` picks the model trained for the input kind: drawings -> MNIST, photos -> the photo model."""
        if key != AUTO:
            return key
        for choice in self.choices.values():
            if choice.explorer is not None and choice.explorer.card.input_kind == kind:
                return choice.key
        wanted = "mnist" if kind == "drawing" else "cifar10"
        return wanted if wanted in self.choices else next(iter(self.choices))

    def status(self) -> list[str]:
        """One line per model: what it is and whether it is ready."""
        lines = []
        for c in self.choices.values():
            if c.explorer is not None:
                card = c.explorer.card
                headline, target = card.headline(), card.target()
                figure = ""
                if headline:
                    tta = " with flip TTA" if headline[0] == "test_acc_tta" else ""
                    figure = f", {headline[1]:.2%} test accuracy{tta}"
                if target and not target[2]:
                    figure += f" (below the project's {target[1]:.1%} target: interim weights, see the README)"
                if card.trained:
                    lines.append(f"**{c.label}**: {card.name} on {c.explorer.device}{figure}")
                else:
                    lines.append(f"**{c.label}**: {card.name} has UNTRAINED weights; its predictions are noise")
            else:
                lines.append(f"**{c.label}**: not available — {c.error}")
        return lines


def default_registry(device: str | None = None, weights_dir: Path = WEIGHTS_DIR) -> Registry:
    """The two shipped models: CIFAR-10 for photos and MNIST for drawn digits."""

    def shipped(name: str) -> Callable[[], Explorer]:
        return lambda: Explorer.from_weights(weights_dir / f"{name}.safetensors", device)

    return Registry(
        [
            ModelChoice("cifar10", "CIFAR-10 (photos)", shipped("cifar10_resnet")),
            ModelChoice("mnist", "MNIST (drawn digits)", shipped("mnist_resnet")),
        ]
    )


@dataclass
class Page:
    """Every output of one analysis, ready for the page's components."""

    analysis: Analysis
    predictions: dict[str, float]
    model_input: Image.Image
    grids: list[tuple[Image.Image, str]]
    chart: Image.Image
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


def block_detail(analysis: Analysis, block: str, view: str = "f", max_channels: int = 256) -> Image.Image:
    """All channels of one block (up to ``max_channels``), each scaled to its own range, most active first."""
    fmap = block_tensor(analysis, block, view)
    n = min(fmap.shape[0], max_channels)
    return feature_grid(fmap, signed=view == "f", max_channels=n, cell=40, per_channel_scale=True)


def summarise(analysis: Analysis) -> str:
    top = analysis.predictions[0]
    metrics = analysis.metrics
    busiest = max(metrics, key=lambda m: m.ratio)
    quietest = min(metrics, key=lambda m: m.ratio)
    against = [m.name for m in metrics if m.cosine < -0.2]
    lines = [
        f"**{analysis.card.name}** predicts **{top.label}** ({top.prob:.1%}).",
        f"Block **{busiest.name}** changes its input most (‖F‖/‖s‖ = {busiest.ratio:.2f}); "
        f"**{quietest.name}** least ({quietest.ratio:.2f}).",
    ]
    if against:
        lines.append(f"Branches that mostly cancel their input (cosine < −0.2): {', '.join(against)}.")
    if analysis.card.reference_bands:
        from .bands import describe

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
) -> Page:
    """Render one analysis: top-k, the input as the model saw it, a grid per block, chart and table."""
    grids = [
        (
            feature_grid(getattr(rec, view)[0], signed=view == "f", max_channels=max_channels),
            f"{rec.name} · {m.ratio:.2f}",
        )
        for rec, m in zip(analysis.blocks, analysis.metrics)  # metrics are computed from the records, in order
    ]
    return Page(
        analysis=analysis,
        predictions={p.label: p.prob for p in analysis.predictions},
        model_input=input_image(analysis.input, analysis.card),
        grids=grids,
        chart=residual_chart(analysis.metrics, bands=analysis.card.reference_bands or None),
        table=metrics_table(analysis),
        summary=summarise(analysis),
        detail=block_detail(analysis, detail_block, view) if detail_block else None,
    )


# --- insight tools (lesions, readout, Grad-CAM, export) ----------------------------------------------


def lesion_view(explorer: Explorer, analysis: Analysis, blocks: list[str], k: int = 5):
    """Top-k with ``blocks`` lesioned, and a sentence on what changed; returns (LesionResult, label dict, text)."""
    from .insight import lesion

    if not blocks:
        raise ValueError("Choose at least one block to lesion.")
    result = lesion(explorer.model, analysis.input.to(explorer.device), blocks, explorer.card.classes, k,
                    intact_logits=analysis.logits)
    after = result.predictions[0]
    text = (
        f"Without the branch of **{', '.join(result.lesioned)}**, the network predicts **{after.label}** "
        f"({after.prob:.1%}). The original top-1 **{result.orig_label}** goes from "
        f"{result.p_orig_top1_before:.1%} to {result.p_orig_top1_after:.1%} (Δ {result.delta:+.1%}); "
        f"KL(intact ‖ lesioned) = {result.kl:.3f} nats."
        + (" **The top-1 changed.**" if result.top1_changed else " The top-1 is unchanged.")
    )
    return result, {p.label: p.prob for p in result.predictions}, text


def sweep_view(explorer: Explorer, analysis: Analysis):
    """Each block lesioned alone: (results, chart image, table rows)."""
    from .insight import lesion_sweep, lesion_sweep_chart
    from .render import figure_to_image

    results = lesion_sweep(explorer.model, analysis.input.to(explorer.device), explorer.card.classes,
                           intact_logits=analysis.logits)
    rows = [[r.lesioned[0], r.predictions[0].label, round(r.p_orig_top1_after, 4), round(r.delta, 4), round(r.kl, 4)]
            for r in results]
    return results, figure_to_image(lesion_sweep_chart(results)), rows


SWEEP_COLUMNS = ["lesioned block", "new top-1", "p(original top-1)", "Δp", "KL (nats)"]


def readout_view(explorer: Explorer, analysis: Analysis):
    """The head applied to each block of the head's width: (Readout, chart image, text)."""
    from .insight import readout, readout_chart
    from .render import figure_to_image

    result = readout(explorer.model, analysis, explorer.card.classes)
    steps = ", ".join(f"{r.name}: {r.top1.label} ({r.p_final:.0%})" for r in result)
    settles = (f"The prediction settles at **{result.settles_at}**." if result.settles_at
               else "The readouts never agree with the final prediction.")
    text = f"Final top-1: **{result.final.label}**. Probability of it, read out after each block: {steps}. {settles}"
    return result, figure_to_image(readout_chart(result)), text


def gradcam_view(explorer: Explorer, analysis: Analysis, block: str, class_label: str | None):
    """Grad-CAM for ``class_label`` (the predicted class when empty) at ``block``, over the model's input."""
    from .insight import gradcam, overlay

    classes = explorer.card.classes
    if class_label and class_label not in classes:
        raise ValueError(f"unknown class {class_label!r} for {explorer.card.name}")
    index = classes.index(class_label) if class_label else analysis.predictions[0].index
    cam = gradcam(explorer.model, analysis.input.to(explorer.device), block, index)
    return overlay(cam, input_image(analysis.input, analysis.card, size=256)), classes[index]


def export_view(explorer: Explorer, analysis: Analysis, lesion_blocks: list[str], folder: Path) -> Path:
    """A ZIP of everything the page shows for this analysis (and the lesion of ``lesion_blocks`` if any)."""
    from .export import export_zip

    page = build_page(analysis)
    images = {"input (as the model saw it)": page.model_input, "residual chart": page.chart}
    images.update({f"feature maps {caption.split(' · ')[0]} F(x)": img for img, caption in page.grids})
    sweep, sweep_chart, _ = sweep_view(explorer, analysis)
    images["lesion sweep"] = sweep_chart
    try:
        readout, readout_chart_img, _ = readout_view(explorer, analysis)
        images["readout"] = readout_chart_img
    except ValueError:  # a model without a head of any block's width
        readout = None
    last = analysis.metrics[-1].name
    images[f"grad-cam {last}"] = gradcam_view(explorer, analysis, last, None)[0]
    lesion = lesion_view(explorer, analysis, lesion_blocks)[0] if lesion_blocks else None
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return export_zip(analysis, images=images, lesion=lesion, sweep=sweep, readout=readout,
                      path=folder / f"residual-analysis-{analysis.card.name}-{stamp}.zip")
