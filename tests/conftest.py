import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from resnet_demo.core.model import ResNetConfig, build_model  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TINY = ResNetConfig(widths=(8, 16), blocks=(2, 1), name="tiny")
TINY_PROJ = ResNetConfig(widths=(8, 16), blocks=(2, 1), downsample="projection", name="tiny-proj")


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so eval-mode logits test them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return randomise_bn(build_model(TINY))


@pytest.fixture(scope="session")
def seed_model():
    torch.manual_seed(0)
    return randomise_bn(build_model())
