"""torchvision ResNets: block discovery, capture values, loading user weights, never downloading.

Every model here is randomly initialised (``weights=None``); nothing is fetched from the network. A user's
torchvision checkpoint goes the way of every checkpoint (:func:`~resnet_demo.core.weights.load.open_checkpoint`:
read, recognised or as ``arch`` says, fitted); only torchvision's published weights have a path of their own.
"""

import socket

import numpy as np
import pytest
import torch
import torchvision
from conftest import randomise_bn
from PIL import Image

from resnet_demo.core.capture import capture_forward, find_blocks
from resnet_demo.core.explorer import Explorer
from resnet_demo.core.metrics import block_metrics
from resnet_demo.core.weights.cards import WeightsError, imagenet_classes
from resnet_demo.core.weights.files import save_weights
from resnet_demo.core.weights.load import load_model, open_checkpoint
from resnet_demo.core.weights.recognise import recognise
from resnet_demo.core.weights.torchvision_resnets import (
    SUPPORTED_ARCHS,
    TORCHVISION_ARCHS,
    build_torchvision,
    imagenet_card,
    published_torchvision,
)


def load_torchvision(arch, weights, **kwargs):
    """A torchvision checkpoint as ``--arch arch --weights weights`` opens it: messages name the path as given."""
    return open_checkpoint(weights, arch=arch, source=f"checkpoint {weights}", **kwargs)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _random(arch, seed=0, **kw):
    torch.manual_seed(seed)
    return randomise_bn(build_torchvision(arch, **kw), seed=seed)


@pytest.fixture(scope="module")
def r18():
    return _random("resnet18")


@pytest.fixture(scope="module")
def r50():
    return _random("resnet50", seed=1)


@pytest.fixture(scope="module")
def r18_file(r18, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "my_resnet18.pth"
    torch.save(r18.state_dict(), path)
    return path


def _branch(block, x):
    """F(x) computed by hand from the block's own layers (torchvision's ReLU is in place, hence clone)."""
    out = block.relu(block.bn1(block.conv1(x)).clone())
    if hasattr(block, "conv3"):
        out = block.relu(block.bn2(block.conv2(out)).clone())
        return block.bn3(block.conv3(out))
    return block.bn2(block.conv2(out))


# --- block discovery ------------------------------------------------------------------------------


def test_resnet18_blocks_named_as_torchvision_names_them(r18):
    specs = find_blocks(r18)
    assert [s.name for s in specs] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert [s.stage for s in specs] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [s.shortcut is not None for s in specs] == [False, False, True, False, True, False, True, False]
    assert all(s.branch_end is s.module.bn2 for s in specs)


def test_resnet50_has_16_bottlenecks_in_stages_3_4_6_3(r50):
    specs = find_blocks(r50)
    assert len(specs) == 16
    assert [s.name for s in specs] == [f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)]
    assert [s.stage for s in specs] == [1] * 3 + [2] * 4 + [3] * 6 + [4] * 3
    assert "layer3.4" in [s.name for s in specs]
    assert all(s.branch_end is s.module.bn3 for s in specs)
    # layer1.0 widens 64 -> 256, so it has a projection too: one per stage
    assert [s.name for s in specs if s.shortcut is not None] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]


