"""The data-set tab without Gradio: where the model fails on a labelled set, and what the stored studies say.

The set is the shipped evaluation set of the model's data (``weights/evalset/``) or a labelled ZIP the
visitor gives (one folder per class), read by :mod:`resnet_demo.core.studies.labelled` with its bounds and kept for
that browser session only (the upload itself is deleted once read). Every scan is cached
(:data:`resnet_demo.core.studies.errorscan.SCANS`), so changing a filter costs no forward pass.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..core.errors import DataError
from ..core.explorer import Explorer
from ..core.studies.errorscan import SORTS, WHICH, LabelledImages, fingerprint, scan_set
from ..core.studies.evalsets import evalset_for, load_evalset
from ..core.studies.labelled import LabelledSet, read_labelled
from ..core.studies.lesions import LesionScan, scan_explorer
from .error_view import confusion_cell, confusion_image, gallery_items, scan_summary, set_image
from .lesion_charts import alpha_chart, class_lesion_map

__all__ = [
    "SHIPPED_SET",
    "SORTS",
    "USER_SET",
    "SetFilter",
    "SetView",
    "StudyView",
    "UserSets",
    "cell_filter",
    "lesion_study",
    "pick_image",
    "set_key",
    "set_view",
    "the_set",
]

SHIPPED_SET = "shipped"  # the shipped evaluation set of the model's data
USER_SET = "yours"  # the labelled ZIP this session gave
GALLERY_LIMIT = 120  # images shown at once; the filter narrows the rest down


@dataclass(frozen=True)
class SetFilter:
    """Which images of the scanned set the gallery shows, and in what order."""

    which: str = "wrong"  # all, wrong, right
    true: str | None = None  # a class name, or None for any
    predicted: str | None = None
    sort: str = "confidently_wrong"

    def __post_init__(self) -> None:
        if self.which not in WHICH:
            raise ValueError(f"show must be one of {WHICH}, not {self.which!r}")
        if self.sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}, not {self.sort!r}")


@dataclass
class SetView:
    """The tab's outputs for one scan and filter."""

    summary: str
    confusion: Image.Image
    gallery: list[tuple[Image.Image, str]]
    shown: list[int]  # the set's index of each gallery item, in order
    classes: list[str]
    count: str  # how many images match the filter


class UserSets:
    """Labelled sets visitors gave, one per browser session, the least recently used dropped beyond ``total``."""

    def __init__(self, total: int = 16) -> None:
        self.total = total
        self._sets: OrderedDict[tuple[str, str], LabelledSet] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, session: str, explorer: Explorer, path: str | Path, name: str | None = None) -> LabelledSet:
        """Read the ZIP at ``path`` for ``explorer``'s classes and input; the file is deleted afterwards."""
        try:
            data = read_labelled(Path(path), explorer.card, name=name or Path(path).name)
        finally:
            Path(path).unlink(missing_ok=True)
        with self._lock:
            self._sets[(session, explorer.card.weights_sha256 or explorer.card.name)] = data
            while len(self._sets) > self.total:
                self._sets.popitem(last=False)
        return data

    def find(self, session: str, explorer: Explorer) -> LabelledSet | None:
        """The session's labelled set for ``explorer``'s model, or ``None`` when it gave none."""
        key = (session, explorer.card.weights_sha256 or explorer.card.name)
        with self._lock:
            data = self._sets.get(key)
            if data is not None:
                self._sets.move_to_end(key)
        return data

    def get(self, session: str, explorer: Explorer) -> LabelledSet:
        """As :meth:`find`; a :class:`DataError` that says to upload a ZIP when the session gave none."""
        data = self.find(session, explorer)
        if data is None:
            raise DataError(f"No labelled set of yours for {explorer.card.name} in this session: upload a ZIP with "
                            "one folder per class first.")
        return data

    def end_session(self, session: str) -> None:
        with self._lock:
            for key in [k for k in self._sets if k[0] == session]:
                del self._sets[key]


def the_set(explorer: Explorer, which: str, session: str, user_sets: UserSets) -> LabelledImages:
    """The shipped evaluation set of the model's data, or the session's own labelled set."""
    if which == USER_SET:
        return user_sets.get(session, explorer)
    name = evalset_for(explorer.card)
    if name is None:
        raise DataError(f"No evaluation set ships for {explorer.card.name}'s classes: upload a labelled ZIP "
                        "(one folder per class) to browse its errors.")
    return load_evalset(name)


def set_key(data: LabelledImages | None) -> tuple:
    """A set's identity for a cache of results over it: its name and a hash of its contents (a second ZIP under the
    same name is another set); empty for no set."""
    return () if data is None else (data.name, fingerprint(data))


