"""Train a model config on an image data set and write ``weights/<name>.safetensors`` with its model card.

    python -m resnet_demo.training.train --data ../shared/datasets/cifar10-jpeg.tar.gz --name cifar10_resnet --epochs 30
    python -m resnet_demo.training.train --data ../shared/datasets/mnist-png.tar.gz --name mnist_resnet --epochs 8
    python -m resnet_demo.training.train --data torchvision:cifar10 --download --name cifar10_resnet

Written the way the fastest CIFAR-10 trainers are (airbench): the decoded data set lives on the device as
uint8; each batch is cropped (4-pixel reflect padding), flipped and normalised on the device by index
arithmetic, with no per-image Python work; bf16 autocast on CUDA; channels_last; SGD with Nesterov momentum,
weight decay on conv/linear weights only, linear warm-up then linear decay to zero per step; label smoothing;
optional cutout and an exponential moving average of the weights. The same code runs on the CPU.

The card's accuracy figures come from the file as written (fp16 weights, fp32 BN statistics), reloaded with
:func:`resnet_demo.core.weights.load.load_model`, never from the in-memory model.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
import time
from collections.abc import Callable, Collection, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.model import TUTORIAL_CONFIG, ResNetConfig, build_model, count_parameters
from ..core.runtime import device_name, pick_device
from ..core.weights.cards import CIFAR10, WEIGHTS_DIR, ModelCard, Preset, WeightsError, preset_for
from ..core.weights.files import save_weights
from ..core.weights.load import load_model
from .data import DEFAULT_CACHE_DIR, DataError, ImageSet, Normalise, load_data, subset
from .evaluate import evaluate

__all__ = [
    "CONFIGS",
    "TrainConfig",
    "WeightEMA",
    "crop_flip",
    "cutout",
    "lr_factor",
    "main",
    "random_crop_flip",
    "train",
]

# Named model configs for --config; the shipped models are the tutorial's Net exactly.
CONFIGS: dict[str, ResNetConfig] = {
    "tutorial": TUTORIAL_CONFIG,
    "tiny": ResNetConfig(widths=(16, 32), blocks=(1, 1), name="tiny"),  # smoke tests and quick CPU runs
}


@dataclass
class TrainConfig:
    """Hyper-parameters of one run; every field is recorded in the model card."""

    epochs: int = 30
    batch_size: int = 512
    lr: float = 0.4  # peak learning rate, reached after the warm-up
    momentum: float = 0.9  # Nesterov
    wd: float = 5e-4  # weight decay on conv/linear weights; none on biases and BN
    label_smoothing: float = 0.1
    warmup: float = 0.15  # share of all steps spent ramping the lr linearly up from 0
    flip: bool = True  # random horizontal flips (off for digits)
    crop_pad: int = 4  # random crops from this much reflect padding (0: no crops)
    cutout: int = 0  # side in pixels of one zeroed square per image (0: off)
    ema: float = 0.0  # per-step decay of the weight EMA used as the final model (0: off)
    amp: bool | None = None  # bf16 autocast; None: on CUDA only
    channels_last: bool = True
    compile: bool = False  # torch.compile the training forward/backward
    seed: int = 0
    mean: tuple[float, ...] = CIFAR10.mean
    std: tuple[float, ...] = CIFAR10.std
    progress: bool = True
    log_every: int = 20  # steps between progress-bar updates (each one waits for the device)


# --- augmentation on the device, for a whole batch at once -----------------------------------------


def _reflect(i: Tensor, n: int) -> Tensor:
    # Index of reflect padding (edge not repeated, as F.pad mode="reflect"); valid for offsets below n.
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def crop_flip(x: Tensor, dx: Tensor, dy: Tensor, flip: Tensor, pad: int) -> Tensor:
    """Crop each image at offset ``(dy, dx)`` in ``[0, 2 * pad]`` of its reflect-padded copy; mirror it where ``flip``.

    One gather for the batch; no padded copy is made. ``x`` is ``(B, C, H, W)`` of any dtype.
    """
    b, c, h, w = x.shape
    dev = x.device
    iy = dy.view(-1, 1) - pad + torch.arange(h, device=dev)  # (B, H)
    ix = dx.view(-1, 1) - pad + torch.arange(w, device=dev)  # (B, W)
    ix = torch.where(flip.view(-1, 1), ix.flip(1), ix)
    iy, ix = _reflect(iy, h), _reflect(ix, w)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return x[bi, ci, iy.view(b, 1, h, 1), ix.view(b, 1, 1, w)]


def random_crop_flip(x: Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> Tensor:
    b = x.shape[0]
    if pad == 0 and not flip:
        return x
    dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
    flips = (
        torch.rand(b, device=x.device, generator=generator) < 0.5
        if flip
        else torch.zeros(b, dtype=torch.bool, device=x.device)
    )
    return crop_flip(x, dx, dy, flips, pad)


def cutout(x: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero one ``size`` x ``size`` square per image (centre anywhere, clipped at the border) of a normalised batch."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1), device=x.device, generator=generator) - size // 2
    cx = torch.randint(0, w, (b, 1), device=x.device, generator=generator) - size // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ys >= cy) & (ys < cy + size)  # (B, H)
    in_x = (xs >= cx) & (xs < cx + size)  # (B, W)
    return x.masked_fill((in_y[:, :, None] & in_x[:, None, :])[:, None], 0.0)


# --- schedule and weight averaging ----------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Share of the peak lr at ``step`` (0-based): linear from 0 over ``warmup * total`` steps, then linear to 0."""
    warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