# --- capture values --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_capture_gives_pre_add_branch_and_true_shortcut(arch, r18, r50):
    model = {"resnet18": r18, "resnet50": r50}[arch]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        bare = model(x)
    before = hook_count(model)
    logits, records = capture_forward(model, x)
    assert torch.equal(bare, logits)  # capturing does not change the result
    assert hook_count(model) == before == 0  # and leaves no hooks behind

    specs = find_blocks(model)
    assert [r.name for r in records] == [s.name for s in specs]
    with torch.inference_mode():
        for spec, r in zip(specs, records):
            assert r.f.shape == r.s.shape == r.y.shape
            torch.testing.assert_close(r.y, torch.relu(r.f + r.s), rtol=0, atol=1e-5)
            # F is the branch before torchvision's in-place `out += identity`, not F + s:
            torch.testing.assert_close(r.f, _branch(spec.module, r.x), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(r.f, r.f + r.s, atol=1e-3)
            assert (r.f < 0).any()  # a post-add/post-ReLU capture could not be negative
            if spec.shortcut is None:
                assert torch.equal(r.s, r.x)
            else:
                torch.testing.assert_close(r.s, spec.module.downsample(r.x), rtol=0, atol=0)
                assert r.s.shape != r.x.shape
            # x is the block's untouched input: the previous block's y
        for prev, nxt in zip(records, records[1:]):
            assert torch.equal(prev.y, nxt.x)

    rows = block_metrics(records)
    assert len(rows) == 2 and len(rows[0]) == len(specs)
    for m in rows[0]:
        assert np.isfinite([m.ratio, m.cosine, m.norm_x, m.norm_f, m.norm_y, m.active]).all()
        assert m.ratio > 0 and -1 <= m.cosine <= 1 and 0 <= m.active <= 1


def test_lesion_on_torchvision_block_leaves_relu_of_shortcut(r18):
    x = torch.randn(1, 3, 64, 64)
    _, records = capture_forward(r18, x, lesion=["layer3.0"])
    r = {r.name: r for r in records}["layer3.0"]
    assert torch.count_nonzero(r.f) == 0
    torch.testing.assert_close(r.y, torch.relu(r.s), rtol=0, atol=0)
    assert hook_count(r18) == 0


# --- the model card and building -------------------------------------------------------------------


def test_imagenet_card_and_class_names():
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[-1] == "toilet tissue"
    card = imagenet_card("resnet50")
    assert card.arch == "resnet50" and card.config is None and card.name == "resnet50"
    assert (card.input_size, card.resize, card.colour_mode, card.input_kind) == (224, 256, "rgb", "photo")
    assert card.mean == [0.485, 0.456, 0.406] and card.std == [0.229, 0.224, 0.225]
    assert card.dataset == "ImageNet-1k" and card.classes == names


def test_unknown_arch_lists_the_supported_ones():
    with pytest.raises(ValueError, match="resnet18.*resnet152"):
        build_torchvision("resnet19")
    with pytest.raises(ValueError, match="supported"):
        published_torchvision("vgg16", download=True)
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'; choose one of tutorial, resnet, resnet18"):
        recognise(build_torchvision("resnet18").state_dict(), "vgg16")


def test_every_supported_arch_is_recognised_from_its_keys_and_shapes():
    for arch in SUPPORTED_ARCHS:
        with torch.device("meta"):
            sd = torchvision.models.get_model(arch, weights=None, num_classes=10).state_dict()
        found = recognise(sd)
        assert (found.kind, found.num_classes, found.stem_kernel, found.maxpool) == (arch, 10, 7, True)
    assert set(TORCHVISION_ARCHS) <= set(SUPPORTED_ARCHS)


# --- loading weights -------------------------------------------------------------------------------


def test_state_dict_file_round_trips(r18, r18_file):
    model, card = load_torchvision("resnet18", r18_file)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    assert card.arch == "resnet18" and card.classes == imagenet_classes() and card.weights_sha256
    assert (card.input_size, card.resize, card.dataset) == (224, 256, "ImageNet-1k")  # from its 7×7 stem
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), r18(x))
    recognised, _ = open_checkpoint(r18_file)  # without --arch: the same network
    with torch.inference_mode():
        assert torch.equal(recognised(x), r18(x))


def test_safetensors_file_round_trips(r50, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in r50.state_dict().items()}, str(path))
    model, card = load_torchvision("resnet50", path)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), r50(x))
    assert card.name.startswith("r50") and card.input_size == 224


def test_checkpoint_without_num_batches_tracked_loads(r18, tmp_path):
    # torchvision's own published V1 files predate BN's num_batches_tracked counter.
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in r18.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    model, _ = load_torchvision("resnet18", path)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), r18(x))


def test_wrong_arch_names_both_and_suggests_the_right_one(r18_file, tmp_path):
    with pytest.raises(WeightsError) as err:
        load_torchvision("resnet50", r18_file)
    assert str(err.value) == (
        f"checkpoint {r18_file} does not fit torchvision resnet50 (as asked): key 'layer1.0.conv1.weight' has shape "
        "[64, 64, 3, 3] where resnet50 has [64, 64, 1, 1]; it fits torchvision resnet18 instead")

    path = tmp_path / "r34.pth"
    torch.save(_random("resnet34").state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit torchvision resnet18 \(as asked\).*; it fits torchvision "
                                           r"resnet34 instead$") as err:
        load_torchvision("resnet18", path)
    assert str(path) in str(err.value)


