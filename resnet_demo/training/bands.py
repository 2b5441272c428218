"""Fill a model card's reference bands: each block's ratio and cosine percentiles over a data set.

    python -m resnet_demo.training.bands --weights weights/cifar10_resnet.safetensors \\
        --data ../shared/datasets/cifar10-jpeg.tar.gz [--split test] [--limit N]

Rewrites only the card (``weights/<name>.json``); the weights file, and so its sha256, is untouched. The
statistics themselves are :func:`resnet_demo.core.bands.compute_bands`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..core.bands import DEFAULT_BATCH, compute_bands
from ..core.cards import WeightsError, write_card_field
from ..core.load import load_model
from ..core.runtime import pick_device
from .data import DEFAULT_CACHE_DIR, DataError, Normalise, load_data, subset

# --- command line ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m resnet_demo.training.bands", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="weights/<name>.safetensors (its card <name>.json beside it)")
    p.add_argument("--data", required=True, help="ImageFolder dir or .tar.gz, torchvision:<name>, evalset:<name>")
    p.add_argument("--split", default="test", help="split folder to use (default: test)")
    p.add_argument("--limit", type=int, default=None, help="use a fixed random subset of N images")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="decoded-data cache (default: data/cache)")
    p.add_argument("--download", action="store_true", help="let torchvision download its data set")
    args = p.parse_args(argv)

    weights = Path(args.weights)
    card_path = weights.with_suffix(".json")
    try:
        if not card_path.is_file():
            raise WeightsError(f"no model card {card_path} beside {weights}: the bands are stored in the card")
        model, card = load_model(weights)
        data = load_data(args.data, args.split, size=card.input_size, cache_dir=args.cache_dir, download=args.download)
        if list(data.classes) != list(card.classes):
            raise DataError(f"the classes of {args.data} {data.classes} do not match the model card's {card.classes}")
        data = subset(data, args.limit)
        device = pick_device(args.device)
    except (WeightsError, DataError, ValueError) as exc:
        p.exit(2, f"error: {exc}\n")
    model = model.to(device).eval()
    in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    normalise = Normalise(card.mean, card.std, in_channels, device, channels_last=False)
    bands = compute_bands(model, data.images, normalise=normalise, batch_size=args.batch_size)
    bands["data"] = args.data if ":" in args.data else Path(args.data).name
    bands["split"] = args.split
    write_card_field(card_path, "reference_bands", bands)

    print(f"{card.name}: reference bands over {bands['n']} images of {bands['data']} [{args.split}], {device}")
    names = list(bands["ratio"])
    width = max(len(n) for n in names)
    print(f"{'block':<{width}}  {'ratio p5 / p50 / p95':>26}  {'cosine p5 / p50 / p95':>26}")
    for name in names:
        r, c = bands["ratio"][name], bands["cosine"].get(name, {})
        print(
            f"{name:<{width}}  {r['p5']:8.3f} {r['p50']:8.3f} {r['p95']:8.3f}  "
            f"{c.get('p5', float('nan')):8.3f} {c.get('p50', float('nan')):8.3f} {c.get('p95', float('nan')):8.3f}"
        )
    print(f"written to {card_path} (the weights file is unchanged)")
    return bands


if __name__ == "__main__":
    main(sys.argv[1:])
