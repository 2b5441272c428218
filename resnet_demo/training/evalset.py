"""Build the small evaluation sets shipped in ``weights/evalset/`` from the offline data-set archives.

    python -m resnet_demo.training.evalset [--datasets ../shared/datasets] [--out weights/evalset]

Each set holds ``--per-class`` images of every class of a test split, chosen by a seeded draw, stored as
uint8 exactly as :func:`resnet_demo.training.data.load_imagefolder` decodes them (MNIST padded to 32x32, one channel).
The tests check the shipped weights against these sets on the CPU in a few seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.weights.files import file_sha256
from .data import EVALSET_DIR, REPO_DIR, list_imagefolder, load_imagefolder

__all__ = ["SETS", "build_evalset", "content_sha256", "main"]

# name -> (archive in the data-set folder, description for the README)
SETS = {
    "cifar10_test500": ("cifar10-jpeg.tar.gz", "CIFAR-10 (JPEG copy), test split"),
    "mnist_test500": ("mnist-png.tar.gz", "MNIST (PNG copy), test split, digits padded to 32x32"),
}


def content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """Hash of the arrays themselves; unlike the .npz bytes it does not depend on zip timestamps."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def build_evalset(
    archive: str | Path, out: str | Path, *, per_class: int = 50, seed: int = 0, split: str = "test", cache_dir=None
) -> dict:
    """Write ``out`` (.npz: images, labels, classes, files) with ``per_class`` seeded picks per class of ``split``."""
    archive = Path(archive)
    data = load_imagefolder(archive, split, cache_dir=cache_dir)
    files = list_imagefolder(archive, split)
    labels = data.labels.numpy()
    rng = np.random.default_rng(seed)
    picks = []
    for k in range(len(data.classes)):
        idx = np.flatnonzero(labels == k)
        if len(idx) < per_class:
            raise ValueError(f"class {data.classes[k]!r} of {archive} has {len(idx)} images, fewer than {per_class}")
        picks.append(np.sort(rng.choice(idx, per_class, replace=False)))
    idx = np.concatenate(picks)
    images, labels = data.images.numpy()[idx], labels[idx]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        images=images,
        labels=labels,
        classes=np.array(data.classes),
        files=np.array([files[i][1] for i in idx]),
    )
    return {
        "file": out,
        "n": len(idx),
        "shape": list(images.shape),
        "bytes": out.stat().st_size,
        "content_sha256": content_sha256(images, labels),
        "archive": archive.name,
        "archive_sha256": file_sha256(archive),
    }


def _readme(infos: dict[str, dict], per_class: int, seed: int) -> str:
    lines = [
        "# Shipped evaluation sets",
        "",
        "Small held-out sets for the tests (`tests/test_train.py`) and for a quick check of a weights file:",
        "`python -m resnet_demo.training.evaluate --weights weights/<name>.safetensors --data evalset:<set>`.",
        f"Each holds {per_class} images of every class drawn from the test split (seeded, seed {seed}),",
        "stored as uint8 `(N, C, 32, 32)` arrays exactly as `resnet_demo.training.data.load_imagefolder`",
        "decodes them, with `labels`, `classes` and the source `files`. Load one with",
        "`resnet_demo.training.data.load_evalset(name)`. Built by `python -m resnet_demo.training.evalset`",
        "from the archives described in `../shared/datasets/README.md`.",
        "",
        "| set | source | images | array shape | arrays sha256 | archive sha256 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, info in infos.items():
        lines.append(
            f"| `{name}.npz` | {SETS[name][1]} | {info['n']} | {'x'.join(map(str, info['shape']))} | "
            f"`{info['content_sha256']}` | `{info['archive_sha256'][:16]}…` |"
        )
    lines += [
        "",
        "The images are from the test splits only, which no shipped model was trained on. CIFAR-10 was",
        "collected by Krizhevsky, Nair and Hinton; MNIST by LeCun, Cortes and Burges.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(prog="python -m resnet_demo.training.evalset", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--datasets", default=str(REPO_DIR.parent / "shared" / "datasets"), help="folder holding the archives"
    )
    p.add_argument("--out", default=str(EVALSET_DIR), help="output folder (default: weights/evalset)")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default: none)")
    args = p.parse_args(argv)
    infos = {}
    for name, (archive, _) in SETS.items():
        info = build_evalset(
            Path(args.datasets) / archive,
            Path(args.out) / f"{name}.npz",
            per_class=args.per_class,
            seed=args.seed,
            cache_dir=args.cache_dir,
        )
        infos[name] = info
        print(
            f"{info['file']}: {info['n']} images {info['shape']}, {info['bytes'] / 1024:.0f} KiB, "
            f"arrays sha256 {info['content_sha256']}"
        )
    (Path(args.out) / "README.md").write_text(_readme(infos, args.per_class, args.seed))
    return infos


if __name__ == "__main__":
    main(sys.argv[1:])