class WeightEMA:
    """Exponential moving average of every floating-point entry of a state dict (BN statistics included)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.live = [v for v in model.state_dict().values()]
        self.shadow = [v.detach().clone() for v in self.live]
        self.keys = list(model.state_dict().keys())
        self._floats = [i for i, v in enumerate(self.live) if v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # Short memory at first, so the average does not start from the random initialisation.
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_([self.shadow[i] for i in self._floats], [self.live[i] for i in self._floats], 1.0 - d)
        for i, v in enumerate(self.live):
            if not v.is_floating_point():
                self.shadow[i].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(dict(zip(self.keys, self.shadow, strict=True)))


# --- training loop ------------------------------------------------------------------------------


def _param_groups(model: nn.Module, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            wanted = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            (decay if wanted else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class _PlainBar:
    """Stands in for tqdm where it is not installed: epoch lines only."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def write(self, s: str, file=None) -> None:
        print(s, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainBar()
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=1.0 if interactive else 30.0,
        file=sys.stderr,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    cfg: TrainConfig,
    device: str | torch.device = "cpu",
    *,
    snapshot: Callable[[int, int, nn.Module], None] | None = None,
    snapshot_steps: Collection[int] = (),
) -> dict:
    """Train ``model`` in place on uint8 ``images`` ``(N, C, H, W)`` and int64 ``labels``.

    ``snapshot(step, epoch, weights)`` is called after each step (counted from 1) in ``snapshot_steps``
    with the weights the run would ship at that moment (the EMA's, when there is one), in a copy.

    The data set is moved to ``device`` once. Each epoch visits a seeded permutation in full batches
    (one batch of all images when there are fewer than ``batch_size``). With ``cfg.ema`` the model ends
    with the averaged weights.

    Returns:
        History: per-step ``loss`` and ``acc`` (lists of floats), per-epoch records under ``epochs``,
        ``steps``, ``images_seen``, ``train_seconds`` and ``images_per_s``.
    """
    device = torch.device(device)
    data = _Batches.on(device, model, images, labels, cfg)
    total = total_steps(data.n, cfg.batch_size, cfg.epochs)
    steps = _Stepper.start(model, cfg, device, total)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    log = _StepLog(_progress_bar(total, cfg.progress))
    try:
        epochs = [_epoch(e, steps, data, cfg, gen, log, snapshot, snapshot_steps) for e in range(cfg.epochs)]
    finally:
        log.bar.close()
    if steps.ema is not None:
        steps.ema.copy_to(model)
    seconds = sum(e["seconds"] for e in epochs)
    return {
        "loss": torch.stack(log.losses).float().cpu().tolist() if log.losses else [],
        "acc": (torch.stack(log.corrects).float().cpu() / data.bs).tolist() if log.corrects else [],
        "epochs": epochs,
        "steps": total,
        "batch_size": data.bs,
        "images_seen": total * data.bs,
        "train_seconds": seconds,
        "images_per_s": total * data.bs / seconds if seconds else 0.0,
        "amp": steps.amp,
        "ema": steps.ema is not None,
    }


