"""Benchmark of the studies over a data set on ImageNet-size models: time and peak memory of each.

    python -m resnet_demo.tools.studybench                          # resnet18, 50, 152; every study; 500 images
    python -m resnet_demo.tools.studybench --models resnet50 --studies cka lesions --images 100
    python -m resnet_demo.tools.studybench --json out.json
    python -m resnet_demo.tools.studybench --held 8                 # memory of 8 uploads of each model held at once

Models are torchvision's ResNets with **random weights** (``weights=None``: nothing is downloaded) at 224×224,
with the ImageNet card's preprocessing; images are **random uint8 images** (N, 3, 224, 224) with random labels
of 1,000 classes: time and memory do not depend on what the pixels show. Studies, as the page runs them:

- ``cka``: block similarity (linear CKA) of the model against itself, batches of 100;
- ``lesions``: the lesion study (every block lesioned, and scaled by 0.5, 1.5 and 2);
- ``exemplars``: the data-set exemplars (receptive fields on 8 images with gradients, then the scan);
- ``errors``: the data-set error scan (logits of every image).

Each (model, study) runs in a fresh process, so one study's memory cannot hide in another's. "peak above
start" is the process's peak resident memory during the study (VmHWM, reset as the study starts) less its
resident memory just before (model built, images made); "estimate" is what the study's memory budget
(:mod:`resnet_demo.core.studies.budget`) expected for the batch it planned. Run on the CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("resnet18", "resnet50", "resnet152")
STUDIES = ("cka", "lesions", "exemplars", "errors")
SIZE = 224


def _rss() -> int:
    """Resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    """Peak resident bytes (VmHWM) since the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_one(arch: str, study: str, n: int, threads: int, seed: int = 0) -> dict:
    """One study on one model in this process; returns seconds, memory and the planned batch."""
    import torch
    import torchvision

    from ..core.explorer import Explorer
    from ..core.studies import budget, errorscan, exemplars, lesions, similarity
    from ..core.studies.evalsets import EvalSet
    from ..core.weights.cards import IMAGENET, ModelCard

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    classes = [str(i) for i in range(1000)]
    card = ModelCard.from_preset(IMAGENET, arch, classes=classes, arch=arch, config=None, trained=False)
    ex = Explorer(model, card, "cpu")
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 1000, (n,), generator=g)

    planned = []
    real = budget.budgeted

    def recording(footprint, batch, **kw):
        cm = real(footprint, batch, **kw)

        class Recorded:
            def __enter__(self):
                size = cm.__enter__()
                planned.append({"batch": size, "estimate_mb": footprint.at(size) / 2**20})
                return size

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Recorded()

    for module in (similarity, lesions, exemplars, errorscan):
        module.budgeted = recording
    studies = {
        "cka": lambda: similarity.block_similarity(ex, ex, images, batch_size=100),
        "lesions": lambda: lesions.scan_explorer(ex, images, labels),
        "exemplars": lambda: exemplars.scan_exemplars(ex, EvalSet(images, labels, classes, "random")),
        "errors": lambda: errorscan.scan(ex, images, labels),
    }
    _trim()
    start = _rss()
    exact = _reset_peak()
    t0 = time.perf_counter()
    studies[study]()
    seconds = time.perf_counter() - t0
    peak = _peak()
    return {"model": arch, "study": study, "images": n, "seconds": round(seconds, 1), "threads": threads,
            "start_mb": round(start / 2**20), "peak_above_start_mb": round((peak - start) / 2**20),
            "peak_exact": exact, "planned": planned}


def run_held(arch: str, n: int) -> dict:
    """``n`` uploads of one ImageNet ResNet held as the server holds them: each saved as a safetensors checkpoint
    (random weights), read through the page's upload path and kept in a :class:`UserModels` with its default
    bounds. Returns the resident memory after each and the peak above the start."""
    import tempfile

    import torchvision
    from safetensors.torch import save_file

    from ..view.uploads import UserModels, load_upload

    store, rows = UserModels(per_session=1, total=max(8, n)), []
    with tempfile.TemporaryDirectory() as tmp:
        model = getattr(torchvision.models, arch)(weights=None)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        del model
        _trim()
        start = _rss()
        exact = _reset_peak()
        for i in range(n):
            path = Path(tmp) / f"{arch}-{i}.safetensors"
            save_file(state, str(path))
            explorer = load_upload(path, arch=None, preset="auto", class_names=None, device="cpu")
            store.add(f"session {i}", explorer, path.name)
            del explorer
            _trim()
            rows.append(round((_rss() - start) / 2**20))
    return {"model": arch, "held": len(store), "weights_mb": round(store.held_bytes() / 2**20),
            "rss_above_start_mb": rows, "peak_above_start_mb": round((_peak() - start) / 2**20), "peak_exact": exact}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=STUDIES)
    parser.add_argument("--images", type=int, default=500, help="random 224x224 images per study (default 500)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--held", type=int, default=0, metavar="N",
                        help="instead of the studies: memory of N uploads of each model held at once")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "STUDY"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    threads = args.threads or (os.cpu_count() or 1)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.images, threads)))
        return []
    if args.held:
        return _held(args)
    rows = []
    print(f"random weights, random uint8 images {SIZE}x{SIZE}, {args.images} images, {threads} threads, CPU")
    print(f"{'model':<10} {'study':<10} {'seconds':>8} {'peak above start':>17} {'batch':>6} {'estimate':>9}")
    for arch in args.models:
        for study in args.studies:
            cmd = [sys.executable, "-m", "resnet_demo.tools.studybench", "--one", arch, study,
                   "--images", str(args.images), "--threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{arch:<10} {study:<10} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            batch = "/".join(str(p["batch"]) for p in row["planned"]) or "-"  # exemplars plan twice
            estimate = max((p["estimate_mb"] for p in row["planned"]), default=float("nan"))
            print(f"{arch:<10} {study:<10} {row['seconds']:>8.1f} {row['peak_above_start_mb']:>13} MiB "
                  f"{batch:>6} {estimate:>5.0f} MiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


def _held(args) -> list[dict]:
    """Each model's ``--held`` run in a fresh process; the table of resident memory as uploads accumulate."""
    rows = []
    print(f"random weights, {args.held} uploads of each model held at once (the page's upload path), CPU")
    print(f"{'model':<10} {'held':>4} {'weights':>9} {'resident above start, after each upload (MiB)':<48} {'peak':>9}")
    for arch in args.models:
        code = (f"import json; from resnet_demo.tools.studybench import run_held; "
                f"print(json.dumps(run_held({arch!r}, {args.held})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{arch:<10} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        steps = " ".join(str(v) for v in row["rss_above_start_mb"])
        print(f"{arch:<10} {row['held']:>4} {row['weights_mb']:>5} MiB {steps:<48} {row['peak_above_start_mb']:>5} MiB",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
