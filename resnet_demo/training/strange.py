"""Measure how well the strange-input score tells a model's test images from other data, and set its threshold.

    python -m resnet_demo.training.strange --weights weights/cifar10_resnet.safetensors \\
        --data ../shared/datasets/cifar10-jpeg.tar.gz [--other ../shared/datasets/mnist-png.tar.gz]

In-distribution: ``--limit`` test images of ``--data``, drawn from those the card's reference bands were
*not* computed on (the bands command's seeded draw is repeated to leave them out), in the training
format. Other data, each fed as the app feeds an uploaded photo (:func:`resnet_demo.core.preprocess.prepare`,
kind ``photo``: grey replicated to RGB for a colour model, RGB to grey for a grey one):

- ``other``: ``--other-limit`` test images of another data set (by default the sibling archive:
  MNIST digits for a CIFAR-10 model, CIFAR-10 photos for an MNIST model), at the model's input size;
- ``uniform_noise`` and ``gaussian_noise`` (mean 127.5, sd 64, clipped): ``--noise`` images each;
- ``blank``: flat images from black through greys to white.

For every score of :data:`resnet_demo.core.studies.strangeness.SCORES` it reports the AUROC (test images negative,
other data positive) and stores the figures in the card's ``studies["strangeness"]`` with the page's
threshold: the 95th percentile of the test images' :data:`~resnet_demo.core.studies.strangeness.SCORE`, so that one
test image in twenty is warned about. Only the card is rewritten; the weights are untouched.

Data-parallel under ``torchrun`` (``torchrun --nproc-per-node 2 -m resnet_demo.training.strange ...``): each
process scores its shard of every set, in the batches one process would run, and the scores are gathered
back into data order, so the figures are exactly one process's. Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..core.capture import capture_forward
from ..core.metrics import block_metrics
from ..core.preprocess import prepare
from ..core.studies.distributed import Dist
from ..core.studies.strangeness import SCORE, SCORES, auroc, candidate_scores, trained_on
from ..core.weights.cards import CIFAR10, MNIST, ModelCard, WeightsError, write_card_field
from ..core.weights.load import load_model
from .data import DataError, ImageSet, Normalise, load_data, subset
from .jobs import add_job_options, decoded_once, launch_command, require_card, same_classes, start_job

__all__ = ["BLANK_LEVELS", "app_inputs", "held_out", "main", "noise_images", "scores_of", "strangeness_study"]

BLANK_LEVELS = (0, 32, 64, 96, 128, 160, 192, 224, 255)  # black, greys, white
NOISE_MEAN, NOISE_SD = 127.5, 64.0  # Gaussian noise in grey levels, clipped to 0..255
WARN_PERCENTILE = 95  # the threshold: this percentile of the test images' score
DEFAULT_BATCH = 100
MODULE = "resnet_demo.training.strange"
# the data set a shipped kind of model is tested against, found beside its own archive
OTHER_ARCHIVE = {tuple(CIFAR10.classes): "mnist-png.tar.gz", tuple(MNIST.classes): "cifar10-jpeg.tar.gz"}
SCORE_WORDS = {
    "band_rms": "root mean square of each block's robust z-score of ratio and cosine in the reference bands",
    "band_excess": "mean distance beyond the 5-95 reference bands, in band widths",
    "band_max": "largest |robust z-score| of any block's ratio or cosine",
    "outside": "number of blocks whose ratio or cosine is outside its 5-95 band",
    "msp": "1 - the largest softmax probability",
    "energy": "-logsumexp(logits)",
}


def held_out(test: ImageSet, card: ModelCard, data_name: str) -> tuple[ImageSet, bool]:
    """The test images the card's reference bands were not computed on (the bands command's draw
    repeated), or all of them when the bands came from elsewhere or used them all; and whether any were left out."""
    bands = card.reference_bands or {}
    n = int(bands.get("n", 0))
    same = bands.get("split") == "test" and bands.get("data") == data_name
    if not same or not 0 < n < len(test.labels):
        return test, False
    index = torch.arange(len(test.labels))
    used = subset(ImageSet(index, index, test.classes), n).labels  # the same seeded draw as the bands'
    keep = torch.ones(len(test.labels), dtype=torch.bool)
    keep[used] = False
    return ImageSet(test.images[keep], test.labels[keep], test.classes), True


def noise_images(kind: str, n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 noise images (N, channels, size, size): ``uniform`` in 0..255 or ``gaussian``."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, channels, size, size)
    if kind == "uniform":
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if kind == "gaussian":
        return (torch.randn(shape, generator=g) * NOISE_SD + NOISE_MEAN).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"unknown noise {kind!r}: uniform or gaussian")


def blank_images(channels: int, size: int) -> torch.Tensor:
    """One flat image per level of :data:`BLANK_LEVELS`: (N, channels, size, size) uint8."""
    levels = torch.tensor(BLANK_LEVELS, dtype=torch.uint8).view(-1, 1, 1, 1)
    return levels.expand(-1, channels, size, size).contiguous()


def app_inputs(images: torch.Tensor, card: ModelCard, channels: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) through the app's photo preprocessing, one by one: (N, channels, S, S)."""
    out = []
    for img in images:
        arr = img.permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        out.append(prepare(pil, card, kind="photo", channels=channels).tensor)
    return torch.cat(out)


