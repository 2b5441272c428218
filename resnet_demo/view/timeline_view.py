"""The training-timeline tab: one image through each snapshot of a run, and how the blocks settled over it.

The run folders the page offers are the shipped ``weights/*_timeline`` and any given on the command line
(``python app.py --timeline runs/x/cifar10_resnet_timeline``). A snapshot can also be model B of the
comparison: its key is ``run:<folder name>:<step>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import WeightsError
from ..core.explorer import Explorer
from ..core.studies.evalsets import evalset_for, load_evalset
from ..core.studies.timeline import History, Timeline, find_timelines
from ..core.weights.cards import WEIGHTS_DIR
from .render import STAGE_COLOURS, figure_to_image, readout_chart, residual_chart

__all__ = ["RUN_PREFIX", "TimelineView", "Timelines", "timeline_chart", "timeline_text"]

RUN_PREFIX = "run:"


class Timelines:
    """The run folders the page offers, read once (cards only; a snapshot's weights load when first used)."""

    def __init__(self, folders: Sequence[str | Path] = (), *, shipped: bool = True,
                 device: str | None = None) -> None:
        paths = [*(find_timelines(WEIGHTS_DIR) if shipped else []), *map(Path, folders)]
        self.runs: dict[str, Timeline] = {}
        self.errors: dict[str, str] = {}
        for path in paths:
            try:
                run = Timeline.read(path, device)
            except WeightsError as exc:
                self.errors[str(path)] = str(exc)
                continue
            self.runs.setdefault(run.name, run)

    def choices(self) -> list[tuple[str, str]]:
        """(label, name) of each run folder."""
        return [(f"{name} ({len(run)} snapshots)", name) for name, run in self.runs.items()]

    def snapshot_choices(self) -> list[tuple[str, str]]:
        """(label, key) of every snapshot, for the comparison's model B."""
        return [(f"{name} @ step {s.step:,}", f"{RUN_PREFIX}{name}:{s.step}")
                for name, run in self.runs.items() for s in run.snapshots]

    def get(self, name: str) -> Timeline:
        if name not in self.runs:
            known = ", ".join(self.runs) or "none: start the app with --timeline <run folder>"
            raise WeightsError(f"unknown training run {name!r}; the runs on this server: {known}")
        return self.runs[name]

    def explorer(self, key: str) -> Explorer:
        """The explorer of ``run:<name>:<step>``."""
        name, _, step = key.removeprefix(RUN_PREFIX).rpartition(":")
        run = self.get(name)
        steps = [s.step for s in run.snapshots]
        if not step.isdigit() or int(step) not in steps:
            raise WeightsError(f"run {name} has no snapshot at step {step}; it has steps {steps}")
        return run.explorer(steps.index(int(step)))

    def history(self, name: str, progress: Callable[[float], None] | None = None) -> History | None:
        """The run's block history over its data's shipped evaluation set, or ``None`` when none ships."""
        run = self.get(name)
        evalset = evalset_for(run.card)
        if evalset is None:
            return None
        data = load_evalset(evalset)
        return run.history(data.images, data=evalset, progress=progress)


@dataclass
class TimelineView:
    """What the timeline tab shows for one snapshot."""

    predictions: dict[str, float]
    residual: Image.Image
    readout: Image.Image | None
    history: Image.Image | None
    text: str
    steps: list[int]
    index: int


def timeline_text(run: Timeline, index: int, history: History | None) -> str:
    snap = run.snapshots[index]
    command = run.card.training.get("command", "")
    lines = [f"**{run.name}**, snapshot {index + 1} of {len(run)}: {snap.label}."]
    if history is not None:
        lines.append(f"Chart below: each block's median over {history.n} images of `{history.data}` at every "
                     "snapshot (the dashed line is this one).")
    else:
        lines.append("No evaluation set ships for this run's classes, so the over-the-run chart is not drawn.")
    if command:
        lines.append(f"Trained with `{command}`.")
    return "  \n".join(lines)


def timeline_chart(history: History, current: int | None = None) -> Image.Image:
    """Median ratio (left) and cosine (right) of every block against the training step, log-scaled.

    One line per block, coloured by stage and lighter for earlier blocks of a stage; ``current`` (a step)
    is marked with a dashed line. Test accuracy of each snapshot is written along the top.
    """
    from matplotlib.figure import Figure

    steps = np.asarray(history.steps, dtype=float)
    fig = Figure(figsize=(9.6, 3.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, values, label in ((axes[0], history.ratio, "median ‖F(x)‖/‖s(x)‖"),
                              (axes[1], history.cosine, "median cosine(F(x), s(x))")):
        for j, name in enumerate(history.blocks):
            stage = history.stages[j]
            same = [i for i, s in enumerate(history.stages) if s == stage]
            shade = 0.45 + 0.55 * (same.index(j) + 1) / len(same)
            ax.plot(steps, values[:, j], marker="o", ms=3, lw=1.4, alpha=shade,
                    color=STAGE_COLOURS[(stage - 1) % len(STAGE_COLOURS)], label=name)
        if current is not None:
            ax.axvline(current, color="k", lw=1, ls="--")
        if len(steps) > 1 and steps.min() > 0:
            ax.set_xscale("log")
        ax.set_xlabel("training step (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(0, color="k", lw=0.5, ls=":")
    axes[1].legend(fontsize=7, ncol=3, frameon=False, loc="best")
    acc = ", ".join(f"{s:,}: {a:.1%}" for s, a in zip(history.steps, history.accuracy) if a is not None)
    fig.suptitle(f"How the blocks settled over training (test accuracy at step {acc})" if acc
                 else "How the blocks settled over training", fontsize=9)
    return figure_to_image(fig)


def timeline_view(run: Timeline, index: int, source, kind: str, k: int, history: History | None) -> TimelineView:
    """The session's image through snapshot ``index`` of ``run``."""
    if not 0 <= index < len(run):
        raise ValueError(f"snapshot {index + 1} does not exist: {run.name} has {len(run)}")
    explorer = run.explorer(index)
    analysis = explorer.analyze(source, kind=kind, k=k)
    step = run.snapshots[index].step
    title = f"How much each block changes its input at step {step:,}"
    try:
        readout = readout_chart(explorer.readout(analysis), title=f"Readout at step {step:,}")
    except ValueError:  # a head that reads no block's width
        readout = None
    return TimelineView(
        {p.label: p.prob for p in analysis.predictions},
        residual_chart(analysis.metrics, title=title),
        readout,
        timeline_chart(history, step) if history is not None else None,
        timeline_text(run, index, history),
        [s.step for s in run.snapshots],
        index,
    )
