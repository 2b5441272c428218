"""Accuracy of a weights file on a data set: plain and with flip test-time augmentation, per class, confusion matrix.

    python -m resnet_demo.training.evaluate --weights weights/cifar10_resnet.safetensors \\
        --data ../shared/datasets/cifar10-jpeg.tar.gz [--split test] [--out runs/confusion.png]

``--data`` takes what :func:`resnet_demo.training.data.load_data` takes, e.g. ``evalset:cifar10_test500`` for the
small set shipped in ``weights/evalset/``. Flip TTA averages the logits of each image and its mirror.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.runtime import pick_device
from ..core.weights.cards import ModelCard, WeightsError
from ..core.weights.load import load_model
from .data import DEFAULT_CACHE_DIR, DataError, Normalise, load_data, subset

__all__ = ["confusion_figure", "evaluate", "predict_logits", "save_confusion_png"]

REPO_DIR = Path(__file__).resolve().parents[2]


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: Tensor, normalise: Normalise, *, flip: bool = False, batch_size: int = 500
) -> Tensor:
    """Logits ``(N, classes)`` float32 on the CPU for uint8 ``images`` ``(N, C, H, W)``; mirrored when ``flip``."""
    out = []
    for i in range(0, len(images), batch_size):
        x = normalise(images[i : i + batch_size])
        if flip:
            x = x.flip(3)
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def _per_class(pred: Tensor, labels: Tensor, classes: Sequence[str]) -> dict[str, float]:
    return {
        c: float((pred[labels == k] == k).float().mean()) if (labels == k).any() else float("nan")
        for k, c in enumerate(classes)
    }


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    card: ModelCard,
    device: str | torch.device = "cpu",
    tta: bool = True,
    *,
    batch_size: int = 500,
) -> dict:
    """Accuracy of ``model`` on uint8 ``images`` with the card's preprocessing (mean/std, gray replicated).

    The model is put in eval mode on ``device`` and used in fp32.

    Returns:
        ``n``, ``accuracy``, ``per_class`` (class -> accuracy), ``confusion`` (rows: true class, columns:
        predicted) and, with ``tta``, the same for flip TTA as ``accuracy_tta``, ``per_class_tta``,
        ``confusion_tta``.
    """
    device = torch.device(device)
    model.eval().to(device)
    in_channels = getattr(getattr(model, "config", None), "in_channels", len(card.mean))
    normalise = Normalise(card.mean, card.std, in_channels, device)
    labels = labels.long().cpu()
    k = len(card.classes)
    if len(labels) and int(labels.max()) >= k:
        raise ValueError(f"labels go up to {int(labels.max())} but the model card lists {k} classes")

    def summary(logits: Tensor, suffix: str) -> dict:
        pred = logits.argmax(1)
        confusion = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
        return {
            f"accuracy{suffix}": float((pred == labels).float().mean()) if len(labels) else float("nan"),
            f"per_class{suffix}": _per_class(pred, labels, card.classes),
            f"confusion{suffix}": confusion.tolist(),
        }

    logits = predict_logits(model, images, normalise, batch_size=batch_size)
    result = {"n": len(labels), **summary(logits, "")}
    if tta:
        logits_flip = predict_logits(model, images, normalise, flip=True, batch_size=batch_size)
        result.update(summary((logits + logits_flip) / 2, "_tta"))
    return result


# --- confusion-matrix figure (matplotlib object API, Agg canvas, no pyplot) -------------------------


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str = ""):
    """A Figure of the row-normalised confusion matrix with the counts written in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = torch.as_tensor(confusion, dtype=torch.float64)
    rates = cm / cm.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    side = max(4.0, 0.55 * k + 2.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(cm[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
        ax.set_xticks(range(k), list(classes), rotation=45, ha="right")
        ax.set_yticks(range(k), list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    return fig


def save_confusion_png(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    confusion_figure(confusion, classes, title).savefig(path, dpi=120)
    return path


# --- command line -------------------------------------------------------------------------------


def _check_classes(data_classes: list[str], card: ModelCard, spec: str) -> None:
    if list(data_classes) != list(card.classes):
        raise DataError(f"the classes of {spec} {data_classes} do not match the model card's {card.classes}")


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m resnet_demo.training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="weights/<name>.safetensors (its card <name>.json beside it)")
    p.add_argument(
        "--data", required=True, help="ImageFolder dir or .tar.gz, torchvision:cifar10|mnist, evalset:<name>"
    )
    p.add_argument("--split", default="test", help="split folder to evaluate (default: test)")
    p.add_argument("--out", default=None, help="confusion-matrix PNG (default: runs/<name>_confusion.png)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of N images")
    p.add_argument("--no-tta", action="store_true", help="skip the flip test-time augmentation pass")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="decoded-data cache (default: data/cache)")
    p.add_argument("--download", action="store_true", help="let torchvision download its data set")
    p.add_argument("--update-card", action="store_true",
                   help="record these figures as the card's test metrics (the weights file is not touched)")
    args = p.parse_args(argv)

    try:
        device = pick_device(args.device)
        model, card = load_model(args.weights)
        data = subset(load_data(args.data, args.split, cache_dir=args.cache_dir, download=args.download), args.limit)
        _check_classes(data.classes, card, args.data)
    except (WeightsError, DataError, ValueError) as exc:
        p.exit(2, f"error: {exc}\n")
    result = evaluate(model, data.images, data.labels, card, device, tta=not args.no_tta, batch_size=args.batch_size)

    print(f"{card.name} on {args.data} [{args.split}], {result['n']} images, {device}")
    print(f"accuracy           {100 * result['accuracy']:.2f}%")
    if "accuracy_tta" in result:
        print(f"accuracy, flip TTA {100 * result['accuracy_tta']:.2f}%")
    width = max(len("class"), *(len(c) for c in card.classes))
    tta = "accuracy_tta" in result
    print(f"{'class':<{width}}  {'acc':>7}" + (f"  {'TTA':>7}" if tta else ""))
    for c in card.classes:
        row = f"{c:<{width}}  {100 * result['per_class'][c]:6.2f}%"
        print(row + (f"  {100 * result['per_class_tta'][c]:6.2f}%" if tta else ""))

    # Plot the figure the model is judged by: flip TTA for models trained with flips, plain otherwise.
    use_tta = tta and card.training.get("flip", card.input_kind == "photo")
    out = Path(args.out) if args.out else REPO_DIR / "runs" / f"{card.name}_confusion.png"
    acc = result["accuracy_tta" if use_tta else "accuracy"]
    title = f"{card.name}: {100 * acc:.2f}% on {result['n']} images{' (flip TTA)' if use_tta else ''}"
    save_confusion_png(result["confusion_tta" if use_tta else "confusion"], card.classes, out, title)
    print(f"confusion matrix -> {out}")
    if args.update_card:
        flip = card.training.get("flip", card.input_kind == "photo")
        card.metrics.update(
            test_acc=round(result["accuracy"], 5),
            test_acc_tta=round(result["accuracy_tta"], 5) if flip and tta else None,
            test_images=result["n"],
            test_split=args.split,
            tta="horizontal flip: mean of the logits of the image and its mirror" if flip
            else "none: the model was trained without flips",
            per_class_acc={c: round(v, 4) for c, v in result["per_class"].items()},
            measured_by="python -m resnet_demo.training.evaluate "
            + " ".join(argv if argv is not None else sys.argv[1:]),
        )
        card_path = Path(args.weights).with_suffix(".json")
        card.write(card_path)
        print(f"card updated -> {card_path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
