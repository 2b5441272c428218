"""How much memory a study over a data set may hold at once, and how many images it may take per pass.

A study runs its images in batches; what it holds at the peak of a batch is estimated from the shapes of
the model's blocks (one forward pass of one image, :func:`~resnet_demo.core.capture.block_shapes`) times
the batch size times the bytes per element:

- the forward pass's working set: :data:`WORKING_SET` times the largest tensor any module outputs for
  one image (in torchvision's ResNet-18 that is the stem's convolution, four times any block's output);
- what the study keeps of every block for the whole batch (``kept``: block inputs, outputs, branches,
  shortcuts; each :data:`~resnet_demo.core.capture.PARTS` part it keeps unreduced);
- for a study that takes gradients, the activations autograd saves: :data:`SAVED_FOR_GRAD` times every
  block's input and output;
- a fixed amount per batch (Gram matrices, logits), and :data:`OVERHEAD` per study.

Every study plans its batch with :func:`plan`: the largest batch up to the one asked for whose estimate
fits the server's budget (:data:`BUDGET`, bytes; ``RESNET_DEMO_STUDY_MIB`` sets it in MiB). A study that
does not fit even at its smallest batch is refused before it starts, with a sentence
(:class:`StudyTooLarge`). The budget is server-wide: a running study holds its estimate
(:func:`budgeted`); a study started beside others gets the room they leave (a smaller batch) and is
refused with a sentence, rather than started, when even its smallest batch does not fit there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import activation_sizes

__all__ = [
    "BUDGET", "OVERHEAD", "SAVED_FOR_GRAD", "WORKING_SET", "Footprint", "StudyTooLarge", "budgeted", "footprint",
    "held", "plan",
]

BUDGET = int(float(os.environ.get("RESNET_DEMO_STUDY_MIB", 4096)) * 2**20)  # bytes all studies may hold at once
WORKING_SET = 4  # largest tensors alive at once in a forward pass: a bottleneck's last BN output beside its
# projection shortcut's conv and BN outputs, and the block input (measured: ResNet-50, 100 images, 1,177 MiB)
SAVED_FOR_GRAD = 4  # tensors autograd saves per block, in units of the block's input plus output
OVERHEAD = 128 * 2**20  # bytes a study costs whatever its batch: allocator arenas, thread pools, the first pass's
# kernel workspaces (measured: ~100 MiB above idle for a study of 8 images)


class StudyTooLarge(ValueError):
    """A study whose estimated memory does not fit the server's budget; the message says what and by how much."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class Footprint:
    """A study's estimated memory: ``per_image`` bytes per image of a batch, plus ``fixed`` bytes per batch."""

    per_image: int
    fixed: int = 0

    def at(self, batch: int) -> int:
        """Estimated peak bytes for a batch of ``batch`` images."""
        return self.per_image * batch + self.fixed

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(self.per_image + other.per_image, self.fixed + other.fixed)


_SIZES = {"x": 0, "f": 1, "s": 1, "y": 1}  # which shape each part has: the block's input, or its output


def footprint(
    model: nn.Module,
    sample: torch.Tensor,
    *,
    kept: Iterable[str] = (),
    grad: bool = False,
    fixed: int = 0,
    working: int = WORKING_SET,
) -> Footprint:
    """The estimated memory of passes of ``model`` over inputs like ``sample`` (one prepared input, (1, C, H, W),
    on the model's device), keeping ``kept`` parts of every block unreduced, with gradients when ``grad``;
    ``working``: the largest tensors alive at once in a pass (:data:`WORKING_SET` for a plain one)."""
    shapes, largest = activation_sizes(model, sample[:1])
    per_block = [(torch.Size(x).numel(), torch.Size(y).numel()) for x, y in shapes.values()]
    element = next(iter(model.parameters()), sample).element_size()
    elements = working * largest + sum(pair[_SIZES[p]] for p in kept for pair in per_block)
    if grad:
        elements += SAVED_FOR_GRAD * sum(x + y for x, y in per_block)
    return Footprint(elements * element, OVERHEAD + fixed)


_lock = threading.Lock()
_held = 0  # bytes the studies running now hold, by their estimates


def _fits(footprint: Footprint, room: int) -> int:
    return (room - footprint.fixed) // max(footprint.per_image, 1)


def plan(footprint: Footprint, batch: int, *, what: str, smallest: int = 1, budget: int | None = None) -> int:
    """The batch size to run: ``batch``, or fewer images when that is what fits ``budget`` (:data:`BUDGET`).

    Raises:
        StudyTooLarge: even ``smallest`` images at once would not fit; the message names the study (``what``).
    """
    budget = BUDGET if budget is None else budget
    if _fits(footprint, budget) < smallest:
        raise StudyTooLarge(
            f"{what} would need about {_gib(footprint.at(smallest))} of memory at once "
            f"({smallest} image{'s' if smallest > 1 else ''} per pass), more than this server allows a study "
            f"({_gib(budget)}); it was not started."
        )
    return int(max(smallest, min(batch, _fits(footprint, budget))))


@contextmanager
def budgeted(
    footprint: Footprint, batch: int, *, what: str, smallest: int = 1, budget: int | None = None
) -> Iterator[int]:
    """Run a study within the server's budget: yields its batch size (as :func:`plan`, in the room the studies
    running now leave) and holds that batch's estimate until the study ends.

    Raises:
        StudyTooLarge: the study does not fit the budget at all, or not beside the studies running now.
    """
    global _held
    budget = BUDGET if budget is None else budget
    size = plan(footprint, batch, what=what, smallest=smallest, budget=budget)
    with _lock:
        room = budget - _held
        if _fits(footprint, room) < smallest:
            raise StudyTooLarge(
                f"{what} would need about {_gib(footprint.at(smallest))} of memory at once, and other studies "
                f"running on this server hold {_gib(_held)} of the {_gib(budget)} it allows them; it was not "
                "started: try again when they are done."
            )
        size = int(max(smallest, min(size, _fits(footprint, room))))
        nbytes = footprint.at(size)
        _held += nbytes
    try:
        yield size
    finally:
        with _lock:
            _held -= nbytes


def held() -> int:
    """Bytes the studies running now hold by their estimates."""
    return _held