@dataclass
class _Batches:
    """The training set on the device, cut into augmented, normalised batches of ``bs``."""

    x: Tensor  # uint8 (N, C, H, W)
    y: Tensor  # int64 (N,)
    bs: int
    normalise: Normalise

    @classmethod
    def on(cls, device: torch.device, model: nn.Module, images: Tensor, labels: Tensor, cfg: TrainConfig) -> _Batches:
        in_channels = getattr(getattr(model, "config", None), "in_channels", images.shape[1])
        normalise = Normalise(cfg.mean, cfg.std, in_channels, device, channels_last=cfg.channels_last)
        y = labels.to(device=device, dtype=torch.long)
        if len(y) == 0:
            raise ValueError("no training images")
        return cls(images.to(device), y, min(cfg.batch_size, len(y)), normalise)

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.bs

    def batch(self, perm: Tensor, i: int, cfg: TrainConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = perm[i * self.bs : (i + 1) * self.bs]
        x = self.normalise(random_crop_flip(self.x[idx], cfg.crop_pad, cfg.flip, gen))
        if cfg.cutout:
            x = cutout(x, cfg.cutout, gen)
        return x, self.y[idx]


@dataclass
class _Stepper:
    """The optimiser's side of a run: the model in training mode (compiled if asked), SGD with Nesterov
    momentum on a warm-up/decay schedule, the loss, mixed precision on CUDA, the weights' EMA."""

    model: nn.Module
    forward: Callable[[Tensor], Tensor]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    ema: WeightEMA | None
    amp: bool
    device: torch.device

    @classmethod
    def start(cls, model: nn.Module, cfg: TrainConfig, device: torch.device, total: int) -> _Stepper:
        amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.SGD(_param_groups(model, cfg.wd), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
        return cls(
            model=model,
            forward=torch.compile(model) if cfg.compile else model,
            opt=opt,
            sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup)),
            criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
            ema=WeightEMA(model, cfg.ema) if cfg.ema > 0 else None,
            amp=amp,
            device=device,
        )

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimisation step on a batch; its loss and logits."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.forward(x)
        loss = self.criterion(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update()
        return loss, logits

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


@dataclass
class _StepLog:
    """Every step's loss and count of correct predictions (on the device: read once an epoch), and the bar."""

    bar: object
    losses: list[Tensor] = dataclasses.field(default_factory=list)
    corrects: list[Tensor] = dataclasses.field(default_factory=list)

    def since(self, first: int) -> tuple[float, float]:
        """Mean loss and summed correct predictions of the steps from ``first`` on."""
        return float(torch.stack(self.losses[first:]).mean()), float(torch.stack(self.corrects[first:]).sum())


def _epoch(epoch: int, steps: _Stepper, data: _Batches, cfg: TrainConfig, gen: torch.Generator, log: _StepLog,
           snapshot: Callable[[int, int, nn.Module], None] | None, snapshot_steps: Collection[int]) -> dict:
    """One pass over a seeded permutation of the data; the epoch's record, also printed."""
    _sync(steps.device)
    t0 = time.perf_counter()
    perm = torch.randperm(data.n, device=steps.device, generator=gen)
    first = len(log.losses)
    for i in range(data.steps_per_epoch):
        x, y = data.batch(perm, i, cfg, gen)
        loss, logits = steps.step(x, y)
        if snapshot is not None and len(log.losses) + 1 in snapshot_steps:
            snapshot(len(log.losses) + 1, epoch + 1, _shipped_copy(steps.model, steps.ema))
        log.losses.append(loss.detach())
        log.corrects.append((logits.detach().argmax(1) == y).sum())
        log.bar.update(1)
        if cfg.progress and ((i + 1) % cfg.log_every == 0 or i + 1 == data.steps_per_epoch):
            seen = (len(log.losses) - first) * data.bs
            mean_loss, correct = log.since(first)
            log.bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs} loss {mean_loss:.4f} acc {correct / seen:.4f} "
                                    f"{seen / (time.perf_counter() - t0):.0f} img/s", refresh=False)
    _sync(steps.device)
    seconds = time.perf_counter() - t0
    images = data.steps_per_epoch * data.bs
    ep_loss, correct = log.since(first)
    record = {"epoch": epoch + 1, "loss": ep_loss, "acc": correct / images, "seconds": seconds,
              "images_per_s": images / seconds}
    # Epoch lines are printed with or without the progress bar (--no-progress drops only the bar).
    log.bar.write(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {ep_loss:.4f}  train acc {100 * record['acc']:6.2f}%  "
                  f"{seconds:7.1f} s  {images / seconds:8.0f} img/s  lr {steps.lr:.4f}", file=sys.stderr)
    return record


