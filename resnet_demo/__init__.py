"""Residual Block Explorer: see what each residual block of a ResNet does to an image.

The package is in four layers, each a folder (the rules are import-linter contracts in ``.importlinter``):

- :mod:`resnet_demo.core` -- the computation: model, capture, metrics, preprocessing, cards, weights,
  insight tools and :class:`Explorer`, the one service object. No gradio, no drawing.
- :mod:`resnet_demo.view` -- what the page shows: pictures, charts, words, the model registry, export.
- :mod:`resnet_demo.training` -- data sets, training, evaluation and the commands that fill model cards.
- :mod:`resnet_demo.tools` -- measuring the product (benchmark, load test); never imported by it.
"""

__version__ = "0.2.0"

# The capture context manager stays at resnet_demo.core.capture.capture.
from .core.capture import capture_forward, find_blocks
from .core.explorer import Analysis, Explorer
from .core.model import TUTORIAL_CONFIG, ResNet, ResNetConfig, build_model
from .core.preprocess import InputError
from .core.runtime import pick_device
from .core.weights.cards import ModelCard, WeightsError
from .core.weights.load import load_model

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
