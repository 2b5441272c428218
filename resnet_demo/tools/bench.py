"""Benchmark: how fast one analysis is, what capturing costs, throughput and memory.

    python -m resnet_demo.tools.bench                 # CPU, and CUDA when present
    python -m resnet_demo.tools.bench --json out.json
    python -m resnet_demo.tools.bench --resnet50      # also a torchvision ResNet-50 (random weights, 224x224):
                                                      # its bare forward, analysis and full analysis, and ratios

Latencies are wall-clock per call after warm-up; p50 and p95 over ``--runs`` calls. "capture overhead"
compares the medians of the forward pass with and without hooks. "full analysis" is what the page
waits for: decode and preprocess a file, forward with capture, metrics, 9 feature-map grids, the
residual chart and the enlarged block, all drawn to pixels. Weights are the shipped ones when
present (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.capture import capture_forward
from ..core.explorer import Explorer
from ..core.model import build_model
from ..core.runtime import machine, record_cuda_graph, tune_malloc
from ..core.weights.cards import WEIGHTS_DIR, tutorial_card
from ..core.weights.load import load_model
from ..view.analysis_view import build_page

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cifar10-cat-0.jpg"


def timed(fn: Callable[[], object], runs: int, warmup: int, sync: Callable[[], None]) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p95_ms": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
        "min_ms": times[0],
    }


def interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int, sync) -> dict[str, dict]:
    """Time several functions in alternation, so a noisy neighbour affects all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - t) * 1e3)
    out = {}
    for name, times in samples.items():
        times.sort()
        out[name] = {
            "p50_ms": statistics.median(times),
            "p95_ms": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
            "min_ms": times[0],
        }
    return out


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def shipped_or_random(name: str = "cifar10_resnet") -> Explorer:
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if path.is_file():
        model, card = load_model(path)
    else:
        model, card = build_model().eval(), tutorial_card("random (untrained)", trained=False)
    return Explorer(model, card, "cpu")