def _shipped_copy(model: nn.Module, ema: WeightEMA | None) -> nn.Module:
    """A copy of the weights as the run would ship them now, in eval mode, on the CPU, in contiguous format."""
    copy = deepcopy(model)
    if ema is not None:
        ema.copy_to(copy)
    return copy.eval().cpu().to(memory_format=torch.contiguous_format)


def total_steps(n: int, batch_size: int, epochs: int) -> int:
    """Steps of a run over ``n`` images: full batches only (one batch of all when fewer than ``batch_size``)."""
    return n // min(batch_size, n) * epochs if n else 0


def snapshot_steps(total: int, count: int) -> list[int]:
    """``count`` training steps from 1 to ``total``, spaced evenly in log(step): the early steps change most.

    Fewer when rounding makes two equal (a short run); always ends with ``total``.
    """
    if count < 1 or total < 1:
        return []
    if count == 1:
        return [total]
    return sorted({max(1, min(total, round(total ** (i / (count - 1))))) for i in range(count)})


# --- command line -------------------------------------------------------------------------------


def _data_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:20000]
    x = images[pick].float().div(255).transpose(0, 1).flatten(1)  # (N, C, H, W) -> (C, N*H*W)
    return tuple(round(float(v), 4) for v in x.mean(1)), tuple(round(float(v), 4) for v in x.std(1))


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m resnet_demo.training.train", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", required=True, help="ImageFolder dir or .tar.gz (train/ and test/ inside), torchvision:cifar10|mnist"
    )
    p.add_argument("--download", action="store_true", help="let torchvision download its data set (needs internet)")
    p.add_argument("--name", required=True, help="output name: <out-dir>/<name>.safetensors and .json")
    p.add_argument(
        "--dataset-name", default=None, help="data set as written in the card (default: from the classes and source)"
    )
    p.add_argument(
        "--config",
        default="tutorial",
        choices=sorted(CONFIGS),
        help="model config (default: tutorial, the tutorial's Net)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--wd", type=float, default=d.wd, help=f"weight decay on conv/linear weights (default {d.wd})")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--warmup", type=float, default=d.warmup, help="share of steps of linear lr warm-up")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (default: on for photos, off for MNIST digits)",
    )
    p.add_argument("--crop-pad", type=int, default=d.crop_pad, help="reflect padding for random crops, pixels (0: off)")
    p.add_argument("--cutout", type=int, default=d.cutout, help="cutout square side in pixels (0: off)")
    p.add_argument(
        "--ema", type=float, default=d.ema, help="decay of a weight EMA used as the final model, e.g. 0.999 (0: off)"
    )
    p.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA only)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    p.add_argument("--limit", type=int, default=None, help="train on a fixed random subset of N training images")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on a fixed random subset of N test images")
    p.add_argument("--test-split", default="test", help="split folder used for the card's accuracy (default: test)")
    p.add_argument(
        "--out-dir", default=str(WEIGHTS_DIR), help="where to write the weights and card (default: weights/)"
    )
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="decoded-data cache (default: data/cache)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (epoch lines are still printed)")
    p.add_argument("--snapshots", type=int, default=0,
                   help="also save this many snapshots of the weights, log-spaced over the steps (a training timeline)")
    p.add_argument("--snapshot-dir", default=None, help="where the snapshots go (default: <out-dir>/<name>_timeline)")
    return p


