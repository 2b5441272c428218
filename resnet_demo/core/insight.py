"""What the residual blocks contribute: block lesions, per-block readout, Grad-CAM.

- **Lesion** (Veit et al. 2016, "Residual networks behave like ensembles of relatively shallow
  networks"): a lesioned block computes ``y = relu(s(x))``, its branch removed. Graded: its branch
  scaled by ``alpha``, ``y = relu(alpha * F(x) + s(x))`` (0 the lesion, 1 intact). Done with the
  capture's thread-scoped hooks for one forward pass; the shared model is never modified.
- **Readout**: the classifier head (global pool + linear) applied to the output of every block whose
  width equals the head's input width, showing how the prediction forms with depth. The last block's
  readout is the model's own logits.
- **Grad-CAM** (Selvaraju et al. 2017): ``relu(sum_c w_c A_c)`` with ``A`` a block's output and
  ``w_c`` the spatial mean of d logit / d A_c, upsampled to the input's size and min-max normalised
  (0 the least evidence for the class on this image, 1 the most), as pytorch-grad-cam and most CAM
  tools show it. Its hook, like the
  capture's, acts only for the calling thread and is removed in ``finally``; gradients are taken with
  :func:`torch.autograd.grad`, so no parameter's ``.grad`` is touched.

All functions work for any model :func:`~resnet_demo.core.capture.find_blocks` understands: the project's
:class:`~resnet_demo.core.model.ResNet`, torchvision's, timm's (ResNet and ResNetV2) and transformers' ResNets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .capture import BlockRecord, capture, capture_forward, find_blocks
from .metrics import Prediction, topk

__all__ = [
    "LesionResult",
    "Readout",
    "ReadoutResult",
    "gradcam",
    "head_of",
    "head_width",
    "lesion",
    "lesion_sweep",
    "readout",
]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _one_image(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (1, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x


def _pred_dict(p: Prediction) -> dict:
    return {"label": p.label, "index": p.index, "prob": p.prob}


# --- lesions ---------------------------------------------------------------------------------------


@dataclass
class LesionResult:
    """One image through the network with ``lesioned`` blocks' branches removed (``alpha`` 0) or scaled by
    ``alpha``.

    ``orig_*`` refer to the intact network's top-1 class; ``delta`` is its probability after minus
    before; ``kl`` is KL(intact || lesioned) of the softmax distributions, in nats.
    """

    lesioned: tuple[str, ...]
    logits: torch.Tensor  # (classes,) float32, CPU
    predictions: list[Prediction]
    intact_predictions: list[Prediction]
    orig_index: int
    orig_label: str
    p_orig_top1_before: float
    p_orig_top1_after: float
    delta: float
    kl: float
    alpha: float = 0.0  # the factor of the lesioned blocks' branches: 0 removes them, 1 leaves them intact

    @property
    def top1_changed(self) -> bool:
        return self.predictions[0].index != self.orig_index

    def to_dict(self) -> dict:
        return {
            "lesioned": list(self.lesioned),
            "alpha": self.alpha,
            "logits": self.logits.tolist(),
            "predictions": [_pred_dict(p) for p in self.predictions],
            "intact_predictions": [_pred_dict(p) for p in self.intact_predictions],
            "orig_index": self.orig_index,
            "orig_label": self.orig_label,
            "p_orig_top1_before": self.p_orig_top1_before,
            "p_orig_top1_after": self.p_orig_top1_after,
            "delta": self.delta,
            "kl": self.kl,
            "top1_changed": self.top1_changed,
        }


def _forward(model: nn.Module, x: torch.Tensor, lesioned: tuple[str, ...], alpha: float = 0.0) -> torch.Tensor:
    with torch.inference_mode(), capture(model, scale=dict.fromkeys(lesioned, alpha), record=False):
        return model(x.to(_device(model)))[0].float().cpu()


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    logp = torch.log_softmax(p_logits.double(), dim=0)
    logq = torch.log_softmax(q_logits.double(), dim=0)
    return float((logp.exp() * (logp - logq)).sum().clamp_min(0.0))


def _lesion_result(
    lesioned: tuple[str, ...],
    logits: torch.Tensor,
    intact: torch.Tensor,
    classes: Sequence[str],
    k: int,
    alpha: float,
) -> LesionResult:
    intact_preds = topk(intact, list(classes), k)
    orig = intact_preds[0].index
    # float32 softmax, as in topk, so these equal the probabilities shown in the top-k lists.
    before = float(torch.softmax(intact.float(), dim=0)[orig])
    after = float(torch.softmax(logits.float(), dim=0)[orig])
    return LesionResult(
        lesioned=lesioned,
        logits=logits,
        predictions=topk(logits, list(classes), k),
        intact_predictions=intact_preds,
        orig_index=orig,
        orig_label=classes[orig],
        p_orig_top1_before=before,
        p_orig_top1_after=after,
        delta=after - before,
        kl=_kl(intact, logits),
        alpha=alpha,
    )


def lesion(
    model: nn.Module,
    x: torch.Tensor,
    blocks: Iterable[str],
    classes: Sequence[str],
    k: int = 5,
    intact_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> LesionResult:
    """Run one image with the branches of ``blocks`` removed (``y = relu(s(x))``), or scaled by ``alpha``
    (``y = relu(alpha * F(x) + s(x))``), for this call only.

    Args:
        model: the shared model, in eval mode; it is not modified.
        x: one prepared image, (1, C, H, W) or (C, H, W).
        blocks: names of blocks to lesion (as :func:`find_blocks` names them); empty for the intact net.
        classes: class names, in logit order.
        k: how many predictions to return.
        intact_logits: the intact network's logits for ``x`` if already known (saves a forward pass).
        alpha: the factor of the branches of ``blocks``: 0 (the default) is the lesion, 1 the intact
            network exactly; in between and above, a graded intervention.

    Raises:
        KeyError: a name in ``blocks`` is not a block of ``model``.
        ValueError: ``alpha`` is not a finite number.
    """
    x = _one_image(x)
    names = tuple(dict.fromkeys([blocks] if isinstance(blocks, str) else blocks))
    logits = _forward(model, x, names, alpha)
    if intact_logits is None:
        intact = logits if not names or alpha == 1 else _forward(model, x, ())
    else:
        intact = intact_logits.detach().reshape(-1).float().cpu()
    return _lesion_result(names, logits, intact, classes, k, float(alpha))


def lesion_sweep(
    model: nn.Module,
    x: torch.Tensor,
    classes: Sequence[str],
    k: int = 5,
    intact_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> list[LesionResult]:
    """Lesion (or scale by ``alpha``) each block alone, in forward order: one :class:`LesionResult` per block."""
    x = _one_image(x)
    intact = _forward(model, x, ()) if intact_logits is None else intact_logits.detach().reshape(-1).float().cpu()
    return [lesion(model, x, [spec.name], classes, k, intact_logits=intact, alpha=alpha) for spec in find_blocks(model)]


# --- per-block readout -----------------------------------------------------------------------------


def head_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's classifier head as a function of a (B, C, H, W) feature map -> (B, classes) logits.

    The project's ResNet, timm's and the project's transformers wrapper provide ``forward_head``;
    torchvision's ResNets have ``avgpool`` and ``fc``. A pre-activation ResNet (timm's ResNetV2) ends its
    features with ``norm`` (BN + ReLU, the activation no block applies to its own sum), which its
    ``forward_head`` does not include: it is applied first, so the last block's readout is the logits.

    Raises:
        ValueError: the model has neither.
    """
    forward_head = getattr(model, "forward_head", None)
    if callable(forward_head):
        norm = getattr(model, "norm", None)
        if isinstance(norm, nn.Module) and _is_timm_resnetv2(model):
            return lambda y: forward_head(norm(y))
        return forward_head
    fc, pool = getattr(model, "fc", None), getattr(model, "avgpool", None)
    if isinstance(fc, nn.Module) and isinstance(pool, nn.Module):
        return lambda y: fc(torch.flatten(pool(y), 1))  # (B, C, H, W) -> (B, C) -> (B, classes)
    raise ValueError(
        f"{type(model).__name__} has no classifier head to read blocks out with: "
        "expected a forward_head method or avgpool and fc modules"
    )


