"""Fill a model card's reference bands: each block's ratio and cosine percentiles over a data set.

    python -m resnet_demo.training.bands --weights weights/cifar10_resnet.safetensors \\
        --data ../shared/datasets/cifar10-jpeg.tar.gz [--split test] [--limit N]

Data-parallel under ``torchrun`` (``torchrun --nproc-per-node 2 -m resnet_demo.training.bands ...``): each
process computes the metrics of its shard of the images, in the same batches one process would run, and
the per-image values are gathered back into data order before the percentiles are taken, so the bands
are exactly one process's. Only rank 0 writes.

Rewrites only the card (``weights/<name>.json``); the weights file, and so its sha256, is untouched. The
percentiles are :func:`resnet_demo.core.studies.bands.bands_from_values`, as in
:func:`resnet_demo.core.studies.bands.compute_bands`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.studies.bands import DEFAULT_BATCH, PERCENTILES, band_values, bands_from_values
from ..core.studies.distributed import Dist
from ..core.weights.cards import WeightsError, write_card_field
from .data import DataError
from .jobs import add_job_options, load_for_scan, model_input, start_job

__all__ = ["main"]


@torch.inference_mode()
def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m resnet_demo.training.bands", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="weights/<name>.safetensors (its card <name>.json beside it)")
    p.add_argument("--data", required=True, help="ImageFolder dir or .tar.gz, torchvision:<name>, evalset:<name>")
    p.add_argument("--split", default="test", help="split folder to use (default: test)")
    p.add_argument("--limit", type=int, default=None, help="use a fixed random subset of N images")
    add_job_options(p, DEFAULT_BATCH)
    p.add_argument("--download", action="store_true", help="let torchvision download its data set")
    args = p.parse_args(argv)
    with start_job(p, args) as dist:
        try:
            model, card, data = load_for_scan(args, dist)
        except (WeightsError, DataError, ValueError) as exc:
            p.exit(2, f"error: {exc}\n")
        if len(data.images) == 0:
            p.exit(2, "error: no images to compute reference bands from\n")
        normalise = model_input(model, card, dist.device)
        values = band_values(model, data.images, normalise=normalise, dist=dist, batch_size=args.batch_size)
        bands: dict = bands_from_values(values, PERCENTILES)
        bands["percentiles"] = list(PERCENTILES)
        bands["n"] = len(data.images)
        bands["data"] = args.data if ":" in args.data else Path(args.data).name
        bands["split"] = args.split
        if dist.main:
            _report(card.name, bands, args.split, dist)
            card_path = Path(args.weights).with_suffix(".json")
            write_card_field(card_path, "reference_bands", bands)
            print(f"written to {card_path} (the weights file is unchanged)")
    return bands


def _report(name: str, bands: dict, split: str, dist: Dist) -> None:
    print(f"{name}: reference bands over {bands['n']} images of {bands['data']} [{split}], {dist.device}, "
          f"{dist.world} process(es)")
    names = list(bands["ratio"])
    width = max(len(n) for n in names)
    print(f"{'block':<{width}}  {'ratio p5 / p50 / p95':>26}  {'cosine p5 / p50 / p95':>26}")
    for name in names:
        r, c = bands["ratio"][name], bands["cosine"].get(name, {})
        print(
            f"{name:<{width}}  {r['p5']:8.3f} {r['p50']:8.3f} {r['p95']:8.3f}  "
            f"{c.get('p5', float('nan')):8.3f} {c.get('p50', float('nan')):8.3f} {c.get('p95', float('nan')):8.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