@dataclass
class _Run:
    """One training run as the command line describes it: data, model config, recipe and where it goes."""

    train_set: ImageSet
    test_set: ImageSet
    test_split: str
    full_train: int  # training images available before --limit
    config: ResNetConfig
    recipe: TrainConfig
    preset: Preset | None
    dataset: str  # as written in the card
    device: torch.device


def main(argv: Sequence[str] | None = None) -> ModelCard:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    command = "python -m resnet_demo.training.train " + shlex.join(argv)
    t_start = time.perf_counter()
    try:
        import safetensors  # noqa: F401 - checked now rather than after the training
    except ImportError:
        p.exit(2, "error: the safetensors package is needed to write the weights: pip install safetensors\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run = _plan(args)
    except (DataError, ValueError) as exc:
        p.exit(2, f"error: {exc}\n")
    torch.manual_seed(args.seed)
    model = build_model(run.config)
    print(
        f"training {args.config} ({count_parameters(model):,} parameters) on {run.dataset}: "
        f"{len(run.train_set.labels)} of {run.full_train} training images, {run.recipe.epochs} epochs, "
        f"batch {run.recipe.batch_size}, lr {run.recipe.lr}, on {run.device}",
        file=sys.stderr,
    )
    out = Path(args.out_dir) / f"{args.name}.safetensors"
    steps = snapshot_steps(total_steps(len(run.train_set.labels), run.recipe.batch_size, run.recipe.epochs),
                           args.snapshots)
    folder = Path(args.snapshot_dir) if args.snapshot_dir else out.with_name(f"{args.name}_timeline")
    saver = _Snapshots(args.name, run, folder, command, args.data, steps[-1] if steps else 0) if steps else None
    history = train(model, run.train_set.images, run.train_set.labels, run.recipe, run.device,
                    snapshot=saver, snapshot_steps=set(steps))
    card = save_weights(model, _card(args.name, run, _training_record(run, history, command, args.data)), out)
    try:
        _judge(card, out, run)
    except WeightsError as exc:
        p.exit(1, f"error: the weights just written do not load back: {exc}\n")
    card.training["total_wall_time_s"] = round(time.perf_counter() - t_start, 2)
    card.write(out.with_suffix(".json"))  # the weights are unchanged, so is their sha256
    return card


def _plan(args: argparse.Namespace) -> _Run:
    """Read the data and decide the model config, the recipe and the card's data-set name.

    Raises:
        DataError: the data cannot be read, or its splits disagree on the classes.
        ValueError: the device is not available.
    """
    device = pick_device(args.device)
    train_set = load_data(args.data, "train", cache_dir=args.cache_dir, download=args.download)
    test_set = load_data(args.data, args.test_split, cache_dir=args.cache_dir, download=args.download)
    if train_set.classes != test_set.classes:
        raise DataError(f"train classes {train_set.classes} differ from {args.test_split} classes {test_set.classes}")
    full_train = len(train_set.labels)
    train_set, test_set = subset(train_set, args.limit), subset(test_set, args.eval_limit)
    classes, channels = train_set.classes, train_set.images.shape[1]
    preset = preset_for(classes, channels)
    mean, std = (preset.mean, preset.std) if preset else _data_stats(train_set.images)
    config = dataclasses.replace(CONFIGS[args.config], num_classes=len(classes))
    if len(mean) == 1 and config.in_channels > 1:
        mean, std = mean * config.in_channels, std * config.in_channels  # gray replicated to every input channel
    photo = preset is None or preset.input_kind == "photo"
    recipe = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, wd=args.wd,
        label_smoothing=args.label_smoothing, warmup=args.warmup, flip=photo if args.flip is None else args.flip,
        crop_pad=args.crop_pad, cutout=args.cutout, ema=args.ema, amp=args.amp, compile=args.compile,
        seed=args.seed, mean=tuple(mean), std=tuple(std), progress=not args.no_progress,
    )
    if args.dataset_name:
        dataset = args.dataset_name
    elif args.data.startswith("torchvision:"):
        dataset = preset.dataset if preset else args.data
    else:
        source = Path(args.data).name
        dataset = f"{preset.dataset} ({source})" if preset else source
    return _Run(train_set, test_set, args.test_split, full_train, config, recipe, preset, dataset, device)