def _is_timm_resnetv2(model: nn.Module) -> bool:
    """Whether ``model`` is timm's ``ResNetV2`` (by class, without importing timm when it is not loaded)."""
    return any(c.__name__ == "ResNetV2" and c.__module__.startswith("timm.") for c in type(model).__mro__)


def head_width(model: nn.Module) -> int:
    """Number of channels the classifier head takes: ``num_features`` where the model says it (timm's models,
    the project's transformers wrapper), else ``fc.in_features``."""
    width = getattr(model, "num_features", None)
    if isinstance(width, int) and not isinstance(width, bool) and width > 0:
        return width
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        return fc.in_features
    raise ValueError(
        f"{type(model).__name__} has no num_features nor a linear 'fc' head whose input width could be read"
    )


@dataclass
class ReadoutResult:
    """The head applied to one block's output."""

    name: str
    stage: int
    logits: torch.Tensor  # (classes,) float32, CPU
    top1: Prediction
    p_final: float  # probability this readout gives the network's final top-1 class
    agrees: bool  # top-1 equals the network's final top-1

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "stage": self.stage,
            "logits": self.logits.tolist(),
            "top1": _pred_dict(self.top1),
            "p_final": self.p_final,
            "agrees": self.agrees,
        }


@dataclass
class Readout:
    """Readouts in forward order, the network's final top-1 and the block where the prediction settles.

    Behaves as the list of its :class:`ReadoutResult` (iterate, index, ``len``).
    """

    blocks: list[ReadoutResult]
    final: Prediction
    settles_at: str | None  # first block from which every readout's top-1 is the final one

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i):
        return self.blocks[i]

    def to_dict(self) -> dict:
        return {
            "final": _pred_dict(self.final),
            "settles_at": self.settles_at,
            "blocks": [b.to_dict() for b in self.blocks],
        }


