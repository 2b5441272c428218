"""Fit a linear probe on every block's pooled output and measure it beside the network's own head.

    python -m resnet_demo.training.probes --weights weights/cifar10_resnet.safetensors \\
        --data ../shared/datasets/cifar10-jpeg.tar.gz [--train-limit 10000] [--test-limit 2000]

For each block: features are the global average pool of its output ``y`` over ``--train-limit`` images
of the train split (a fixed seeded draw), on which a probe is fitted for every L2 strength of ``--l2``
(:func:`resnet_demo.core.studies.probe_fitting.fit_probe`). The strength is chosen by accuracy (ties: the stronger) on
``--val-limit`` test images, and the chosen probe measured on ``--test-limit`` other test images, beside
the head applied to the same block where the block is as wide as the head.

Why test images choose L2: a held-out part of the training data cannot. The network has fitted its
training images, so from the middle of the network on their features are separable (the shipped
CIFAR-10 model: 100% validation accuracy at res9 for every L2 from 1e-4 to 10, with 2,000 training
images held out), while unseen images' are not. ``--val-limit 0`` holds out ``--val-share`` of the
training images instead, then fits again on all of them.

Data-parallel under ``torchrun`` (``torchrun --nproc-per-node 2 -m resnet_demo.training.probes ...``):
each process computes the features of its shard of the images, in the batches one process would run,
and they are gathered back into data order, so the probes are exactly one process's; rank 0 fits them.

Rank 0 writes the probes to ``weights/<name>.probes.safetensors`` and the figures to the card's
``studies["probes"]``; the weights file, and so its sha256, is untouched.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.capture import find_blocks
from ..core.insight import head_width
from ..core.probes import Probe, ProbeSet, probes_path, save_probes
from ..core.studies.distributed import Dist
from ..core.studies.probe_fitting import BlockFeatures, block_features, fit_probe
from ..core.weights.cards import ModelCard, WeightsError, write_card_field
from ..core.weights.files import file_sha256
from ..core.weights.load import load_model
from .data import DataError, ImageSet, Normalise, load_data, subset
from .jobs import add_job_options, decoded_once, launch_command, model_input, require_card, same_classes, start_job

__all__ = ["L2_GRID", "fit_block", "main", "probe_study", "split_off"]

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # on mean cross-entropy of standardised features
DEFAULT_BATCH = 100
MODULE = "resnet_demo.training.probes"


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())


def fit_block(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None, grid: Sequence[float] = L2_GRID, val_share: float = 0.2,
    seed: int = 0,
) -> tuple[Probe, float, dict[str, float]]:
    """One block's probe, its L2 chosen by accuracy on ``val`` (features, labels of other images); without
    ``val``, on a held-out ``val_share`` of the training features, then fitted again on all of them.
    Ties go to the stronger L2.

    Returns:
        (probe, chosen l2, validation accuracy per l2 as ``{"1e-03": acc, ...}``).
    """
    if val is None:
        n = len(labels)
        n_val = max(1, round(n * val_share)) if n > 1 else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        held, fit = order[:n_val], order[n_val:]
        if n_val == 0 or len(fit) == 0:
            raise ValueError(f"{n} training images are too few to hold {val_share:.0%} of them out for choosing L2")
        _, best, scores = fit_block(features[fit], labels[fit], num_classes, val=(features[held], labels[held]),
                                    grid=grid)
        return fit_probe(features, labels, num_classes, best), best, scores
    probes, scores = {}, {}
    for l2 in grid:
        probes[l2] = fit_probe(features, labels, num_classes, l2)
        scores[l2] = _accuracy(probes[l2].logits(val[0]), val[1])
    best = max(grid, key=lambda l2: (scores[l2], l2))
    return probes[best], best, {f"{k:.0e}": v for k, v in scores.items()}


def probe_study(
    model: nn.Module, card: ModelCard, train: ImageSet, test: ImageSet, normalise: Normalise, *,
    val: ImageSet | None = None, dist: Dist | None = None, batch_size: int = DEFAULT_BATCH,
    grid: Sequence[float] = L2_GRID, val_share: float = 0.2, seed: int = 0, log=print,
) -> tuple[ProbeSet, dict] | None:
    """Probes for every block of ``model`` and the study's figures (the card's ``studies["probes"]``).

    L2 is chosen on ``val`` (images other than ``train`` and ``test``), or without it on a held-out
    ``val_share`` of ``train``. Under ``dist`` every process computes the features of its shard; rank 0
    fits the probes and returns them, the other processes return ``None``.
    """
    dist = dist or Dist()
    k = len(card.classes)
    t0 = time.perf_counter()

    def features(images: ImageSet, what: str, **kw) -> BlockFeatures:
        log(f"features of {len(images.labels)} {what} ...")
        return block_features(model, images.images, normalise=normalise, dist=dist, batch_size=batch_size, **kw)

    feats_train = features(train, "training images")
    feats_val = features(val, "validation images (for choosing L2)") if val is not None else None
    feats_test = features(test, "test images", with_head=True)
    t_features = time.perf_counter() - t0
    if not dist.main:
        return None
    probes, rows = {}, []
    for spec in find_blocks(model):
        name = spec.name
        held = (feats_val.pooled[name], val.labels) if feats_val is not None else None
        probe, l2, scores = fit_block(feats_train.pooled[name], train.labels, k, val=held, grid=grid,
                                      val_share=val_share, seed=seed)
        probes[name] = probe
        rows.append(_row(name, spec.stage, probe, l2, scores, feats_train, feats_test, train.labels, test.labels))
        log(f"  {name}: probe {rows[-1]['probe_acc']:.4f} (L2 {l2:g})")
    chosen_on = (f"{len(val.labels)} test images other than the measured ones" if val is not None
                 else f"a held-out {val_share:.0%} of the training images, then refitted on all of them")
    study = {
        "blocks": rows,
        "model_acc": _accuracy(feats_test.logits, test.labels),
        "num_classes": k,
        "head_width": head_width(model),
        "features": "global average pool of each block's output y, standardised with the training images' mean/std",
        "fit": "multinomial logistic regression, full-batch L-BFGS (strong Wolfe) from zero in float64 on one "
               f"thread; L2 from {list(grid)} chosen by accuracy on {chosen_on}",
        "train": {"split": "train", "n": len(train.labels), "seed": seed},
        "val": ({"split": "test", "n": len(val.labels), "disjoint_from_test": True} if val is not None
                else {"split": "train", "share": val_share}),
        "test": {"split": "test", "n": len(test.labels), "seed": seed},
        "seconds": {"features": round(t_features, 1), "total": round(time.perf_counter() - t0, 1)},
        "processes": dist.world,
    }
    return ProbeSet(probes, list(card.classes), card.weights_sha256, card.name), study


def _row(name: str, stage: int, probe: Probe, l2: float, scores: dict, train: BlockFeatures, test: BlockFeatures,
         train_labels: torch.Tensor, test_labels: torch.Tensor) -> dict:
    head = test.head.get(name)
    return {
        "name": name,
        "stage": stage,
        "width": probe.width,
        "probe_acc": _accuracy(probe.logits(test.pooled[name]), test_labels),
        "head_acc": None if head is None else _accuracy(head, test_labels),
        "train_acc": _accuracy(probe.logits(train.pooled[name]), train_labels),
        "l2": l2,
        "val_acc": scores,
    }


# --- command line ----------------------------------------------------------------------------------


def _load(args, dist: Dist) -> tuple[nn.Module, ModelCard, ImageSet, ImageSet, ImageSet | None]:
    """The model on ``dist.device`` and its card, and the drawn train, test and validation images. Rank 0
    decodes the data first and the other processes read its cache, so a data set is decoded once."""
    weights = Path(args.weights)
    require_card(weights, "the probe figures are stored in the card")
    model, card = load_model(weights)
    sets = decoded_once(dist, lambda: [load_data(args.data, split, size=card.input_size, cache_dir=args.cache_dir)
                                       for split in ("train", "test")])
    for data in sets:
        same_classes(data, card, args.data)
    train = subset(sets[0], args.train_limit, seed=args.seed)
    test, val = split_off(sets[1], args.test_limit, args.val_limit, seed=args.seed)
    return model.to(dist.device).eval(), card, train, test, val


def split_off(data: ImageSet, n_test: int, n_val: int, seed: int = 0) -> tuple[ImageSet, ImageSet | None]:
    """``n_test`` images by a seeded draw (as :func:`~.data.subset` draws them), and ``n_val`` of the
    others by another (``None`` when ``n_val`` is 0).

    Raises:
        DataError: no images are left for validation.
    """
    test = subset(data, n_test, seed=seed)
    if n_val <= 0:
        return test, None
    index = torch.arange(len(data.labels))
    drawn = subset(ImageSet(index, index, data.classes), n_test, seed=seed).labels
    rest = torch.ones(len(index), dtype=torch.bool)
    rest[drawn] = False
    if not rest.any():
        raise DataError(f"the test split has {len(index)} images, all measured: none are left for choosing L2 "
                        "(lower --test-limit, or --val-limit 0 to hold out training images)")
    others = ImageSet(data.images[rest], data.labels[rest], data.classes)
    return test, subset(others, n_val, seed=seed)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m resnet_demo.training.probes", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="weights/<name>.safetensors (its card <name>.json beside it)")
    p.add_argument("--data", required=True,
                   help="ImageFolder dir or .tar.gz with train and test splits, or torchvision:<name>")
    p.add_argument("--train-limit", type=int, default=10000, help="training images to fit on (default 10000)")
    p.add_argument("--test-limit", type=int, default=2000, help="test images to measure on (default 2000)")
    p.add_argument("--val-limit", type=int, default=2000,
                   help="test images (not among the measured ones) for choosing L2 (default 2000; 0: --val-share)")
    p.add_argument("--val-share", type=float, default=0.2,
                   help="with --val-limit 0: share of the training images held out for choosing L2")
    p.add_argument("--l2", type=float, nargs="+", default=list(L2_GRID), help=f"L2 strengths to try {L2_GRID}")
    p.add_argument("--seed", type=int, default=0, help="seed of the image draws and the hold-out split")
    add_job_options(p, DEFAULT_BATCH)
    args = p.parse_args(argv)
    if not 0 < args.val_share < 1:
        p.exit(2, f"error: --val-share must lie between 0 and 1, got {args.val_share}\n")
    with start_job(p, args) as dist:
        try:
            model, card, train, test, val = _load(args, dist)
            normalise = model_input(model, card, dist.device)
            result = probe_study(model, card, train, test, normalise, val=val, dist=dist, batch_size=args.batch_size,
                                 grid=args.l2, val_share=args.val_share, seed=args.seed,
                                 log=print if dist.main else lambda *a: None)
        except (WeightsError, DataError, ValueError) as exc:
            p.exit(2, f"error: {exc}\n")
        if result is None:  # not rank 0: its share is done
            return {}
        probes, study = result
        weights = Path(args.weights)
        out = save_probes(probes, probes_path(weights))
        study.update(data=args.data if ":" in args.data else Path(args.data).name, device=str(dist.device),
                     file=out.name, file_sha256=file_sha256(out), command=launch_command(MODULE, argv))
        write_card_field(weights.with_suffix(".json"), "probes", study, study=True)
        _print(card, study, out, weights.with_suffix(".json"))
    return study


def _print(card: ModelCard, study: dict, out: Path, card_path: Path) -> None:
    print(f"{card.name}: linear probes on {study['train']['n']} training images of {study['data']}, "
          f"measured on {study['test']['n']} test images ({study['device']}, {study['seconds']['total']} s)")
    print(f"{'block':<8}{'width':>6}{'probe':>8}{'head':>8}{'train':>8}{'L2':>8}")
    for r in study["blocks"]:
        head = "—" if r["head_acc"] is None else f"{r['head_acc']:.4f}"
        print(f"{r['name']:<8}{r['width']:>6}{r['probe_acc']:>8.4f}{head:>8}{r['train_acc']:>8.4f}{r['l2']:>8g}")
    print(f"the network itself: {study['model_acc']:.4f}")
    print(f"probes written to {out} ({out.stat().st_size:,} bytes); figures in {card_path} studies['probes'] "
          "(the weights file is unchanged)")


if __name__ == "__main__":
    main(sys.argv[1:])
