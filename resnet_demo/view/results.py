"""The typed values the page's handlers take and return: what ``app.py`` maps to components by name.

:class:`Settings` are the page's controls; :class:`PageState` is what one browser session remembers (its
image, the model it was analysed with, and the results of the tools already run on it, so that the export
packs what the page has shown instead of computing it again; no tensors, as Gradio keeps one per session).
Every other class is one handler's result. The channel, data-set and timeline results live beside their
tabs' code (:mod:`.channel_page`, :mod:`.dataset_page`, :mod:`.timeline_view`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..core.inside import Inside
from ..core.insight import LesionResult, Readout
from .analysis_view import Page

__all__ = [
    "AnalysisView",
    "CompareView",
    "GradcamView",
    "InsideView",
    "LesionView",
    "PageState",
    "ReadoutView",
    "ResidualView",
    "Settings",
    "SimilarityView",
    "SweepView",
    "UploadRequest",
    "UploadView",
]


@dataclass(frozen=True)
class Settings:
    """The page's controls that every analysis and tool reads."""

    model_key: str = "auto"
    k: int = 5
    part: str = "f"  # which part of a block the maps show: x, F(x) ("f") or y
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
    strip: tuple = ()  # the feature-map strip's StripLayout (a tuple of ints), to find the block under a click
    lesion: LesionResult | None = None
    sweep: list[LesionResult] | None = None
    readout: Readout | None = None
    cam: tuple[str, int, np.ndarray] | None = None  # (block, class index, map over the input)
    inside: Inside | None = None  # the "Inside the block" view last opened on this image (contribution maps dropped)

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
    config_files: tuple[str, ...] = ()  # config.json / preprocessor_config.json uploaded with the checkpoint


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


@dataclass
class InsideView:
    """Inside one block, for one output channel of the session's image: the picture, the words, the numbers."""

    state: PageState
    block: str
    channel: int
    blocks: list[str]  # the model's, for the block chooser
    image: Image.Image
    words: str  # Markdown: the sentence, then what each step does
    sentence: str
    unit: str  # one position's numbers (the middle of the map until a click picks another)
    data: dict  # Inside.to_dict(maps=True) as JSON types: what the API returns
