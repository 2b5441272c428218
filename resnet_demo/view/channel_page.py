"""What one channel responds to, for the page: its map on the current image, the evaluation images that
excite it most (and, for F(x), least), and an image optimised to excite it (F(x) and y side by side).

Exemplars come from the file stored beside a shipped model's weights (``weights/<name>.exemplars.npz``),
or from one scan of the shipped evaluation set for any other model of those classes, cached per model.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from ..core.errors import DataError
from ..core.explorer import Analysis, Explorer
from ..core.studies.evalsets import load_evalset
from ..core.studies.exemplars import exemplars_for
from ..core.studies.featurevis import visualise_channel
from .channel_view import channel_map, exemplar_grid, featurevis_panel, part_name

__all__ = ["ChannelView", "channel_view", "visualisation"]


@dataclass
class ChannelView:
    block: str
    part: str
    channel: int
    on_image: Image.Image
    exemplars: Image.Image | None
    text: str


def _check(analysis: Analysis, block: str, part: str, channel: int) -> int:
    part_name(part)  # refuses an unknown part
    record = next((r for r in analysis.blocks if r.name == block), None)
    if record is None:
        raise KeyError(f"unknown block {block!r}; this model's blocks are {[r.name for r in analysis.blocks]}")
    width = getattr(record, part).shape[1]
    if not 0 <= channel < width:
        raise ValueError(f"{block} {part_name(part)} has channels 0 to {width - 1}, not {channel}")
    return width


def channel_view(explorer: Explorer, analysis: Analysis, block: str, part: str, channel: int,
                 progress: Callable[[float], None] | None = None) -> ChannelView:
    """Channel ``channel`` of ``part`` of ``block``: on the image of ``analysis`` and in the evaluation set."""
    width = _check(analysis, block, part, channel)
    on_image = channel_map(analysis, block, part, channel, explorer.card)
    name = f"{block} {part_name(part)}, channel {channel} of {width}"
    try:
        ex = exemplars_for(explorer, progress=progress).channel(block, part, channel)
    except DataError as exc:
        return ChannelView(block, part, channel, on_image, None, f"**{name}**. No exemplars: {exc}.")
    grid = exemplar_grid(ex, load_evalset(ex.evalset))
    top = ex.top[0]
    text = (f"**{name}**. Over the {ex.evalset} images its mean is {ex.mean:+.3f}; it responds most to image "
            f"#{top.index} ({top.value:.3f}). Crops are centred on where the channel peaks.")
    if ex.bottom:
        text += (f" The branch both adds and removes: its lowest image, #{ex.bottom[0].index}, "
                 f"gives {ex.bottom[0].value:.3f}.")
    return ChannelView(block, part, channel, on_image, grid, text)


def visualisation(explorer: Explorer, analysis: Analysis, block: str, part: str, channel: int,
                  seed: int = 0) -> tuple[Image.Image, str]:
    """Images optimised to excite the channel: of F(x) and of y side by side (x alone when ``part`` is x)."""
    _check(analysis, block, part, channel)
    parts = ["x"] if part == "x" else ["f", "y"]
    # F(x) and y side by side: two independent optimisations, run at once (torch releases the GIL), so the pair
    # takes about as long as one on a machine with two free cores.
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        items = list(pool.map(lambda v: visualise_channel(explorer, block, v, channel, seed=seed), parts))
    seconds = max(i.seconds for i in items)
    text = "; ".join(f"{part_name(i.part)} reaches {i.activation:.2f} (from {i.start_activation:.2f} on its "
                     "starting noise)" for i in items)
    return featurevis_panel(items), f"Optimised in {seconds:.1f} s: {text}."
