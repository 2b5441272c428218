"""Fill a model card's lesion study: per-class accuracy with each block lesioned, and accuracy against alpha.

    python -m resnet_demo.training.scan --weights weights/cifar10_resnet.safetensors \\
        --data ../shared/datasets/cifar10-jpeg.tar.gz [--split test] [--limit N] [--alphas 0 0.5 1 2]

Data-parallel on several processes, GPUs or machines with ``torchrun`` (``gloo`` on CPUs, ``nccl`` on
GPUs; each process takes its shard of the images and the counts are summed), with the same numbers::

    torchrun --nproc-per-node 2 -m resnet_demo.training.scan --weights ... --data ...

Only rank 0 writes: the card's ``studies["lesions"]`` (``weights/<name>.json``); the weights file, and so
its sha256, is untouched. The study itself is :func:`resnet_demo.core.studies.lesions.lesion_scan`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.studies.lesions import DEFAULT_ALPHAS, DEFAULT_BATCH, NONE, LesionScan, lesion_scan
from ..core.weights.cards import WeightsError, write_card_field
from .data import DataError
from .jobs import add_job_options, launch_command, load_for_scan, model_input, start_job

__all__ = ["STUDY", "main"]

STUDY = "lesions"  # the key in the card's ``studies``


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m resnet_demo.training.scan", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="weights/<name>.safetensors (its card <name>.json beside it)")
    p.add_argument("--data", required=True, help="ImageFolder dir or .tar.gz, torchvision:<name>, evalset:<name>")
    p.add_argument("--split", default="test", help="split folder to use (default: test)")
    p.add_argument("--limit", type=int, default=None, help="use a fixed random subset of N images")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS),
                   help=f"factors of a block's branch (default: {' '.join(f'{a:g}' for a in DEFAULT_ALPHAS)})")
    add_job_options(p, DEFAULT_BATCH)
    p.add_argument("--download", action="store_true", help="let torchvision download its data set")
    return p


def _progress(start: float):
    """Rank 0's progress on stderr, about every tenth of its images."""
    shown = [0]

    def show(done: int, total: int) -> None:
        if done * 10 // total > shown[0] or done == total:
            shown[0] = done * 10 // total
            print(f"  {done}/{total} images of this process, {time.perf_counter() - start:.0f} s", file=sys.stderr)

    return show


def _report(name: str, scan: LesionScan, study: dict) -> None:
    """The table docs/guide.md quotes: error intact and without each block, and each block's alpha curve."""
    les, curves = scan.lesions, scan.curves
    print(f"{name}: {scan.n} images of {study['data']} [{study['split']}], {study['processes']} process(es), "
          f"{study['seconds']:.1f} s")
    error, drop = les.error(), les.drop
    width = max(len(r) for r in [*les.rows, "lesioned"])
    print(f"{'lesioned':<{width}}  {'error':>7}  {'change':>7}  most hurt class (accuracy change, points)")
    for i, row in enumerate(les.rows):
        change = 100 * (error[row] - error[NONE])
        hurt = ""
        if row != NONE and np.isfinite(drop[i]).any():
            worst = int(np.nanargmin(drop[i]))
            hurt = f"{les.classes[worst]} {100 * drop[i, worst]:+.1f}"
        print(f"{row:<{width}}  {100 * error[row]:6.1f}%  {change:+7.1f}  {hurt}")
    print("accuracy % against alpha: " + "  ".join(f"{a:g}" for a in curves.alphas))
    for b, acc in zip(curves.blocks, curves.accuracy):
        print(f"{b:<{width}}  " + "  ".join(f"{100 * v:5.1f}" for v in acc))


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    args = p.parse_args(argv)
    with start_job(p, args) as dist:
        try:
            model, card, data = load_for_scan(args, dist)
            normalise = model_input(model, card, dist.device)
            start = time.perf_counter()
            scan = lesion_scan(model, data.images, data.labels, classes=card.classes, normalise=normalise,
                               alphas=args.alphas, dist=dist, batch_size=args.batch_size,
                               progress=_progress(start) if dist.main else None)
        except (WeightsError, DataError, ValueError) as exc:
            p.exit(2, f"error: {exc}\n")
        seconds = time.perf_counter() - start
        study = scan.to_dict() | {
            "data": args.data if ":" in args.data else Path(args.data).name,
            "split": args.split,
            "command": launch_command("resnet_demo.training.scan", argv),
            "processes": dist.world,
            "device": dist.device.type,
            "seconds": round(seconds, 1),
        }
        if dist.main:
            card_path = Path(args.weights).with_suffix(".json")
            write_card_field(card_path, STUDY, study, study=True)
            _report(card.name, scan, study)
            print(f"written to {card_path} studies[{STUDY!r}] (the weights file is unchanged)")
    return study


if __name__ == "__main__":
    main()