def test_right_layout_with_nan_values_is_refused(r18, tmp_path):
    sd = {k: v.clone() for k, v in r18.state_dict().items()}
    sd["layer2.1.conv2.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        load_torchvision("resnet18", path)
    assert str(err.value) == (
        f"checkpoint {path} was refused because key 'layer2.1.conv2.weight' holds 1 NaN or infinite value "
        "(of 147,456): a model with non-finite weights cannot give a meaningful prediction")


def test_not_a_resnet_checkpoint_is_described(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(WeightsError) as err:
        load_torchvision("resnet18", path)
    assert str(err.value) == (
        f"checkpoint {path} does not fit torchvision resnet18 (as asked): key 'conv1.weight' is missing (where "
        "resnet18 has [64, 3, 7, 7]); it is not a ResNet checkpoint read here (its first keys are 'encoder.weight')")


def test_fine_tune_with_other_class_count(tmp_path):
    ft = _random("resnet18", num_classes=7)
    path = tmp_path / "ft.pth"
    torch.save(ft.state_dict(), path)
    model, card = load_torchvision("resnet18", path)
    assert card.classes == [f"class {i}" for i in range(7)]
    assert model.fc.out_features == 7

    names = [f"cat{i}" for i in range(7)]
    _, card = load_torchvision("resnet18", path, class_names=names)
    assert card.classes == names

    with pytest.raises(WeightsError, match=r"^2 class names were given, but the checkpoint's classifier has 7 "
                                           r"classes$"):
        load_torchvision("resnet18", path, class_names=["a", "b"])


def test_no_weights_and_no_download_is_a_clear_error():
    with pytest.raises(WeightsError, match="--download-weights"):
        published_torchvision("resnet50")


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly on any download attempt; records the attempts."""
    import torchvision._internally_replaced_utils as tv_utils
    import torchvision.models._api as tv_api

    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(tv_utils, "load_state_dict_from_url", refuse)
    if hasattr(tv_api, "load_state_dict_from_url"):
        monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return calls


def test_nothing_is_downloaded_without_opt_in(no_network, r18_file):
    from resnet_demo.view.registry import CUSTOM, Registry

    build_torchvision("resnet18")
    load_torchvision("resnet18", r18_file)
    registry = Registry([])
    registry.add_custom(str(r18_file), "resnet18", device="cpu", download=True)  # a file wins over the flag
    assert registry.get(CUSTOM).card.arch == "resnet18"
    with pytest.raises(WeightsError):
        published_torchvision("resnet18")
    assert no_network == []


def test_download_opt_in_uses_torchvision_published_weights(monkeypatch, r18):
    from torchvision.models._api import WeightsEnum

    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return r18.state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    model, card = published_torchvision("resnet18", download=True)
    assert [str(c) for c in calls] == ["ResNet18_Weights.IMAGENET1K_V1"]
    assert card.resize == 256 and card.input_size == 224 and card.metrics["acc@1"] > 60
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), r18(x))


def test_failed_download_is_a_weights_error(no_network):
    with pytest.raises(WeightsError, match="could not download.*resnet18.*--weights"):
        published_torchvision("resnet18", download=True)


def test_card_beside_weights_loads_through_load_model(r18, tmp_path):
    path = tmp_path / "r18.safetensors"
    save_weights(r18, imagenet_card("resnet18"), path, half=False)
    model, card = load_model(path)
    assert card.arch == "resnet18" and len(card.classes) == 1000
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), r18(x))


# --- end to end ------------------------------------------------------------------------------------


def test_explorer_analyses_a_photo_with_resnet18(r18):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    explorer = Explorer(r18, imagenet_card("resnet18"), device="cpu")
    result = explorer.analyze(img)
    assert result.input.shape == (1, 3, 224, 224)
    assert result.logits.shape == (1000,)
    assert [m.name for m in result.metrics] == explorer.block_names == [b.name for b in result.blocks]
    assert len(result.metrics) == 8
    assert len(result.predictions) == 5
    assert all(p.label in imagenet_classes() for p in result.predictions)
    total = sum(p.prob for p in result.predictions)
    assert 0 < total <= 1 + 1e-6
    assert result.blocks[-1].y.shape == (1, 512, 7, 7)
    assert hook_count(r18) == 0