def readout(
    model: nn.Module,
    source: torch.Tensor | list[BlockRecord] | object,
    classes: Sequence[str],
    *,
    logits: torch.Tensor | None = None,
    index: int = 0,
) -> Readout:
    """Apply the classifier head to every block whose output width matches it.

    Args:
        model: the model the records came from (its head is used; it is not modified).
        source: a prepared input (B, C, H, W) or (C, H, W), run once with capture; or the records of a
            capture; or an :class:`~resnet_demo.core.explorer.Analysis` (its records and logits are used).
        classes: class names, in logit order.
        logits: the network's logits for the image, when ``source`` is records; by default the last
            eligible block's readout stands for them.
        index: which image of the batch.

    Raises:
        ValueError: no block has the head's width, or the model has no usable head.
    """
    if isinstance(source, torch.Tensor):
        x = source.unsqueeze(0) if source.ndim == 3 else source
        out, records = capture_forward(model, x.to(_device(model)))
        logits = out[index] if logits is None else logits
    elif hasattr(source, "blocks") and hasattr(source, "logits"):  # an Analysis
        records, logits = source.blocks, source.logits if logits is None else logits
    else:
        records = list(source)
    head, width = head_of(model), head_width(model)
    device, dtype = _device(model), _dtype(model)
    eligible = [r for r in records if r.y is not None and r.y.shape[1] == width]
    if not eligible:
        raise ValueError(f"no block of {type(model).__name__} outputs {width} channels, the width of its head")
    with torch.inference_mode():
        outs = [head(r.y[index : index + 1].to(device, dtype))[0].float().cpu() for r in eligible]
    final_logits = outs[-1] if logits is None else logits.detach().reshape(-1).float().cpu()
    final = topk(final_logits, list(classes), 1)[0]
    results = []
    for r, out in zip(eligible, outs):
        top1 = topk(out, list(classes), 1)[0]
        p_final = float(torch.softmax(out.float(), dim=0)[final.index])  # as topk computes it
        results.append(ReadoutResult(r.name, r.stage, out, top1, p_final, top1.index == final.index))
    settles_at = None
    for r in reversed(results):
        if not r.agrees:
            break
        settles_at = r.name
    return Readout(results, final, settles_at)


# --- Grad-CAM --------------------------------------------------------------------------------------


def gradcam(model: nn.Module, x: torch.Tensor, block: str, class_index: int | None = None) -> np.ndarray:
    """Grad-CAM of one image at ``block``'s output for ``class_index`` (the predicted class by default).

    Returns:
        (H_in, W_in) float32 map, min-max normalised: ``(cam - min) / (max - min)`` over the upsampled map,
        so 0 is the location with the least evidence for the class and 1 the one with the most. A flat map
        (no location stands out, e.g. none speaks for the class) is all zeros.

    Raises:
        KeyError: ``block`` is not a block of ``model``.
        IndexError: ``class_index`` is out of range.
    """
    specs = {s.name: s for s in find_blocks(model)}
    if block not in specs:
        raise KeyError(f"unknown block {block!r} for Grad-CAM; this model's blocks are {sorted(specs)}")
    x = _one_image(x)
    owner = threading.get_ident()
    kept: dict[str, torch.Tensor] = {}

    def keep_output(_module, _inputs, output):
        if threading.get_ident() == owner:
            kept["a"] = output

    handle = specs[block].module.register_forward_hook(keep_output)
    try:
        # Gradients are needed even when the caller runs under inference mode; the input requires
        # grad so the graph exists when the parameters are frozen.
        with torch.inference_mode(False), torch.enable_grad():
            xin = x.detach().to(_device(model), _dtype(model)).clone().requires_grad_(True)
            logits = model(xin)
            n = logits.shape[1]
            c = int(logits[0].argmax()) if class_index is None else int(class_index)
            if not 0 <= c < n:
                raise IndexError(f"class index {c} out of range for {n} classes")
            a = kept["a"]
            (grad,) = torch.autograd.grad(logits[0, c], a)
        a, grad = a.detach()[0].float(), grad.detach()[0].float()  # (C, h, w)
    finally:
        handle.remove()
    weights = grad.mean(dim=(1, 2))  # (C,)
    cam = torch.relu(torch.einsum("c,chw->hw", weights, a))
    cam = F.interpolate(cam[None, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    # min-max, as pytorch-grad-cam's scale_cam_image (which normalises before resizing; here the map shown
    # is normalised, so it spans exactly 0 to 1)
    low, high = float(cam.min()), float(cam.max())
    cam = (cam - low) / (high - low) if high > low else torch.zeros_like(cam)
    return cam.cpu().numpy().astype(np.float32)
