"""Value tests for blocks with a projection shortcut, where s(x) is not x.

For an identity shortcut s is x, so a metric computed with x in place of s (or reported as the other)
cannot be told apart from the right one. Here x, F(x), s(x) and y are computed by hand from the model's
own modules, and the captured records, the metrics and a lesion are checked against them, on data where
||x|| != ||s|| and the cosine against s differs from the cosine with ||x|| in its denominator.
"""

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY_PROJ, randomise_bn
from torch import nn

from resnet_demo.core import insight
from resnet_demo.core.capture import BlockRecord, capture, capture_forward, find_blocks
from resnet_demo.core.metrics import block_metrics, topk
from resnet_demo.core.model import build_model


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return randomise_bn(torchvision.models.resnet18(weights=None), seed=0)


@pytest.fixture(scope="module")
def tiny_proj():
    torch.manual_seed(0)
    return randomise_bn(build_model(TINY_PROJ), seed=0)


def image(seed, shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- hand computations from the models' own modules ------------------------------------------------


def tv_block_input(model, inp, name):
    """The input of torchvision block ``name`` (``layerL.i``), by running the stem and earlier blocks by hand."""
    layer, index = name.split(".")
    with torch.no_grad():
        h = model.maxpool(torch.relu(model.bn1(model.conv1(inp))))
        for lname in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(model, lname)):
                if (lname, str(i)) == (layer, index):
                    return h, block
                h = block(h)
    raise KeyError(name)


def tv_hand(model, inp, name):
    """(x, F, s, y) of a torchvision BasicBlock with a projection: F = bn2(conv2(relu(bn1(conv1(x)))))."""
    x, block = tv_block_input(model, inp, name)
    assert block.downsample is not None
    with torch.no_grad():
        f = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        s = block.downsample(x)
        y = torch.relu(f + s)
        torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-5)  # the hand formula is the block
    return x, f, s, y


def tiny_hand(model, inp):
    """(x, F, s, y) of TINY_PROJ's projection block res3 (stage 2's first block), written out."""
    with torch.no_grad():
        x = model.stages[0].blocks(model.stages[0].transition(model.stem(inp)))
        x = model.stages[1].transition(x)  # nn.Identity in the projection layout
        block = model.stages[1].blocks.res3
        br, sc = block.branch, block.shortcut
        f = br.bn2(br.conv2(torch.relu(br.bn1(br.conv1(x)))))
        s = sc.bn(sc.conv(x))
        y = torch.relu(f + s)
        torch.testing.assert_close(y, block(x), rtol=1e-6, atol=1e-6)
    return x, f, s, y


def hand_metrics(x, f, s, y):
    """The metrics of one image in float64 numpy: ratio and cosine against s, norm_x of x itself."""
    x, f, s, y = (t.double().numpy() for t in (x, f, s, y))
    nx, nf, ns, ny = (np.linalg.norm(t.ravel()) for t in (x, f, s, y))
    dot = float(f.ravel() @ s.ravel())
    return {
        "ratio": nf / ns,
        "cosine": dot / (nf * ns),
        "norm_x": nx,
        "norm_f": nf,
        "norm_y": ny,
        "active": float((y > 0).mean()),
        "channel_f": np.abs(f).mean(axis=(1, 2)),
        # what the reviewer's faults would report, to prove the data tells them apart
        "norm_s": ns,
        "cosine_with_norm_x": dot / (nf * nx),
    }


