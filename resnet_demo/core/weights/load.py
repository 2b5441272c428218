"""A weights file and its card in, a model of whichever architecture the card names out.

Above both :mod:`.weights` (the project's ResNet and the tutorial's keys) and :mod:`.tv` (torchvision's
ResNets), so that neither needs the other.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..model import build_model
from .cards import ModelCard, WeightsError, tutorial_card
from .files import file_sha256, load_state_dict_file, load_weights_into
from .torchvision_resnets import build_torchvision, fit_torchvision_weights

__all__ = ["load_model"]


def load_model(path: str | Path, *, card: ModelCard | None = None, verify: bool = True) -> tuple[nn.Module, ModelCard]:
    """Load a weights file and its card; returns the model in eval mode on the CPU.

    ``path`` is a project ``.safetensors`` file (its card sits beside it as ``.json``) or a user's
    checkpoint (a tutorial ``Net`` state dict, or a project state dict). Without a card beside it a
    checkpoint is taken to be the tutorial's ``Net`` trained on CIFAR-10, its task in the tutorial.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    card_path = path.with_suffix(".json")
    if card is None:
        card = ModelCard.read(card_path) if card_path.is_file() else tutorial_card(path.stem)
    if verify and card.weights_sha256 and file_sha256(path) != card.weights_sha256:
        raise WeightsError(
            f"weights file {path} does not match the sha256 in its card {card_path}: "
            "the file is corrupt, truncated or was replaced without updating the card"
        )
    sd = load_state_dict_file(path)
    if card.arch != "resnet":
        model = build_torchvision(card.arch, num_classes=len(card.classes))
        fit_torchvision_weights(model, sd, card.arch, source=f"weights file {path}")
    else:
        model = build_model(card.resnet_config)
        load_weights_into(model, sd, source=f"weights file {path}")
    return model.eval(), card
