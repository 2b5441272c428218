"""How similar two networks' blocks are: linear CKA between every block of A and every block of B.

Linear centred kernel alignment (Kornblith, Norouzi, Lee and Hinton, "Similarity of neural network
representations revisited", ICML 2019) compares two representations of the same n examples, X (n, p)
and Y (n, q), through their Gram matrices K = X Xᵀ and L = Y Yᵀ:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))

It is 1 for identical representations, invariant to orthogonal transforms and to isotropic scaling
of either, and needs no correspondence between features: blocks of different widths and spatial
sizes are compared directly. Each block's output y is **flattened** per example (C·H·W features, so
where in the image a feature fires counts), and only the n×n Gram matrices are ever formed.

Over a data set the Gram matrices of all examples at once would not fit for large n, so
:func:`block_similarity` uses minibatch CKA (Nguyen, Raghu and Kornblith, "Do wide and deep networks
learn the same things?", ICLR 2021): the unbiased HSIC estimator of Song et al. (2012) averaged over
minibatches, in the ratio above. With one batch holding every example it is the unbiased CKA of the set.

**What each model sees.** The images are A's evaluation set, in A's training format: A takes them through
:meth:`~resnet_demo.core.explorer.Explorer.batch_input`. B takes each as the page prepares a photo for it
(:func:`model_input`): a grey model (MNIST's card) gets the image's luma, as the page turns a photo grey,
not its colour channels, and an image of another size is resized and cropped as a photo is.

**Memory.** The capture keeps only the blocks' outputs, and only as Gram matrices: each block's output is
reduced to its (n, n) Gram matrix the moment the block produces it (:func:`gram`, in float64, a slice of
features at a time), so a batch holds the forward pass's working set and ``blocks × n × n`` numbers, never
every block's output. The batch's estimate must fit the server's budget for a study
(:mod:`~resnet_demo.core.studies.budget`), or the study is refused before it starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..capture import capture_forward
from ..explorer import Explorer
from .budget import Footprint, budgeted, footprint

__all__ = ["Similarity", "block_similarity", "gram", "hsic_unbiased", "linear_cka", "model_input"]

GRAM_SLICE = 1 << 22  # float64 elements converted at once while forming a Gram matrix (32 MiB)


def gram(x: torch.Tensor) -> torch.Tensor:
    """The linear kernel of n examples: (n, ...) features, flattened per example -> (n, n) in float64.

    Features are converted to float64 :data:`GRAM_SLICE` elements at a time, so a wide layer never costs a
    float64 copy of the whole batch.
    """
    x = x.reshape(x.shape[0], -1)
    n, p = x.shape
    step = max(1, GRAM_SLICE // max(n, 1))
    if p <= step:
        x = x.double()
        return x @ x.T
    k = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for i in range(0, p, step):
        part = x[:, i : i + step].double()
        k.addmm_(part, part.T)
    return k


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 1, H, W) uint8 luma, ITU-R 601-2 in PIL's integer arithmetic (``convert("L")``)."""
    rgb = images.to(torch.int32)
    return ((rgb[:, 0:1] * 19595 + rgb[:, 1:2] * 38470 + rgb[:, 2:3] * 7471 + 0x8000) >> 16).to(torch.uint8)


