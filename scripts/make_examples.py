"""Copy a few test images per class from the dataset archives into examples/ (run once; output is committed).

    python scripts/make_examples.py ../shared/datasets

File names carry the true label: ``cifar10-<class>-<n>.jpg`` and ``mnist-<digit>-<n>.png``.
Test-split images only, so none of them was seen in training.
"""

import argparse
import tarfile
from collections import defaultdict
from pathlib import Path

PER_CLASS = {"cifar10": 2, "mnist": 1}


def extract(archive: Path, prefix: str, per_class: int, out: Path) -> int:
    taken: dict[str, int] = defaultdict(int)
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("test/")]
        members.sort(key=lambda m: m.name)
        for m in members:
            label = m.name.split("/")[1]
            if taken[label] >= per_class:
                continue
            suffix = Path(m.name).suffix
            (out / f"{prefix}-{label}-{taken[label]}{suffix}").write_bytes(tar.extractfile(m).read())
            taken[label] += 1
    return sum(taken.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", type=Path, help="folder with cifar10-jpeg.tar.gz and mnist-png.tar.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "examples")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    n = extract(args.datasets / "cifar10-jpeg.tar.gz", "cifar10", PER_CLASS["cifar10"], args.out)
    n += extract(args.datasets / "mnist-png.tar.gz", "mnist", PER_CLASS["mnist"], args.out)
    print(f"wrote {n} examples to {args.out}")


if __name__ == "__main__":
    main()
