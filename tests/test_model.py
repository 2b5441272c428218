import pytest
import torch
from conftest import TINY, TINY_PROJ, randomise_bn
from torch import nn

from resnet_demo.core.model import TUTORIAL_CONFIG, ResidualBlock, ResNetConfig, build_model, count_parameters
from resnet_demo.core.weights.cards import WeightsError, tutorial_card
from resnet_demo.core.weights.files import save_weights
from resnet_demo.core.weights.fitting import from_tutorial_keys, load_weights_into
from resnet_demo.core.weights.load import load_model


def test_tutorial_config_has_exactly_the_tutorials_parameter_count():
    assert count_parameters(build_model(TUTORIAL_CONFIG)) == 5_027_210


def test_tutorial_parameter_count_equals_the_transcribed_net():
    from tutorial_net import Net

    assert count_parameters(build_model()) == count_parameters(Net())


@pytest.mark.parametrize(
    "config, size, classes",
    [(TUTORIAL_CONFIG, 32, 10), (TINY, 16, 10), (TINY_PROJ, 16, 10), (ResNetConfig(in_channels=1, num_classes=7, widths=(4,), blocks=(1,)), 9, 7)],
)
def test_output_shapes(config, size, classes):
    model = build_model(config).eval()
    x = torch.randn(2, config.in_channels, size, size)
    assert model(x).shape == (2, classes)
    assert model.forward_head(model.forward_features(x)).shape == (2, classes)


def test_tutorial_layout_uses_identity_shortcuts_and_transitions():
    model = build_model()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert [b.name for b in blocks] == [f"res{i}" for i in range(1, 10)]
    assert [b.stage for b in blocks] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(isinstance(b.shortcut, nn.Identity) for b in blocks)
    assert isinstance(model.stages[0].transition, nn.Identity)
    assert model.stages[1].transition.conv.stride == (2, 2)


def test_projection_shortcut_only_where_channels_or_stride_change():
    model = build_model(TINY_PROJ)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    kinds = [type(b.shortcut).__name__ for b in blocks]
    assert kinds == ["Identity", "Identity", "Sequential"]
    proj = blocks[2].shortcut
    assert proj.conv.kernel_size == (1, 1) and proj.conv.stride == (2, 2)
    assert (proj.conv.in_channels, proj.conv.out_channels) == (8, 16)
    assert isinstance(proj.bn, nn.BatchNorm2d)
    # A block that widens without striding still needs a projection.
    assert isinstance(ResidualBlock(8, 16, 1).shortcut, nn.Sequential)
    assert isinstance(ResidualBlock(8, 8, 2).shortcut, nn.Sequential)
    assert isinstance(ResidualBlock(8, 8, 1).shortcut, nn.Identity)


def test_no_inplace_relu_anywhere():
    for m in build_model().modules():
        if isinstance(m, nn.ReLU):
            assert not m.inplace


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="equal length"):
        ResNetConfig(widths=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="downsample"):
        ResNetConfig(downsample="pool")


def test_config_round_trips_through_dict():
    assert ResNetConfig.from_dict(TINY_PROJ.to_dict()) == TINY_PROJ