def model_input(explorer: Explorer, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) as the page prepares each as a photo for ``explorer``'s model
    (:meth:`Explorer.prepare` with ``kind="photo"``), batched, on the model's device.

    A grey card takes the images' luma (as PIL's ``convert("L")``, which the page applies to a photo), then the
    explorer's own :meth:`~Explorer.batch_input` makes the model's channels and normalises. Images whose
    size is not the one the page would crop to (the card's ``input_size`` with ``resize`` equal to it) go
    through :meth:`Explorer.prepare` one by one: the page's resize and centre crop.
    """
    card = explorer.card
    if images.ndim != 4 or images.dtype != torch.uint8 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    size = card.input_size
    if tuple(images.shape[-2:]) != (size, size) or card.resize != size:
        arrays = images.permute(0, 2, 3, 1).numpy()
        return torch.cat([explorer.prepare(np.ascontiguousarray(a[:, :, 0] if a.shape[2] == 1 else a),
                                           kind="photo").tensor for a in arrays]).to(explorer.device)
    if card.colour_mode == "gray" and images.shape[1] == 3:
        images = _luma(images)
    return explorer.batch_input(images)


def _centre(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()  # H K H


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples (the biased HSIC, as in Kornblith et al.).

    Args:
        x: (n, ...) features of n examples; flattened per example.
        y: (n, ...) features of the same examples, any width.

    Raises:
        ValueError: different numbers of examples, or fewer than 2.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"CKA needs the same n >= 2 examples in both, got {x.shape[0]} and {y.shape[0]}")
    k, l_ = _centre(gram(x)), _centre(gram(y))
    denom = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)
    return float((k * l_).sum() / denom) if denom > 0 else 0.0


def hsic_unbiased(k: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator of Song et al. (2012) for two (n, n) Gram matrices, n >= 4."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples per batch, got {n}")
    k = k - torch.diag(torch.diagonal(k))  # the estimator works on Gram matrices with a zero diagonal
    l_ = l_ - torch.diag(torch.diagonal(l_))
    kl = k @ l_
    return (torch.trace(kl) + k.sum() * l_.sum() / ((n - 1) * (n - 2)) - 2 * kl.sum() / (n - 2)) / (n * (n - 3))


@dataclass
class Similarity:
    """CKA between every block of A (rows) and every block of B (columns) over ``n`` examples."""

    blocks_a: list[str]
    blocks_b: list[str]
    matrix: torch.Tensor  # (len(blocks_a), len(blocks_b)) float64
    n: int
    data: str  # what the examples were

    def best_match(self) -> list[tuple[str, str, float]]:
        """For each block of A, the block of B most similar to it."""
        j = self.matrix.argmax(dim=1).tolist()
        return [(a, self.blocks_b[jj], float(self.matrix[i, jj])) for i, (a, jj) in enumerate(zip(self.blocks_a, j))]


def _block_grams(explorer: Explorer, x: torch.Tensor) -> list[torch.Tensor]:
    """The Gram matrix of every block's output y for a batch of prepared inputs; nothing else is kept."""
    with torch.inference_mode():
        _, records = capture_forward(explorer.model, x, keep=("y",), reduce=gram)
        return [r.y.cpu() for r in records]


def block_similarity(
    a: Explorer,
    b: Explorer,
    images: torch.Tensor,
    *,
    batch_size: int = 100,
    data: str = "",
    progress: Callable[[float], None] | None = None,
    budget: int | None = None,
) -> Similarity:
    """Minibatch linear CKA between every block of ``a`` and every block of ``b`` over ``images``.

    Args:
        a, b: the two models. ``images`` are ``a``'s (its evaluation set): ``a`` takes them through its
            :meth:`~Explorer.batch_input`, ``b`` as the page prepares a photo for it (:func:`model_input`).
        images: (N, C, H, W) uint8, N >= 4; batches of ``batch_size`` (the last one kept only if >= 4).
        progress: called with the share of batches done, after each.
        budget: bytes the study may hold (the server's :data:`~.budget.BUDGET` by default).

    The same model against itself gives its own block structure (1 on the diagonal).

    Raises:
        ValueError: fewer than 4 images. StudyTooLarge: a batch's estimated memory exceeds the budget.
    """
    n = images.shape[0]
    starts = [s for s in range(0, n, batch_size) if min(n, s + batch_size) - s >= 4]
    if not starts:
        raise ValueError(f"CKA over a data set needs at least 4 images, got {n}")
    names_a, names_b = a.block_names, b.block_names
    size = min(n, batch_size)
    grams = 8 * size * size * (len(names_a) + len(names_b))
    passes = [footprint(a.model, a.batch_input(images[:1]))]
    if b is not a:
        passes.append(footprint(b.model, model_input(b, images[:1])))
    need = Footprint(max(f.per_image for f in passes), grams)  # one pass at a time; the Gram matrices stay
    what = f"Block similarity of {a.card.name} and {b.card.name} over {n} images"
    cross = torch.zeros(len(names_a), len(names_b), dtype=torch.float64)
    self_a, self_b = torch.zeros(len(names_a), dtype=torch.float64), torch.zeros(len(names_b), dtype=torch.float64)
    # the minibatch is part of the statistic: it is never made smaller to fit, the study is refused instead
    with budgeted(need, size, what=what, smallest=size, budget=budget):
        for i, s in enumerate(starts):
            batch = images[s : s + batch_size]
            ka = _block_grams(a, a.batch_input(batch))
            kb = ka if b is a else _block_grams(b, model_input(b, batch))
            for p, k in enumerate(ka):
                self_a[p] += hsic_unbiased(k, k)
                for q, l_ in enumerate(kb):
                    cross[p, q] += hsic_unbiased(k, l_)
            for q, l_ in enumerate(kb):
                self_b[q] += hsic_unbiased(l_, l_)
            if progress is not None:
                progress((i + 1) / len(starts))
    denom = torch.sqrt(self_a.clamp_min(0)[:, None] * self_b.clamp_min(0)[None, :])
    matrix = torch.where(denom > 0, cross / denom.clamp_min(math.ulp(0.0)), torch.zeros_like(cross))
    used = sum(min(n, s + batch_size) - s for s in starts)
    return Similarity(names_a, names_b, matrix, used, data)