def _training_record(run: _Run, history: dict, command: str, data: str) -> dict:
    """The card's ``training`` field: the recipe, what it cost, where it ran and the command that repeats it."""
    cfg, epochs = run.recipe, history["epochs"]
    return {
        "epochs": cfg.epochs,
        "batch_size": history["batch_size"],
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "nesterov": True,
        "weight_decay": cfg.wd,
        "label_smoothing": cfg.label_smoothing,
        "schedule": f"linear warm-up over {cfg.warmup:.0%} of the steps, then linear decay to 0 (per step)",
        "optimizer": "SGD",
        "flip": cfg.flip,
        "crop_pad": cfg.crop_pad,
        "cutout": cfg.cutout,
        "ema": cfg.ema,
        "precision": "bf16 autocast" if history["amp"] else "fp32",
        "channels_last": cfg.channels_last,
        "compile": cfg.compile,
        "seed": cfg.seed,
        "train_images": len(run.train_set.labels),
        "train_images_available": run.full_train,
        "steps": history["steps"],
        "final_train_loss": epochs[-1]["loss"] if epochs else None,
        "final_train_acc": epochs[-1]["acc"] if epochs else None,
        "wall_time_s": round(history["train_seconds"], 2),
        "images_per_s": round(history["images_per_s"], 1),
        "hardware": device_name(run.device),
        "device": str(run.device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "command": command,
        "data": data,
    }


class _Snapshots:
    """Saves one snapshot of a run: fp16 weights and a card with its step, epoch and the test accuracy
    measured on the file as saved (``<folder>/step-000123.safetensors`` and ``.json``)."""

    def __init__(self, name: str, run: _Run, folder: Path, command: str, data: str, total: int) -> None:
        self.name, self.run, self.folder, self.command, self.data, self.total = name, run, folder, command, data, total

    def __call__(self, step: int, epoch: int, weights: nn.Module) -> None:
        path = self.folder / f"step-{step:06d}.safetensors"
        training = {"run": self.name, "step": step, "epoch": epoch, "steps": self.total, "command": self.command,
                    "data": self.data, "hardware": device_name(self.run.device)}
        card = save_weights(weights, _card(f"{self.name} @ step {step}", self.run, training), path)
        _judge(card, path, self.run, quiet=True)
        card.write(path.with_suffix(".json"))


def _card(name: str, run: _Run, training: dict) -> ModelCard:
    size = int(run.train_set.images.shape[-1])
    channels = run.train_set.images.shape[1]
    return ModelCard(
        name=name,
        classes=list(run.train_set.classes),
        mean=[float(v) for v in run.recipe.mean],
        std=[float(v) for v in run.recipe.std],
        arch="resnet",
        config=run.config.to_dict(),
        input_size=size,
        resize=size,
        colour_mode=run.preset.colour_mode if run.preset else ("rgb" if channels == 3 else "gray"),
        input_kind=run.preset.input_kind if run.preset else "photo",
        dataset=run.dataset,
        trained=True,
        training=training,
    )


def _judge(card: ModelCard, out: Path, run: _Run, *, quiet: bool = False) -> None:
    """Fill the card's test metrics from the file as shipped: fp16 weights and fp32 BN statistics, read back.

    Raises:
        WeightsError: the file just written does not load back.
    """
    shipped, _ = load_model(out)
    flip = run.recipe.flip  # flip TTA only for a model trained with flips: a mirrored digit is another glyph
    result = evaluate(shipped, run.test_set.images, run.test_set.labels, card, run.device, tta=flip)
    card.metrics = {
        "test_acc": round(result["accuracy"], 5),
        "test_acc_tta": round(result["accuracy_tta"], 5) if flip else None,
        "test_images": result["n"],
        "test_split": run.test_split,
        "tta": "horizontal flip: mean of the logits of the image and its mirror" if flip
        else "none: the model was trained without flips",
        "per_class_acc": {c: round(v, 4) for c, v in result["per_class"].items()},
    }
    if quiet:
        return
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB) and {out.with_suffix('.json').name}: "
        f"test accuracy {100 * result['accuracy']:.2f}%"
        + (f", flip TTA {100 * result['accuracy_tta']:.2f}%" if flip else "")
        + f" on {result['n']} images; training {card.training['wall_time_s']:.1f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
