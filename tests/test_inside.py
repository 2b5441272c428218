"""Inside one residual block (core/inside.py): every step recombines to the captured F(x) and y."""

import json
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_PROJ, randomise_bn
from torch import nn

from resnet_demo.core.capture import BlockSpec, capture_forward, find_blocks
from resnet_demo.core.explorer import Explorer
from resnet_demo.core.inside import UnsupportedBlockError, look_inside, unit
from resnet_demo.core.model import build_model
from resnet_demo.core.weights.cards import CIFAR10, ModelCard

tv = pytest.importorskip("torchvision")


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _transformers(layer_type: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")

    class Logits(nn.Module):  # the library's model as a caller holds it; blocks keep transformers' names below
        def __init__(self) -> None:
            super().__init__()
            config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2],
                                               layer_type=layer_type, num_labels=6)
            self.net = randomise_bn(transformers.ResNetForImageClassification(config))

        def forward(self, x):
            return self.net(x).logits

    return Logits().eval()


def _model(which):
    torch.manual_seed(0)
    if which == "tutorial":
        return randomise_bn(build_model()), (1, 3, 32, 32)
    if which == "tiny-proj":
        return randomise_bn(build_model(TINY_PROJ)), (1, 3, 16, 16)
    if which.startswith("timm "):
        timm = pytest.importorskip("timm")
        name, _, rate = which.removeprefix("timm ").partition(" drop_path=")
        extra = {"drop_path_rate": float(rate)} if rate else {}
        return randomise_bn(timm.create_model(name, pretrained=False, num_classes=6, **extra)), (1, 3, 64, 64)
    if which.startswith("transformers "):
        return _transformers(which.removeprefix("transformers ")), (1, 3, 64, 64)
    return randomise_bn(getattr(tv.models, which)()), (1, 3, 64, 64)


READABLE = ["tutorial", "tiny-proj", "resnet18", "resnet50", "timm resnet18", "timm resnet10t",
            "timm resnet14t drop_path=0.05", "transformers basic", "transformers bottleneck"]


@pytest.fixture(scope="module", params=READABLE)
def captured(request):
    model, shape = _model(request.param)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    _, records = capture_forward(model, x)
    return request.param, model, find_blocks(model), records


def _bn(bn: nn.BatchNorm2d, m: np.ndarray, c: int) -> np.ndarray:
    scale = bn.weight[c] / torch.sqrt(bn.running_var[c] + bn.eps)
    return ((torch.from_numpy(m).double() - bn.running_mean[c]) * scale + bn.bias[c]).detach().numpy()


def _check_chain(block: nn.Module, ins) -> None:
    """Each channel-wise step is its predecessor's map through that layer, for the same channel."""
    modules = dict(block.named_modules())
    for prev, step in zip(ins.steps, ins.steps[1:]):
        layer = modules.get(step.layer) if step.layer else None
        if isinstance(layer, nn.BatchNorm2d):
            assert step.channel == prev.channel
            np.testing.assert_allclose(step.map, _bn(layer, prev.map, step.channel), rtol=1e-6, atol=1e-5)
        elif isinstance(layer, nn.ReLU):
            assert step.channel == prev.channel
            np.testing.assert_array_equal(step.map, np.maximum(prev.map, 0))


