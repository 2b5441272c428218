"""The insight tools' results in words and pictures: a lesion, the lesion sweep, the readout, Grad-CAM.

The numbers come from the core (:mod:`resnet_demo.core.insight`, through the Explorer); the charts
themselves are drawn in :mod:`.render`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..core.explorer import Analysis
from ..core.insight import LesionResult, Readout
from .render import input_image, overlay

__all__ = ["CAM_SIZE", "SWEEP_COLUMNS", "cam_image", "lesion_text", "readout_text", "sweep_rows"]

SWEEP_COLUMNS = ["lesioned block", "new top-1", "p(original top-1)", "Δp", "KL (nats)"]
CAM_SIZE = 256  # pixels of the Grad-CAM overlay


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



def cam_image(analysis: Analysis, cam: np.ndarray) -> Image.Image:
    """A Grad-CAM map over the input as the model saw it, :data:`CAM_SIZE` pixels wide."""
    return overlay(cam, input_image(analysis.input, analysis.card, size=CAM_SIZE))