def graph_fns(ex: Explorer, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """What the GPU does once Python's per-layer launch cost is gone: the bare forward replayed from a
    CUDA graph, and the Explorer's own graphed capture (its copy to the host included)."""
    with torch.inference_mode():
        bare_graph, _ = record_cuda_graph(lambda: ex.model(x), x.device)
    graphed = ex._graph(tuple(x.shape))
    if graphed is None:
        raise RuntimeError("the Explorer could not record its capture as a CUDA graph (see the warning)")
    host_x = x.cpu()  # requests arrive from the host
    return {"bare_forward_graph": bare_graph.replay, "forward_with_capture_graph": lambda: graphed(host_x)}


def bench_device(explorer: Explorer, device: torch.device, args) -> dict:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the app sets it on a GPU
    ex = Explorer(explorer.model, explorer.card, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    size = ex.card.input_size
    x = torch.randn(1, ex.in_channels, size, size, device=device)
    result: dict = {"device": str(device), "model": ex.card.name}

    def bare():
        with torch.inference_mode():
            ex.model(x)

    def captured():
        capture_forward(ex.model, x)

    def full():
        build_page(ex.analyze(str(args.image), k=5))

    fns = {"bare_forward": bare, "forward_with_capture": captured}
    if device.type == "cuda":
        try:
            fns.update(graph_fns(ex, x))
        except RuntimeError as exc:  # report it and time the eager path
            result["graph_error"] = f"{type(exc).__name__}: {exc}"
    lat = interleaved(fns, args.runs, args.warmup, sync)
    result.update(lat)
    result["capture_overhead_pct"] = 100 * (lat["forward_with_capture"]["p50_ms"] / lat["bare_forward"]["p50_ms"] - 1)
    result["full_analysis"] = timed(full, args.runs, args.warmup, sync)
    if device.type == "cuda":
        eager = Explorer(ex.model, ex.card, device, cuda_graphs=False)
        result["full_analysis_eager"] = timed(
            lambda: build_page(eager.analyze(str(args.image), k=5)), args.runs, args.warmup, sync
        )

    # Batch throughput is the offline-inference figure: on CUDA in bf16 with channels_last and cuDNN's
    # autotuner, the way a GPU serves batches; on the CPU in fp32, as the app runs there.
    throughput = {}
    amp = device.type == "cuda"
    fmt = torch.channels_last if amp else torch.contiguous_format
    batch_model = copy.deepcopy(ex.model).to(memory_format=fmt)
    for bs in args.batch_sizes:
        xb = torch.randn(bs, ex.in_channels, size, size, device=device).to(memory_format=fmt)

        def batch(xb=xb):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                batch_model(xb)

        t = timed(batch, max(3, args.runs // 10), 2, sync)
        throughput[str(bs)] = {
            "images_per_s": bs / (t["p50_ms"] / 1e3),
            "dtype": "bf16" if amp else "fp32",
            "memory_format": "channels_last" if amp else "contiguous",
        }
    result["throughput"] = throughput
    if device.type == "cuda":
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def bench_resnet50(args) -> dict:
    from ..core.weights.torchvision_resnets import build_torchvision, imagenet_card

    ex = Explorer(build_torchvision("resnet50").eval(), imagenet_card("resnet50"), "cpu")
    from PIL import Image

    img = Image.open(args.image).convert("RGB").resize((320, 240))
    x = ex.prepare(img).tensor.to(ex.device)  # (1, 3, 224, 224)

    def bare():  # the same model's plain forward of the same prepared 224x224 input
        with torch.inference_mode():
            ex.model(x)

    def analysis():  # the core's analysis: preprocess, forward with capture, metrics, top-k
        ex.analyze(img, k=5)

    def full():  # what the page waits for: the analysis drawn (grids, residual chart, enlarged block)
        build_page(ex.analyze(img, k=5))

    runs = max(5, args.runs // 10)
    lat = interleaved({"bare_forward": bare, "analysis": analysis, "full_analysis": full}, runs, 2, lambda: None)
    bare_ms = lat["bare_forward"]["p50_ms"]
    return {"device": "cpu", "model": "torchvision resnet50 (random weights)", "blocks": len(ex.blocks),
            "input": list(x.shape), "threads": torch.get_num_threads(), **lat,
            "analysis_over_bare": lat["analysis"]["p50_ms"] / bare_ms,
            "full_over_bare": lat["full_analysis"]["p50_ms"] / bare_ms, "peak_rss_mb": peak_rss_mb()}


def bench_featurevis(explorer: Explorer, channels: int) -> dict:
    """Seconds to optimise one channel's image (the page's *Optimise*), per block and part, for the first
    ``channels`` channels of res1, the middle block and the last (uncached: a new seed each time)."""
    from ..core.studies.featurevis import visualise

    names = explorer.block_names
    picks = [names[0], names[len(names) // 2], names[-1]]
    out = {}
    for block in picks:
        for part in ("f", "y"):
            times = [visualise(explorer.model, explorer.card, block, part, c, seed=100 + c).seconds
                     for c in range(channels)]
            out[f"{block} {part}"] = {"mean_s": statistics.mean(times), "max_s": max(times), "channels": channels}
    return out


def bench_inside(explorer: Explorer, image: Path, runs: int) -> dict:
    """Milliseconds to open "Inside the block" (one block re-run with its inner layers recorded, and the
    figure drawn) for the first, middle and last block, beside the same model's bare forward."""
    from PIL import Image

    from ..view.inside_view import inside_figure

    analysis = explorer.analyze(Image.open(image).convert("RGB"))
    x = analysis.input.to(explorer.device)

    def bare():
        with torch.inference_mode():
            explorer.model(x)

    names = explorer.block_names
    fns = {"bare_forward": bare}
    for block in (names[0], names[len(names) // 2], names[-1]):
        fns[f"inside {block}"] = lambda b=block: explorer.inside(analysis, b, 0)
        fns[f"inside {block} + figure"] = lambda b=block: inside_figure(explorer.inside(analysis, b, 0))
    lat = interleaved(fns, runs, 2, lambda: None)
    bare_ms = lat["bare_forward"]["p50_ms"]
    return {name: {"p50_ms": v["p50_ms"], "over_bare": v["p50_ms"] / bare_ms} for name, v in lat.items()}


def print_table(report: dict) -> None:
    print(f"machine: {report['machine']}")
    for r in report["results"]:
        print(f"\n== {r['model']} on {r['device']} ==")
        for key in (
            "bare_forward",
            "bare_forward_graph",
            "forward_with_capture",
            "forward_with_capture_graph",
            "analysis",
            "full_analysis",
            "full_analysis_eager",
        ):
            if key in r:
                t = r[key]
                print(f"  {key:<22} p50 {t['p50_ms']:8.2f} ms   p95 {t['p95_ms']:8.2f} ms")
        if "graph_error" in r:
            print(f"  CUDA graphs failed: {r['graph_error']}")
        if "full_over_bare" in r:
            print(f"  {'p50 over bare forward':<22} analysis {r['analysis_over_bare']:.2f}x, "
                  f"full analysis {r['full_over_bare']:.2f}x ({r['threads']} threads, input {r['input']})")
        if "capture_overhead_pct" in r:
            print(f"  {'capture overhead':<22} {r['capture_overhead_pct']:+.1f}% of the bare forward (p50)")
        for bs, t in r.get("throughput", {}).items():
            print(f"  batch {bs:>4} {t['dtype']:<5}      {t['images_per_s']:10.0f} images/s")
        if "peak_gpu_memory_mb" in r:
            print(f"  peak GPU memory        {r['peak_gpu_memory_mb']:.0f} MB")
        print(f"  peak RSS               {r['peak_rss_mb']:.0f} MB")
    for name, t in report.get("featurevis", {}).items():
        print(f"  feature visualisation {name:<10} mean {t['mean_s']:5.1f} s   max {t['max_s']:5.1f} s per channel")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--image", type=Path, default=EXAMPLE)
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda when present)")
    parser.add_argument("--resnet50", action="store_true", help="also time a torchvision ResNet-50 analysis")
    parser.add_argument("--threads", type=int, help="torch CPU threads (the app on a 2-core CPU uses 1 per request)")
    parser.add_argument("--featurevis", type=int, default=0, metavar="N",
                        help="also time feature visualisation of N channels of the first, middle and last block")
    parser.add_argument("--inside", action="store_true",
                        help="time opening 'Inside the block' (first, middle, last block) against a bare forward")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave glibc's malloc settings alone (the app tunes them; see explorer.tune_malloc)")
    args = parser.parse_args(argv)
    malloc_tuned = False if args.glibc_defaults else tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    explorer = shipped_or_random()
    report = {"machine": {**machine(), "malloc_tuned": malloc_tuned},
              "results": [bench_device(explorer, torch.device(d), args) for d in devices]}
    if args.resnet50:
        report["results"].append(bench_resnet50(args))
    if args.featurevis:
        report["featurevis"] = bench_featurevis(explorer, args.featurevis)
    if args.inside:
        report["inside"] = bench_inside(explorer, args.image, max(5, args.runs // 5))
    print_table(report)
    if args.inside:
        for name, v in report["inside"].items():
            print(f"{name:32s} {v['p50_ms']:8.2f} ms  {v['over_bare']:5.2f}x the bare forward")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
