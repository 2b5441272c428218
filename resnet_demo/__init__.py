"""Residual Block Explorer: see what each residual block of a ResNet does to an image."""

from .capture import capture, capture_forward, find_blocks
from .checkpoints import ModelCard, WeightsError, load_model
from .explorer import Analysis, Explorer, pick_device
from .model import TUTORIAL_CONFIG, ResNet, ResNetConfig, build_model
from .preprocess import InputError

__all__ = [
    "TUTORIAL_CONFIG",
    "Analysis",
    "Explorer",
    "InputError",
    "ModelCard",
    "ResNet",
    "ResNetConfig",
    "WeightsError",
    "build_model",
    "capture",
    "capture_forward",
    "find_blocks",
    "load_model",
    "pick_device",
]