def set_view(explorer: Explorer, data: LabelledImages, filt: SetFilter,
             progress: Callable[[float], None] | None = None, note: str = "") -> SetView:
    """Scan ``data`` with ``explorer`` (cached) and show the images ``filt`` selects."""
    scan = scan_set(explorer, data, progress=progress)
    true = scan.class_index(filt.true) if filt.true else None
    predicted = scan.class_index(filt.predicted) if filt.predicted else None
    matching = scan.filter(true=true, predicted=predicted, which=filt.which, sort=filt.sort)
    shown = matching[:GALLERY_LIMIT]
    count = f"{len(matching)} image(s) match" + (f"; the first {len(shown)} are shown" if len(shown) < len(matching)
                                                  else "")
    summary = scan_summary(scan) + (f"  \n{note}" if note else "")
    return SetView(summary, confusion_image(scan), gallery_items(data.images, scan, shown), shown,
                   list(scan.classes), count + ". Click an image to analyse it above.")


def cell_filter(classes: list[str], x: float, y: float, filt: SetFilter) -> SetFilter:
    """The filter after a click at pixel (x, y) of the confusion matrix: a cell picks true and predicted class,
    a row's or column's name one of them; elsewhere the filter is unchanged."""
    hit = confusion_cell(classes, x, y)
    if hit is None:
        return filt
    t, p = hit
    which = "all" if t is not None and p is not None else filt.which
    return SetFilter(which, classes[t] if t is not None else None, classes[p] if p is not None else None, filt.sort)


def pick_image(data: LabelledImages, shown: list[int], position: int) -> Image.Image:
    """The set's image behind gallery item ``position``, at its own size, for the main view."""
    if not 0 <= position < len(shown):
        raise ValueError("That image is no longer in the gallery: scan the set again.")
    return set_image(data.images, shown[position])



@dataclass
class StudyView:
    """Which blocks each class needs: the block x class lesion map, accuracy against alpha, and words."""

    lesion_map: Image.Image
    alpha_chart: Image.Image
    text: str


def lesion_study(explorer: Explorer, progress: Callable[[float], None] | None = None,
                 data: LabelledSet | None = None) -> StudyView:
    """Which blocks each class needs, over ``data`` (the visitor's labelled set) when given, else the study stored
    in the model's card, else one computed now over the shipped evaluation set of its data."""
    if data is not None:
        if list(data.classes) != list(explorer.classes):
            raise DataError(f"the set {data.name} is labelled with other classes than {explorer.card.name}'s: "
                            "upload it again for this model.")
        result = scan_explorer(explorer, data.images, data.labels, progress=progress)
        source = f"{result.n} images of your ZIP {data.name}, computed now"
    else:
        result, source = _shipped_study(explorer, progress)
    lesions = result.lesions
    overall = dict(zip(lesions.rows, lesions.overall))
    intact = overall.pop("none")
    worst = sorted(overall.items(), key=lambda kv: kv[1])[:3]
    text = (f"Over {source}: intact accuracy {intact:.1%}; without "
            + ", ".join(f"**{b}** {a:.1%}" for b, a in worst)
            + ". Each cell of the map is a class's accuracy change with that block's branch removed; the chart scales "
            "one branch at a time by α (0 removes it, 1 is the intact network).")
    odd = strangeness_text(explorer.card.studies.get("strangeness"))
    return StudyView(class_lesion_map(lesions, title=f"Which blocks each class needs: {explorer.card.name}"),
                     alpha_chart(result.curves), text + (f"  \n{odd}" if odd else ""))


def _shipped_study(explorer: Explorer, progress: Callable[[float], None] | None) -> tuple[LesionScan, str]:
    """The lesion study stored in the card (``studies["lesions"]``, by ``python -m resnet_demo.training.scan``),
    else one computed over the shipped evaluation set of the model's data, and words saying which."""
    stored = explorer.card.studies.get("lesions")
    if stored:
        result = LesionScan.from_dict(stored)
        return result, (f"{result.n} images of {stored.get('data', 'its test set')} ({stored.get('split', 'test')}), "
                        "stored in the model card")
    name = evalset_for(explorer.card)
    if name is None:
        raise DataError(f"{explorer.card.name} has no stored lesion study and no shipped evaluation set fits its "
                        "classes: upload a labelled ZIP of yours in this tab (one folder per class, named as the "
                        "model's classes), choose “Your labelled ZIP” and run the study again.")
    data = load_evalset(name)
    result = scan_explorer(explorer, data.images, data.labels, progress=progress)
    return result, f"the {result.n} images of {name}, computed now"


def strangeness_text(study: dict | None) -> str:
    """How well the page's strange-input score separates the test images from other data (AUROC per set)."""
    if not study:
        return ""
    score = study.get("score", "band_rms")
    sets = ", ".join(f"{_set_name(name, s)} {s['auroc'][score]:.3f}" for name, s in study.get("sets", {}).items())
    test = study.get("test", {})
    return (f"**Strange-input warning**: the score ({score}) separates {test.get('n', '?')} held-out test images from "
            f"other data with AUROC {sets}; the page warns above {study.get('threshold', float('nan')):.2f}, "
            f"which {test.get('warned', 0.05):.0%} of test images exceed.")


def _set_name(name: str, entry: dict) -> str:
    """``other`` is the other data set, named by its description's first part (its file)."""
    return entry.get("description", name).split(",")[0] if name == "other" else name.replace("_", " ")
