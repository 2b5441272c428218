"""Store a model's data-set exemplars beside its weights: every channel's most exciting evaluation images.

    python -m resnet_demo.training.exemplars --weights weights/cifar10_resnet.safetensors [--threads 1]

Scans the model's shipped evaluation set (:func:`resnet_demo.core.studies.evalsets.evalset_for`, 500 images) once,
and writes ``weights/<name>.exemplars.npz`` (:mod:`resnet_demo.core.studies.exemplars`) and the card's
``studies["exemplars"]`` entry naming it; the weights file, and so its sha256, is untouched. Data-parallel
under ``torchrun`` (``torchrun --nproc-per-node 2 -m resnet_demo.training.exemplars --weights ...``): each
process scans its shard in whole batches and the per-image statistics are gathered back into data order
before the top-k, so the file is exactly one process's. Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import DataError, InputError
from ..core.explorer import Explorer
from ..core.studies.distributed import Dist
from ..core.studies.evalsets import evalset_for, load_evalset
from ..core.studies.exemplars import (
    DEFAULT_BATCH,
    DEFAULT_K,
    ERF_MASS,
    SIGNED,
    STUDY,
    Exemplars,
    exemplars_file,
    scan_exemplars,
)
from ..core.studies.featurevis import VIEWS
from ..core.weights.cards import WeightsError, write_card_field
from ..core.weights.files import file_sha256
from .jobs import add_job_options, launch_command, require_card, start_job

__all__ = ["main", "study_entry"]


def study_entry(result: Exemplars, path: Path, command: str, seconds: float, dist: Dist) -> dict:
    """The card's ``studies["exemplars"]``: which file, over which set, what it holds and how it was made."""
    return {
        "file": path.name,
        "evalset": result.evalset,
        "n": result.n_images,
        "views": list(VIEWS),
        "negative_views": list(SIGNED),
        "k": result.k,
        "crop": f"effective receptive field of the map's centre unit, {ERF_MASS:.0%} of its gradient mass",
        "bytes": path.stat().st_size,
        "command": command,
        "processes": dist.world,
        "device": dist.device.type,
        "seconds": round(seconds, 1),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m resnet_demo.training.exemplars", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="weights/<name>.safetensors (its card <name>.json beside it)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"exemplars per channel (default {DEFAULT_K})")
    add_job_options(p, DEFAULT_BATCH, data=False)
    return p


def _explorer(weights: Path, dist: Dist) -> Explorer:
    require_card(weights, "the study is named there")
    explorer = Explorer.from_weights(weights, dist.device)
    explorer.card.weights_sha256 = file_sha256(weights)  # what the stored file is checked against
    return explorer


def main(argv: Sequence[str] | None = None) -> Exemplars:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    args = p.parse_args(argv)
    weights = Path(args.weights)
    with start_job(p, args) as dist:
        try:
            explorer = _explorer(weights, dist)
            name = evalset_for(explorer.card)
            if name is None:
                raise DataError(f"no shipped evaluation set fits {explorer.card.name}'s classes and kind of input")
            start = time.perf_counter()
            result = scan_exemplars(explorer, load_evalset(name), k=args.k, batch_size=args.batch_size, dist=dist)
        except (WeightsError, DataError, InputError) as exc:
            p.exit(2, f"error: {exc}\n")
        seconds = time.perf_counter() - start
        if dist.main:
            path = exemplars_file(explorer.card, weights.parent)
            result.save(path)
            entry = study_entry(result, path, launch_command("resnet_demo.training.exemplars", argv), seconds, dist)
            write_card_field(weights.with_suffix(".json"), STUDY, entry, study=True)
            print(f"{explorer.card.name}: exemplars of {sum(map(int, result.widths.sum(axis=0)))} channels over "
                  f"{result.n_images} images of {result.evalset}, {dist.world} process(es), {seconds:.1f} s")
            print(f"written {path} ({entry['bytes']:,} bytes) and studies[{STUDY!r}] in {weights.with_suffix('.json')}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