def scores_of(
    model: nn.Module, inputs: torch.Tensor, bands: dict, *, dist: Dist | None = None, batch_size: int = DEFAULT_BATCH
) -> dict[str, np.ndarray]:
    """Every candidate score of every image of ``inputs`` (prepared model input): ``{score: (N,) array}``.

    Under ``dist`` each process scores its shard, in the batches one process would run, and every process
    gets all the scores, in data order.
    """
    dist = dist or Dist()
    device = next(model.parameters()).device
    index = dist.shard(len(inputs), block=batch_size)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(index), batch_size):
            x = inputs[index[start : start + batch_size]].to(device).contiguous()  # layout decides the last bits
            logits, records = capture_forward(model, x)
            for i, per_image in enumerate(block_metrics(records)):
                scores = candidate_scores(per_image, logits[i], bands)
                rows.append([scores[s] for s in SCORES])
    table = dist.gather(torch.tensor(rows, dtype=torch.float64).reshape(len(index), len(SCORES)), index)
    return {s: table[:, j].numpy() for j, s in enumerate(SCORES)}


def strangeness_study(
    model: nn.Module, card: ModelCard, test_inputs: torch.Tensor, others: dict[str, tuple[str, torch.Tensor]],
    *, dist: Dist | None = None, batch_size: int = DEFAULT_BATCH, log=print,
) -> dict:
    """AUROC of every score between ``test_inputs`` and each of ``others`` (name -> (description, inputs)),
    all prepared model inputs; the threshold; the figures of the card's ``studies["strangeness"]``.
    Every process of ``dist`` gets the same figures."""
    bands = card.reference_bands
    log(f"scores of {len(test_inputs)} test images ...")
    test = scores_of(model, test_inputs, bands, dist=dist, batch_size=batch_size)
    threshold = float(np.percentile(test[SCORE], WARN_PERCENTILE))
    sets = {}
    for name, (words, x) in others.items():
        log(f"scores of {len(x)} images: {name} ...")
        other = scores_of(model, x, bands, dist=dist, batch_size=batch_size)
        sets[name] = {
            "description": words,
            "n": len(x),
            "auroc": {s: auroc(test[s], other[s]) for s in SCORES},
            "warned": float((other[SCORE] > threshold).mean()),
            "median_score": float(np.median(other[SCORE])),
            "median_outside": float(np.median(other["outside"])),
        }
        if name == "blank":
            sets[name]["per_level"] = {str(v): float(s) for v, s in zip(BLANK_LEVELS, other[SCORE])}
    return {
        "score": SCORE,
        "scores": SCORE_WORDS,
        "threshold": threshold,
        "threshold_rule": f"{WARN_PERCENTILE}th percentile of the held-out test images' {SCORE}",
        "trained_on": trained_on(card),
        "test": {
            "n": len(test_inputs),
            "warned": float((test[SCORE] > threshold).mean()),
            "median_score": float(np.median(test[SCORE])),
            "median_outside": float(np.median(test["outside"])),
            "p95_outside": float(np.percentile(test["outside"], 95)),
        },
        "sets": sets,
    }


# --- command line ----------------------------------------------------------------------------------


def _default_other(card: ModelCard, data: str) -> str | None:
    name = OTHER_ARCHIVE.get(tuple(card.classes))
    if name is None or ":" in data:
        return None
    path = Path(data).parent / name
    return str(path) if path.exists() else None