def check_block(record, metrics, x, f, s, y):
    """The record equals the hand tensors and every metric of every image equals the hand values."""
    torch.testing.assert_close(record.x, x)
    torch.testing.assert_close(record.f, f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(record.s, s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(record.y, y, rtol=1e-5, atol=1e-5)
    assert record.s is not record.x and record.s.shape != record.x.shape
    for img, m in enumerate(metrics):
        # the metrics of the captured tensors, to ~1e-12 (block_metrics computes in float64) ...
        exact = hand_metrics(record.x[img], record.f[img], record.s[img], record.y[img])
        # ... and of the hand-computed tensors, to float32 accuracy
        want = hand_metrics(x[img], f[img], s[img], y[img])
        # The data discriminates: ||x|| and ||s|| differ, so do the two cosines, and the cosine is not ~0.
        # (random weights give |cosine| of 0.01 to 0.2 here; ||s|| / ||x|| is 0.55 to 0.85)
        assert abs(want["norm_x"] - want["norm_s"]) > 0.1 * want["norm_s"]
        assert abs(want["cosine"] - want["cosine_with_norm_x"]) > 0.1 * abs(want["cosine"])
        assert abs(want["cosine"]) > 0.01
        for key in ("ratio", "cosine", "norm_x", "norm_f", "norm_y"):
            assert getattr(m, key) == pytest.approx(exact[key], rel=1e-9), key
            assert getattr(m, key) == pytest.approx(want[key], rel=1e-5), key
        assert m.active == pytest.approx(exact["active"], abs=1e-12)
        assert m.active == pytest.approx(want["active"], abs=2 / y[img].numel())  # one unit may flip at 0
        assert 0 < m.active < 1
        assert m.norm_x != pytest.approx(want["norm_s"], rel=1e-3)
        assert m.cosine != pytest.approx(want["cosine_with_norm_x"], rel=1e-3)
        assert m.channel_f.shape == (f.shape[1],) and m.channel_f.dtype == np.float32
        np.testing.assert_allclose(m.channel_f, exact["channel_f"], rtol=1e-6)
        np.testing.assert_allclose(m.channel_f, want["channel_f"], rtol=1e-4, atol=1e-6)


# --- capture and metrics --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["layer2.0", "layer3.0"])
def test_resnet18_projection_block_records_and_metrics_equal_hand_computation(r18, name):
    inp = image(5, (2, 3, 64, 64))
    x, f, s, y = tv_hand(r18, inp, name)
    logits, records = capture_forward(r18, inp)
    assert hook_count(r18) == 0
    with torch.no_grad():
        torch.testing.assert_close(logits, r18(inp))
    names = [r.name for r in records]
    metrics = block_metrics(records)
    assert len(metrics) == 2 and all(len(row) == len(records) for row in metrics)
    k = names.index(name)
    rec = records[k]
    # the spec says where the block's parts are: its path in the model, its last BN, its projection
    spec = find_blocks(r18)[k]
    block = dict(r18.named_modules())[spec.path]
    assert (spec.name, spec.path) == (name, name) and spec.module is block
    assert spec.branch_end is block.bn2 and spec.shortcut is block.downsample is not None
    assert (rec.name, rec.stage) == (name, int(name[5]))
    assert all((m.name, m.stage) == (rec.name, rec.stage) for m in (metrics[0][k], metrics[1][k]))
    check_block(rec, [metrics[0][k], metrics[1][k]], x, f, s, y)
    # the two images differ, so a mix-up of the batch index would show
    assert metrics[0][k].norm_x != pytest.approx(metrics[1][k].norm_x, rel=1e-3)


def test_resnet18_projection_block_captured_alone(r18):
    """Capturing only the projection block gives the same record and metrics as a full capture."""
    inp = image(6, (1, 3, 64, 64))
    x, f, s, y = tv_hand(r18, inp, "layer2.0")
    _, records = capture_forward(r18, inp, blocks=["layer2.0"])
    assert [r.name for r in records] == ["layer2.0"]
    (row,) = block_metrics(records)
    check_block(records[0], row, x, f, s, y)


def test_tiny_proj_projection_block_records_and_metrics_equal_hand_computation(tiny_proj):
    inp = image(7, (2, 3, 16, 16))
    x, f, s, y = tiny_hand(tiny_proj, inp)
    specs = find_blocks(tiny_proj)
    assert [(sp.name, sp.stage, sp.shortcut is not None) for sp in specs] == [
        ("res1", 1, False),
        ("res2", 1, False),
        ("res3", 2, True),
    ]
    _, records = capture_forward(tiny_proj, inp)
    assert hook_count(tiny_proj) == 0
    assert [r.name for r in records] == ["res1", "res2", "res3"]
    metrics = block_metrics(records)
    assert len(metrics) == 2
    check_block(records[2], [metrics[0][2], metrics[1][2]], x, f, s, y)
    assert (metrics[0][2].name, metrics[0][2].stage) == ("res3", 2)
    # res1 and res2 have identity shortcuts: their s is their x, and res2's x is res1's y
    assert records[0].s is records[0].x and records[1].s is records[1].x
    assert torch.equal(records[1].x, records[0].y)


def test_metrics_of_a_known_projection_record():
    """A hand-sized projection record: x has 8 units of 1 (||x|| = 2*sqrt(2)), s has 2 units (||s|| = 5)."""
    x = torch.ones(1, 2, 2, 2)
    s = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    f = torch.tensor([6.0, -8.0]).view(1, 2, 1, 1)
    y = torch.relu(f + s)
    (m,) = block_metrics([BlockRecord("p", 2, x=x, f=f, s=s, y=y)])[0]
    assert (m.name, m.stage) == ("p", 2)
    assert m.ratio == pytest.approx(10 / 5, rel=1e-12)
    assert m.cosine == pytest.approx((18 - 32) / (10 * 5), rel=1e-12)  # -0.28, against s
    assert m.norm_x == pytest.approx(8**0.5, rel=1e-12)  # ||x||, not ||s|| = 5
    assert (m.norm_f, m.norm_y, m.active) == (pytest.approx(10.0), pytest.approx(9.0), 0.5)
    assert m.channel_f.tolist() == [6.0, 8.0]
    assert m.row() == {
        "name": "p",
        "stage": 2,
        "ratio": m.ratio,
        "cosine": m.cosine,
        "norm_x": m.norm_x,
        "norm_f": m.norm_f,
        "norm_y": m.norm_y,
        "active": m.active,
    }


# --- lesion ---------------------------------------------------------------------------------------


def tv_lesioned_forward(model, inp, lesioned):
    """resnet18 written out, the lesioned blocks outputting relu(s(x)) (s = downsample when there is one)."""
    with torch.no_grad():
        h = model.maxpool(torch.relu(model.bn1(model.conv1(inp))))
        for lname in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(model, lname)):
                if f"{lname}.{i}" in lesioned:
                    h = torch.relu(block.downsample(h) if block.downsample is not None else h)
                else:
                    h = block(h)
        return model.fc(torch.flatten(model.avgpool(h), 1))[0]


def test_lesion_of_a_resnet18_projection_block_equals_hand_forward(r18):
    classes = [f"c{i}" for i in range(1000)]
    inp = image(8, (1, 3, 64, 64))
    intact = tv_lesioned_forward(r18, inp, ())
    want = tv_lesioned_forward(r18, inp, ("layer2.0",))
    r = insight.lesion(r18, inp, ["layer2.0"], classes)
    assert r.lesioned == ("layer2.0",)
    torch.testing.assert_close(r.logits, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, intact, rtol=1e-3, atol=1e-3)  # the lesion matters
    orig = int(intact.argmax())
    assert (r.orig_index, r.orig_label) == (orig, classes[orig])
    p_before = float(torch.softmax(intact, 0)[orig])
    p_after = float(torch.softmax(want, 0)[orig])
    assert r.p_orig_top1_before == pytest.approx(p_before, rel=1e-4)
    assert r.p_orig_top1_after == pytest.approx(p_after, rel=1e-4)
    assert r.delta == pytest.approx(r.p_orig_top1_after - r.p_orig_top1_before, abs=1e-12)
    logp, logq = torch.log_softmax(intact.double(), 0), torch.log_softmax(want.double(), 0)
    assert r.kl == pytest.approx(float((logp.exp() * (logp - logq)).sum()), rel=1e-4) and r.kl > 0
    assert [p.index for p in r.predictions] == want.topk(5).indices.tolist()
    # The captured record of that block under the lesion: F = 0 and y = relu(s(x)), s the projection.
    x, _, s, _ = tv_hand(r18, inp, "layer2.0")
    _, records = capture_forward(r18, inp, lesion=["layer2.0"])
    rec = {q.name: q for q in records}["layer2.0"]
    torch.testing.assert_close(rec.x, x)
    assert torch.count_nonzero(rec.f) == 0
    torch.testing.assert_close(rec.s, s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rec.y, torch.relu(s), rtol=1e-5, atol=1e-5)
    (m,) = [q for q in block_metrics(records)[0] if q.name == "layer2.0"]
    assert (m.ratio, m.cosine, m.norm_f) == (0.0, 0.0, 0.0)
    assert m.norm_y == pytest.approx(float(torch.linalg.vector_norm(torch.relu(s).double())), rel=1e-5)
    assert hook_count(r18) == 0 and not r18.training


def test_lesion_of_the_tiny_proj_projection_block_equals_hand_forward(tiny_proj):
    classes = [str(i) for i in range(10)]
    inp = image(9, (1, 3, 16, 16))
    with torch.no_grad():
        x, _, s, _ = tiny_hand(tiny_proj, inp)
        want = tiny_proj.forward_head(torch.relu(s))[0]
        intact = tiny_proj(inp)[0]
    r = insight.lesion(tiny_proj, inp, ["res3"], classes, k=3)
    torch.testing.assert_close(r.logits, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, intact, rtol=1e-3, atol=1e-3)
    assert len(r.predictions) == 3 and [p.index for p in r.predictions] == want.topk(3).indices.tolist()
    assert [p.index for p in r.intact_predictions] == intact.topk(3).indices.tolist()
    assert hook_count(tiny_proj) == 0


# --- small records: norms below 1, a unit-norm shortcut, dead blocks, a unit count not a power of 2 ---


def test_metrics_of_small_unit_and_dead_projection_records():
    # norms below 1 (||F|| = 0.5, ||s|| = sqrt(0.29)): the cosine must not be cut to 0 or clamped;
    # 3 output units, 2 active: active = 2/3 to float64 precision
    f = torch.tensor([0.3, 0.4, 0.0]).view(1, 1, 1, 3)
    s = torch.tensor([0.0, 0.5, -0.2]).view(1, 1, 1, 3)
    x = torch.full((1, 2, 1, 3), 0.1)
    small = BlockRecord("small", 2, x=x, f=f, s=s, y=torch.relu(f + s))
    # ||s|| exactly 1 with F != 0: an ordinary ratio, not a division special case
    f1 = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    s1 = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    unit = BlockRecord("unit", 2, x=torch.ones(1, 1, 2, 2), f=f1, s=s1, y=torch.relu(f1 + s1))
    # a batch of two dead shortcuts: image 0 also has F = 0 (ratio 0), image 1 has F != 0 (ratio inf)
    fd = torch.tensor([[0.0, 0.0], [0.0, -2.0]]).view(2, 2, 1, 1)
    sd = torch.zeros(2, 2, 1, 1)
    dead = BlockRecord("dead", 3, x=torch.ones(2, 1, 2, 2), f=fd, s=sd, y=torch.relu(fd + sd))

    rows = block_metrics([small, unit])
    assert len(rows) == 1 and [m.name for m in rows[0]] == ["small", "unit"]
    m = rows[0][0]
    f64, s64 = f.double().ravel(), s.double().ravel()
    nf, ns = float(f64.norm()), float(s64.norm())
    assert m.ratio == pytest.approx(nf / ns, rel=1e-12) and nf < 1 and ns < 1
    assert m.cosine == pytest.approx(float(f64 @ s64) / (nf * ns), rel=1e-12)
    assert m.cosine == pytest.approx(0.2 / (0.5 * 0.29**0.5), rel=1e-6)
    assert m.norm_x == pytest.approx(0.1 * 6**0.5, rel=1e-6)
    assert m.active == pytest.approx(2 / 3, abs=1e-12)
    m = rows[0][1]
    assert (m.ratio, m.cosine, m.norm_f) == (pytest.approx(5.0, rel=1e-12), pytest.approx(0.8, rel=1e-12), 5.0)
    rows = block_metrics([dead])
    assert len(rows) == 2  # one row per image of the batch
    (d0,), (d1,) = rows
    assert (d0.ratio, d0.cosine, d0.norm_f, d0.active) == (0.0, 0.0, 0.0, 0.0)
    assert (d1.ratio, d1.cosine, d1.norm_f, d1.norm_x) == (float("inf"), 0.0, 2.0, 2.0)
    assert block_metrics([]) == []


def test_topk_default_k_and_at_least_one():
    logits = torch.arange(10.0)
    classes = [f"c{i}" for i in range(10)]
    assert [p.index for p in topk(logits, classes)] == [9, 8, 7, 6, 5]  # k = 5 by default
    for k in (1, 0, -3):  # at least one prediction
        (p,) = topk(logits, classes, k=k)
        assert (p.label, p.index) == ("c9", 9)
        assert p.prob == pytest.approx(float(torch.softmax(logits, 0)[9]), rel=1e-6)


# --- copies and in-place modules ------------------------------------------------------------------


def test_project_resnet_records_are_its_activations_torchvision_records_are_copies(tiny_proj, r18):
    """The project's ResNet never writes into its outputs, so its records are kept without a copy;
    torchvision's blocks add and ReLU in place, so theirs are copies."""
    outputs = {}

    def keep(name):
        def hook(_module, _inputs, output):
            outputs[name] = output

        return hook

    res3 = tiny_proj.stages[1].blocks.res3
    handles = [res3.register_forward_hook(keep("res3")), r18.layer2[0].register_forward_hook(keep("layer2.0"))]
    try:
        _, tiny_records = capture_forward(tiny_proj, image(10, (1, 3, 16, 16)))
        _, tv_records = capture_forward(r18, image(10, (1, 3, 64, 64)))
    finally:
        for h in handles:
            h.remove()
    rec = tiny_records[2]
    assert rec.y.data_ptr() == outputs["res3"].data_ptr() and torch.equal(rec.y, outputs["res3"])
    rec = {r.name: r for r in tv_records}["layer2.0"]
    assert rec.y.data_ptr() != outputs["layer2.0"].data_ptr() and torch.equal(rec.y, outputs["layer2.0"])


def test_an_in_place_module_given_as_an_instance_attribute_makes_the_capture_copy():
    """nn.Hardtanh(inplace=True) keeps ``inplace`` on the instance (the existing test uses a class
    attribute): a project ResNet with it between two blocks must get copies, or the later in-place
    clamp would reach the earlier block's record."""
    torch.manual_seed(0)
    model = randomise_bn(build_model(TINY_PROJ), seed=0)
    inp = image(11, (1, 3, 16, 16))
    _, plain = capture_forward(model, inp)
    assert plain[1].y.max() > 0.5
    model.stages[1].transition = nn.Sequential(nn.Hardtanh(-1.0, 0.1, inplace=True), model.stages[1].transition)
    _, records = capture_forward(model, inp)
    torch.testing.assert_close(records[1].y, plain[1].y, rtol=0, atol=0)  # res2's y, not its clamped copy
    torch.testing.assert_close(records[1].y, torch.relu(records[1].f + records[1].s), rtol=0, atol=1e-6)


def test_x_of_a_block_after_an_in_place_module_is_the_input_it_received():
    torch.manual_seed(0)
    model = randomise_bn(build_model(TINY_PROJ), seed=0)
    model.stages[1].transition = nn.Sequential(nn.Hardtanh(-1.0, 0.1, inplace=True), model.stages[1].transition)
    _, records = capture_forward(model, image(11, (1, 3, 16, 16)))
    assert records[2].x.max() <= 0.1  # res3 received the clamped tensor
    with torch.no_grad():
        torch.testing.assert_close(records[2].y, model.stages[1].blocks.res3(records[2].x))


# --- blocks outside torchvision's naming -----------------------------------------------------------


def test_a_torchvision_block_not_named_layer_n_i_is_stage_0():
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    model = randomise_bn(nn.Sequential(OrderedDict(first=BasicBlock(4, 8, stride=2, downsample=down))), seed=3)
    (spec,) = find_blocks(model)
    assert (spec.name, spec.stage, spec.path, spec.shortcut) == ("first", 0, "first", down)
    inp = image(12, (1, 4, 8, 8))
    _, (rec,) = capture_forward(model, inp)
    assert (rec.name, rec.stage) == ("first", 0)
    block = model.first
    with torch.no_grad():
        f = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(inp)))))
        s = down(inp)
    torch.testing.assert_close(rec.x, inp, rtol=0, atol=0)
    torch.testing.assert_close(rec.f, f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.s, s, rtol=1e-5, atol=1e-6)
    (m,) = block_metrics([rec])[0]
    want = hand_metrics(inp[0], f[0], s[0], torch.relu(f + s)[0])
    assert (m.name, m.stage) == ("first", 0)
    for key in ("ratio", "cosine", "norm_x", "norm_f", "norm_y"):
        assert getattr(m, key) == pytest.approx(want[key], rel=1e-5), key


def test_record_false_lesions_without_recording_and_errors_name_the_argument(tiny_proj):
    inp = image(13, (1, 3, 16, 16))
    with torch.inference_mode(), capture(tiny_proj, lesion=["res3"], record=False) as cap:
        lesioned = tiny_proj(inp)
    assert cap.records == {} and cap.blocks == []  # nothing copied for a lesion-only pass
    with torch.no_grad():
        _, _, s, _ = tiny_hand(tiny_proj, inp)
        torch.testing.assert_close(lesioned, tiny_proj.forward_head(torch.relu(s)), rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match=r"unknown block\(s\) \['res9'\] for capture; .*\['res1', 'res2', 'res3'\]"):
        capture_forward(tiny_proj, inp, blocks=["res9"])
    with pytest.raises(KeyError, match=r"unknown block\(s\) \['res9'\] for lesion; "):
        capture_forward(tiny_proj, inp, lesion=["res9"])
    with pytest.raises(ValueError, match="^Linear has no residual blocks to capture$"):
        capture_forward(nn.Linear(2, 2), torch.zeros(1, 2))
    assert hook_count(tiny_proj) == 0