# --- tutorial checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tutorial_checkpoint(tmp_path_factory):
    from tutorial_net import Net

    torch.manual_seed(1)
    net = randomise_bn(Net(), seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tutorial_net.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_tutorial_checkpoint_loads_with_identical_logits(tutorial_checkpoint):
    net, path = tutorial_checkpoint
    model, card = load_model(path)
    assert card.classes[0] == "airplane" and card.arch == "resnet"
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = net(x.clone())
        got = model(x)
    assert torch.equal(got, expected)


def test_tutorial_keys_map_onto_every_project_key(tutorial_checkpoint):
    net, _ = tutorial_checkpoint
    mapped = from_tutorial_keys(net.state_dict())
    assert set(mapped) == set(build_model().state_dict())


def test_missing_key_is_named_in_the_tutorials_terms(tutorial_checkpoint, tmp_path):
    net, _ = tutorial_checkpoint
    sd = dict(net.state_dict())
    del sd["res5.bn2.running_var"]
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as e:
        load_model(path)
    assert str(e.value) == (f"checkpoint {path} fits no supported architecture: closest is the tutorial's Net, but "
                            "key 'res5.bn2.running_var' is missing (where the tutorial's Net has [128])")


def test_shape_mismatch_names_key_and_shapes(tutorial_checkpoint, tmp_path):
    net, _ = tutorial_checkpoint
    sd = dict(net.state_dict())
    sd["fc.weight"] = torch.zeros(100, 256)
    path = tmp_path / "cifar100.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as e:  # the head is read from fc.weight: 100 classes, and fc.bias disagrees
        load_model(path)
    assert str(e.value) == (f"checkpoint {path} fits no supported architecture: closest is the tutorial's Net, but "
                            "key 'fc.bias' has shape [10] where the tutorial's Net has [100]")


def test_a_card_less_checkpoint_of_another_config_is_recognised_not_refused(tmp_path):
    # Without a card, a file is recognised from its keys and shapes (as an upload is), not taken for the tutorial's.
    torch.manual_seed(0)
    tiny = randomise_bn(build_model(TINY))
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    model, card = load_model(path)
    assert card.resnet_config == TINY and card.classes[0] == "airplane"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny(x), rtol=0, atol=1e-5)


def test_wrong_architecture_is_refused(tmp_path):
    sd = build_model(TINY).state_dict()
    sd["stem.conv.weight"] = torch.zeros(8, 3, 5, 5)
    path = tmp_path / "tiny.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as e:
        load_model(path)
    assert str(e.value) == (f"checkpoint {path} fits no supported architecture: closest is this project's ResNet "
                            "(transitions), but key 'stem.conv.weight' has shape [8, 3, 5, 5] where this project's "
                            "ResNet has [8, 3, 3, 3]")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_unreadable_files_raise_weights_error_naming_the_file(tmp_path, content):
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(WeightsError) as e:
            load_model(path)
        assert str(path) in str(e.value)


def test_missing_file_says_where_it_should_be(tmp_path):
    with pytest.raises(WeightsError, match=f"{tmp_path}/nowhere.safetensors not found"):
        load_model(tmp_path / "nowhere.safetensors")


def test_safetensors_round_trip_keeps_bn_statistics_in_fp32(tiny_model, tmp_path):
    card = tutorial_card("tiny")
    card.config = TINY.to_dict()
    path = tmp_path / "tiny.safetensors"
    save_weights(tiny_model, card, path)
    from safetensors.torch import load_file

    raw = load_file(str(path))
    assert raw["stem.bn.running_var"].dtype == torch.float32
    assert raw["stem.conv.weight"].dtype == torch.float16
    model, card2 = load_model(path)
    assert card2 == card and len(card.weights_sha256) == 64
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        # fp16 storage of the weights only: logits agree to fp16 precision.
        torch.testing.assert_close(model(x), tiny_model(x), rtol=1e-2, atol=1e-2)


def test_tampered_weights_fail_the_cards_sha256(tiny_model, tmp_path):
    card = tutorial_card("tiny")
    card.config = TINY.to_dict()
    path = tmp_path / "tiny.safetensors"
    save_weights(tiny_model, card, path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match the sha256"):
        load_model(path)


def test_truncated_safetensors_is_refused(tiny_model, tmp_path):
    card = tutorial_card("tiny")
    card.config = TINY.to_dict()
    path = tmp_path / "tiny.safetensors"
    save_weights(tiny_model, card, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=str(path)):
        load_model(path, verify=False)


def test_nan_weights_are_refused(tmp_path):
    model = build_model(TINY)
    sd = model.state_dict()
    sd["fc.bias"] = torch.full_like(sd["fc.bias"], float("nan"))
    with pytest.raises(WeightsError, match="'fc.bias' holds NaN"):
        load_weights_into(build_model(TINY), sd, source="test weights")