def _others(args, card: ModelCard, channels: int, dist: Dist) -> dict[str, tuple[str, torch.Tensor]]:
    size, mode = card.input_size, ("grey" if card.colour_mode == "gray" else "RGB")
    colour = 1 if card.colour_mode == "gray" else 3
    others = {}
    if args.other:
        data = decoded_once(dist, lambda: load_data(args.other, "test", size=size, cache_dir=args.cache_dir))
        data = subset(data, args.other_limit, seed=args.seed)
        others["other"] = (f"{_name(args.other)}, test split, {size}×{size}, fed as photos ({mode})",
                           app_inputs(data.images, card, channels))
    for kind in ("uniform", "gaussian"):
        words = "uniform in 0..255" if kind == "uniform" else f"Gaussian, mean {NOISE_MEAN}, sd {NOISE_SD:g}, clipped"
        images = noise_images(kind, args.noise, colour, size, seed=args.seed)
        others[f"{kind}_noise"] = (f"{mode} noise, {words}", app_inputs(images, card, channels))
    others["blank"] = (f"flat images at the grey levels {list(BLANK_LEVELS)} (black to white)",
                       app_inputs(blank_images(colour, size), card, channels))
    return others


def _load(args, dist: Dist) -> tuple[nn.Module, ModelCard, torch.Tensor, dict, bool]:
    """The model on ``dist.device``, its card, the prepared test images, the other data, and whether
    test images were left out because the bands used them."""
    weights = Path(args.weights)
    require_card(weights, "the figures are stored there")
    model, card = load_model(weights)
    if not card.reference_bands:
        raise WeightsError(f"the card of {weights} has no reference bands: "
                           "run python -m resnet_demo.training.bands first")
    test = decoded_once(dist, lambda: load_data(args.data, "test", size=card.input_size, cache_dir=args.cache_dir))
    same_classes(test, card, args.data)
    test, left_out = held_out(test, card, _name(args.data))
    test = subset(test, args.limit, seed=args.seed)
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    test_inputs = Normalise(card.mean, card.std, channels, "cpu", channels_last=False)(test.images)
    args.other = args.other or _default_other(card, args.data)
    return model.to(dist.device).eval(), card, test_inputs, _others(args, card, channels, dist), left_out


def _name(spec: str) -> str:
    return spec if ":" in spec else Path(spec).name


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m resnet_demo.training.strange", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="weights/<name>.safetensors (its card <name>.json beside it)")
    p.add_argument("--data", required=True, help="the model's own data set (its test split is used)")
    p.add_argument("--other", default=None, help="another data set (test split); default: the sibling archive")
    p.add_argument("--limit", type=int, default=2000, help="test images (default 2000)")
    p.add_argument("--other-limit", type=int, default=2000, help="images of the other data set (default 2000)")
    p.add_argument("--noise", type=int, default=500, help="images of each kind of noise (default 500)")
    p.add_argument("--seed", type=int, default=0)
    add_job_options(p, DEFAULT_BATCH)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    with start_job(p, args) as dist:
        try:
            model, card, test_inputs, others, left_out = _load(args, dist)
        except (WeightsError, DataError, ValueError) as exc:
            p.exit(2, f"error: {exc}\n")
        study = strangeness_study(model, card, test_inputs, others, dist=dist, batch_size=args.batch_size,
                                  log=print if dist.main else lambda *a: None)
        if not dist.main:
            return study
        study["test"].update(data=_name(args.data), split="test", held_out_from_bands=left_out)
        study.update(device=str(dist.device), processes=dist.world, seconds=round(time.perf_counter() - t0, 1),
                     command=launch_command(MODULE, argv))
        card_path = Path(args.weights).with_suffix(".json")
        write_card_field(card_path, "strangeness", study, study=True)
        _print(card, study, card_path)
    return study


def _print(card: ModelCard, study: dict, card_path: Path) -> None:
    t = study["test"]
    print(f"{card.name}: {t['n']} test images of {t['data']}"
          f"{' not used for the bands' if t['held_out_from_bands'] else ''} against other data "
          f"({study['device']}, {study['processes']} process(es), {study['seconds']} s)")
    print(f"{'set':<16}{'n':>6}" + "".join(f"{s:>12}" for s in SCORES) + f"{'warned':>9}")
    for name, s in study["sets"].items():
        print(f"{name:<16}{s['n']:>6}" + "".join(f"{s['auroc'][k]:>12.4f}" for k in SCORES) + f"{s['warned']:>9.1%}")
    print(f"threshold ({study['threshold_rule']}): {study['threshold']:.3f}; test images warned: {t['warned']:.1%}; "
          f"blocks outside their band on a test image: median {t['median_outside']:g}, 95th percentile "
          f"{t['p95_outside']:g}")
    print(f"written to {card_path} studies['strangeness'] (the weights file is unchanged)")


if __name__ == "__main__":
    main(sys.argv[1:])
