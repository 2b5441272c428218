"""Residual Block Explorer: see what each residual block of a ResNet does to an image."""

__version__ = "0.1.0"

# The capture context manager stays at resnet_demo.capture.capture: exporting it here would
# shadow the submodule of the same name.
from .capture import capture_forward, find_blocks
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
    "capture_forward",
    "find_blocks",
    "load_model",
    "pick_device",
]