def _check_decomposition(block: nn.Module, spec, ins) -> None:
    """The last conv's input channels' contributions, plus its bias, are its output map for the channel."""
    conv = dict(block.named_modules())[ins.last_conv]
    total = ins.contribution_maps.astype(np.float64).sum(0) + ins.bias
    top = np.abs(ins.conv_out).max()
    np.testing.assert_allclose(total, ins.conv_out, rtol=0, atol=1e-6 * max(1.0, top))  # float32 rounding of the model
    assert abs(sum(c.share for c in ins.contributions) - 1) < 1e-9
    mags = [c.magnitude for c in ins.contributions]
    assert mags == sorted(mags, reverse=True)
    assert sorted(c.channel for c in ins.contributions) == list(range(conv.in_channels // conv.groups))
    # and exactly, against the same conv computed in float64 from the incoming map (the previous step's)
    incoming = next(s for s, n in zip(ins.steps, ins.steps[1:]) if n.layer == ins.last_conv)
    assert incoming.channel == ins.contributions[0].channel  # the step before the conv shows its top feeder
    assert ins.steps[[s.layer for s in ins.steps].index(ins.last_conv)].channel == ins.channel


def test_every_step_recombines_to_the_captured_block(captured):
    which, model, specs, records = captured
    modules = dict(model.named_modules())
    for spec, rec in zip(specs, records):
        for c in sorted({0, rec.y.shape[1] // 3, rec.y.shape[1] - 1}):
            ins = look_inside(spec, rec.x, c)
            np.testing.assert_allclose(ins.f, rec.f[0, c].numpy(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(ins.s, rec.s[0, c].numpy(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(np.maximum(ins.f + ins.s, 0), rec.y[0, c].numpy(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(ins.y, rec.y[0, c].numpy(), rtol=0, atol=1e-6)
            np.testing.assert_array_equal(ins.pre, ins.f + ins.s)
            assert all(s.map.base is None for s in ins.steps)  # own arrays: no view keeps an activation alive
            _check_chain(modules[spec.path], ins)
            _check_decomposition(modules[spec.path], spec, ins)
    assert hook_count(model) == 0


def test_the_decomposition_is_exact_in_float64():
    model, _ = _model("resnet50")
    spec = find_blocks(model)[0]  # a Bottleneck with a projection: conv3 is 1x1, 64 -> 256
    block = spec.module
    x = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(3))
    ins = look_inside(spec, x, 7)
    with torch.no_grad():  # conv3's input as the block computes it, then conv3 in float64 over all its channels
        h = block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))
        exact = F.conv2d(h.double(), block.conv3.weight.double())[0, 7].numpy()
    total = ins.contribution_maps.astype(np.float64).sum(0) + ins.bias
    np.testing.assert_allclose(total, exact, rtol=0, atol=1e-12)
    top = ins.contributions[0].channel
    np.testing.assert_allclose(ins.contribution_maps[top], (h[0, top] * block.conv3.weight[7, top, 0, 0]).detach().numpy(),
                               rtol=1e-6, atol=1e-7)


def test_the_layers_are_read_from_the_block():
    model, shape = _model("resnet18")
    _, records = capture_forward(model, torch.randn(shape))
    specs = {s.name: s for s in find_blocks(model)}
    rec = {r.name: r for r in records}
    plain = look_inside(specs["layer1.0"], rec["layer1.0"].x, 3)
    proj = look_inside(specs["layer2.0"], rec["layer2.0"].x, 3)
    assert plain.shortcut == "identity" and proj.shortcut == "projection"
    assert [la.path for la in plain.layers] == ["F"] * 5 + ["out"]
    assert [(la.name, la.path) for la in proj.layers if la.path == "shortcut"] == [
        ("downsample.0", "shortcut"), ("downsample.1", "shortcut")]
    assert proj.layers[-1].name == "relu" and proj.layers[-1].call == 2 and proj.layers[-1].params == 0
    conv1 = proj.layers[0]
    assert conv1.in_shape == (64, 16, 16) and conv1.out_shape == (128, 8, 8) and conv1.params == 128 * 64 * 9
    assert "stride 2" in conv1.kind and "no bias" in conv1.kind
    assert proj.params == sum(p.numel() for p in specs["layer2.0"].module.parameters())
    labels = [s.label for s in proj.steps]
    assert labels == ["x", "conv1", "bn1", "relu", "conv2", "bn2", "s(x)", "F(x)+s(x)", "y"]
    assert [s.space for s in proj.steps] == ["x", "conv1", "conv1", "conv1"] + ["out"] * 5
    assert proj.f_step.label == "bn2" and all(s.comparable for s in proj.steps[-4:])
    assert proj.scale == max(np.abs(s.map).max() for s in proj.steps[-4:])

    bottleneck, shape = _model("resnet50")
    spec = find_blocks(bottleneck)[1]
    ins = look_inside(spec, torch.randn(1, 256, 8, 8), 0)
    assert [s.label for s in ins.steps if s.path == "F"] == ["conv1", "bn1", "relu", "conv2", "bn2", "relu",
                                                             "conv3", "bn3"]
    assert [r.path for r in ins.relus] == ["F", "F", "out"] and ins.last_conv == "conv3"


def test_relu_cut_and_the_shortcut_share_match_a_hand_computation(captured):
    _which, _model_, specs, records = captured
    spec, rec = specs[-1], records[-1]
    c = 1
    ins = look_inside(spec, rec.x, c)
    f, s, y = rec.f[0, c].double(), rec.s[0, c].double(), rec.y[0, c]
    kept = y > 0
    if kept.any():
        hand = float(s.abs()[kept].sum() / (f.abs()[kept].sum() + s.abs()[kept].sum()))
        assert ins.shortcut_share == pytest.approx(hand, abs=1e-9)
    else:
        assert ins.shortcut_share is None
    out = ins.relus[-1]
    pre = (rec.f + rec.s)[0]
    assert out.path == "out" and out.channel == c
    assert out.zeroed == pytest.approx(float((pre[c] < 0).float().mean()))
    assert out.zeroed_all == pytest.approx(float((pre < 0).float().mean()))
    assert out.removed == pytest.approx(float(pre[c].clamp(max=0).abs().sum() / pre[c].abs().sum()))
    share = np.abs(ins.f) / (np.abs(ins.f) + np.abs(ins.s))
    np.testing.assert_allclose(ins.f_share, share, atol=1e-6)


def test_the_same_inside_inference_mode():
    # look_inside tells a reused layer output from one written in place (torchvision's ``out += identity``) by
    # its version counter; inference tensors have none, so there everything is copied: same numbers
    model, _ = _model("resnet18")
    spec = find_blocks(model)[2]
    x = torch.randn(1, 64, 16, 16)
    plain = look_inside(spec, x, 5)
    with torch.inference_mode():
        inferred = look_inside(spec, x, 5)
    assert plain.relus == inferred.relus
    for a, b in zip(plain.steps, inferred.steps):
        np.testing.assert_array_equal(a.map, b.map)
    pre = plain.pre
    assert plain.relus[-1].zeroed == pytest.approx(float((pre < 0).mean()))


def test_one_position_gives_the_numbers_of_its_sum():
    model, shape = _model("tiny-proj")
    _, records = capture_forward(model, torch.randn(shape))
    spec, rec = find_blocks(model)[-1], records[-1]
    ins = look_inside(spec, rec.x, 5)
    u = unit(ins, 2, 3)
    assert (u.f, u.s, u.y) == pytest.approx((float(rec.f[0, 5, 2, 3]), float(rec.s[0, 5, 2, 3]),
                                             float(rec.y[0, 5, 2, 3])), abs=1e-6)
    assert u.pre == pytest.approx(u.f + u.s, abs=1e-6) and u.y == pytest.approx(max(u.pre, 0.0), abs=1e-6)
    assert u.f_share == pytest.approx(abs(u.f) / (abs(u.f) + abs(u.s)), abs=1e-6)
    with pytest.raises(IndexError, match="outside block"):
        unit(ins, 8, 0)
    with pytest.raises(IndexError, match="16 output channels"):
        look_inside(spec, rec.x, 16)
    json.dumps(ins.to_dict(maps=True))  # the API and the export take it as it is


def test_no_hook_is_left_also_when_the_forward_raises():
    model, shape = _model("resnet18")
    spec = find_blocks(model)[0]
    look_inside(spec, torch.randn(1, 64, 8, 8), 0)
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError):
        look_inside(spec, torch.randn(1, 5, 8, 8), 0)  # wrong channel count: conv1 raises inside the hooks
    assert hook_count(model) == 0


def test_an_unknown_block_type_is_refused_by_name():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x) + x)

    block = Custom()
    spec = BlockSpec("odd", 1, "odd", block, block.conv, None)
    with pytest.raises(UnsupportedBlockError, match=r"'odd'.*Custom.*project's ResNet, torchvision ResNet"):
        look_inside(spec, torch.randn(1, 4, 4, 4), 0)
    assert hook_count(block) == 0


@pytest.mark.parametrize(("which", "why"), [
    ("timm seresnet18", r"chain of convolutions, batch norms and ReLUs, and se\.fc1, .* are not"),  # attention inside F
    ("timm resnetv2_18", "pre-activation block"),
])
def test_blocks_it_cannot_read_are_refused_saying_why(which, why):
    model, shape = _model(which)
    _, records = capture_forward(model, torch.randn(shape))
    spec = find_blocks(model)[0]
    with pytest.raises(UnsupportedBlockError, match=why):
        look_inside(spec, records[0].x, 0)
    assert hook_count(model) == 0


def test_labels_stay_readable_where_layers_share_a_name():
    model, shape = _model("transformers bottleneck")
    _, records = capture_forward(model, torch.randn(shape))
    i, spec = next((i, s) for i, s in enumerate(find_blocks(model)) if s.shortcut is not None)
    ins = look_inside(spec, records[i].x, 0)
    labels = [s.label for s in ins.steps if s.path == "F"]
    assert len(set(labels)) == len(labels) == 8 and labels[0].endswith("convolution"), labels
    assert ins.family == "transformers ResNet" and ins.shortcut == "projection"
    assert [la.label for la in ins.layers if la.path == "shortcut"] == ["convolution", "normalization"]


def _tiny_explorer(config=TINY):
    torch.manual_seed(0)
    card = ModelCard.from_preset(CIFAR10, "tiny", config=config.to_dict())
    return Explorer(randomise_bn(build_model(config)), card, "cpu")


def test_the_explorer_looks_inside_an_analysis_and_refuses_a_lesioned_block():
    explorer = _tiny_explorer(TINY_PROJ)
    analysis = explorer.analyze(torch.randn(1, 3, 32, 32))
    ins = explorer.inside(analysis, "res3", 4)
    rec = analysis.blocks[2]
    np.testing.assert_allclose(ins.f, rec.f[0, 4].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ins.y, rec.y[0, 4].numpy(), rtol=0, atol=1e-6)
    assert ins.shortcut == "projection" and ins.block == "res3"
    rec.x = None  # an analysis that kept no block inputs: the explorer records this block's input again
    again = explorer.inside(analysis, "res3", 4)
    np.testing.assert_array_equal(again.y, ins.y)
    with pytest.raises(KeyError, match="res9"):
        explorer.inside(analysis, "res9", 0)
    lesioned = explorer.analyze(torch.randn(1, 3, 32, 32), lesion=["res2"])
    with pytest.raises(ValueError, match="lesioned"):
        explorer.inside(lesioned, "res2", 0)
    assert hook_count(explorer.model) == 0


def test_two_threads_at_once_get_their_own_results():
    explorer = _tiny_explorer()
    images = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    analyses = [explorer.analyze(x) for x in images]
    expected = [explorer.inside(a, "res2", c) for a, c in zip(analyses, (1, 6))]
    barrier, results, errors = threading.Barrier(3), [[], [], []], []

    def inside(i):
        try:
            barrier.wait()
            for _ in range(20):
                results[i].append(explorer.inside(analyses[i], "res2", (1, 6)[i]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def analyse():  # a third request analysing a new image on the same model meanwhile
        try:
            barrier.wait()
            for _ in range(10):
                results[2].append(explorer.analyze(images[0]))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=inside, args=(i,)) for i in range(2)] + [threading.Thread(target=analyse)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(2):
        for got in results[i]:
            assert [s.label for s in got.steps] == [s.label for s in expected[i].steps]
            for a, b in zip(got.steps, expected[i].steps):
                assert a.channel == b.channel
                np.testing.assert_array_equal(a.map, b.map)
    for a in results[2]:  # the analyses saw none of the inside runs
        assert [r.name for r in a.blocks] == [r.name for r in analyses[0].blocks]
        torch.testing.assert_close(a.blocks[1].y, analyses[0].blocks[1].y, rtol=0, atol=0)
    assert hook_count(explorer.model) == 0


# --- the picture and the words (view/inside_view.py) ----------------------------------------------------------


@pytest.fixture(scope="module")
def projection_inside():
    model, shape = _model("resnet18")
    _, records = capture_forward(model, torch.randn(shape, generator=torch.Generator().manual_seed(2)))
    spec = {s.name: s for s in find_blocks(model)}["layer2.0"]
    return look_inside(spec, {r.name: r for r in records}["layer2.0"].x, 12)


def test_the_figure_shows_every_step_and_maps_a_click_to_a_position(projection_inside):
    from resnet_demo.view.inside_view import inside_figure, unit_text

    ins = projection_inside
    fig = inside_figure(ins, cell=88)
    w, h = fig.image.size
    assert fig.image.mode == "RGB" and w >= len(ins.steps) * 88 and 400 < h < 900
    assert set(fig.boxes) == {"bn2", "s(x)", "F(x)+s(x)", "y", "F share"}
    rows, cols = ins.y.shape
    for left, top, right, bottom in fig.boxes.values():
        assert right <= w and bottom <= h
        assert fig.position_at(left, top) == (0, 0)
        assert fig.position_at(right - 1, bottom - 1) == (rows - 1, cols - 1)
        cell_w = (right - left) / cols
        assert fig.position_at(left + 5.5 * cell_w, top + 2.5 * (bottom - top) / rows) == (2, 5)
    assert fig.position_at(0, 0) is None
    assert fig.position_at(*fig.boxes["y"][:2]) == (0, 0)
    text = unit_text(ins, 3, 4)
    u = unit(ins, 3, 4)
    assert f"F = {u.f:.4g}" in text and f"y = {u.y:.4g}" in text and "position (3, 4)" in text


def test_the_sentence_gives_the_shortcut_share_as_a_learner_reads_it(projection_inside):
    from dataclasses import replace

    from resnet_demo.view.inside_view import sentence, step_words, words_markdown

    ins = projection_inside
    assert sentence(replace(ins, block="res4", channel=12, shortcut_share=0.8)) == (
        "In res4, channel 12 of y comes 80% from the shortcut: this block leaves it almost as it was.")
    assert sentence(replace(ins, shortcut_share=0.2)).endswith("comes 80% from the branch F(x): this block rewrites it.")
    assert "60% from the shortcut: the block adjusts" in sentence(replace(ins, shortcut_share=0.6))
    assert "is zero everywhere" in sentence(replace(ins, shortcut_share=None))
    # the real one: the percentage is the hand computation's, rounded
    f, s, y = ins.f.astype(np.float64), ins.s.astype(np.float64), ins.y
    hand = np.abs(s)[y > 0].sum() / (np.abs(f)[y > 0].sum() + np.abs(s)[y > 0].sum())
    p = round(100 * hand)
    assert (f"comes {p}% from the shortcut" if p >= 50 else f"comes {100 - p}% from the branch") in sentence(ins)
    words = step_words(ins)
    assert len(words) == len(ins.steps) and words[0].startswith("x (shown: channel")
    assert "halves the resolution" in words[1] and "projection shortcut" in words[-3]
    assert words_markdown(ins).startswith(f"**{sentence(ins)}**")
