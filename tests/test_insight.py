import io
import json
import threading
import zipfile

import numpy as np
import pytest
import torch
from conftest import TINY, randomise_bn
from PIL import Image

from resnet_demo.core import insight
from resnet_demo.core.capture import capture_forward, find_blocks
from resnet_demo.core.explorer import Explorer
from resnet_demo.core.metrics import block_metrics
from resnet_demo.core.model import build_model
from resnet_demo.core.studies.bands import bands_from_values, compute_bands, describe, percentile_rank, where
from resnet_demo.core.weights.cards import CIFAR10_CLASSES, ModelCard, tutorial_card
from resnet_demo.core.weights.files import file_sha256, save_weights
from resnet_demo.core.weights.load import load_model
from resnet_demo.training.bands import main as bands_main
from resnet_demo.training.data import Normalise
from resnet_demo.view.export import decode_float, export_zip, jsonable
from resnet_demo.view.render import (
    colour_lut,
    input_image,
    lesion_sweep_chart,
    overlay,
    readout_chart,
    residual_chart,
)

CLASSES = list(CIFAR10_CLASSES)


def hook_count(model):
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    return n


def image(seed=0, shape=(1, 3, 32, 32)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def logits_of(model, x):
    with torch.inference_mode():
        return model(x)[0].float()


def hand_forward(model, x, lesioned):
    """The project's ResNet written out, with the listed blocks computing relu(s(x))."""
    with torch.no_grad():
        h = model.stem(x)
        for stage in model.stages:
            h = stage.transition(h)
            for name, block in stage.blocks.named_children():
                h = torch.relu(block.shortcut(h)) if name in lesioned else block(h)
        return model.forward_head(h)[0]


def hand_kl(p_logits, q_logits):
    p = torch.softmax(p_logits.double(), 0).numpy()
    q = torch.softmax(q_logits.double(), 0).numpy()
    return float(np.sum(p * (np.log(p) - np.log(q))))


@pytest.fixture(scope="module")
def tv_model():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return randomise_bn(torchvision.models.resnet18(weights=None, num_classes=10))


# --- lesions ---------------------------------------------------------------------------------------


def test_lesioning_no_block_gives_the_intact_logits_exactly(seed_model):
    x = image(1)
    r = insight.lesion(seed_model, x, [], CLASSES)
    assert torch.equal(r.logits, logits_of(seed_model, x))
    assert r.lesioned == () and r.kl == 0.0 and r.delta == 0.0
    assert r.p_orig_top1_before == r.p_orig_top1_after == r.predictions[0].prob
    assert [p.index for p in r.predictions] == [p.index for p in r.intact_predictions]


@pytest.mark.parametrize("lesioned", [("res5",), ("res2", "res8")])
def test_lesion_equals_a_hand_built_forward_with_the_branch_removed(seed_model, lesioned):
    x = image(2)
    state = {k: v.clone() for k, v in seed_model.state_dict().items()}
    intact = logits_of(seed_model, x)
    r = insight.lesion(seed_model, x, lesioned, CLASSES, k=3)
    want = hand_forward(seed_model, x, lesioned)
    assert torch.equal(r.logits, want)
    assert not torch.equal(r.logits, intact)
    orig = int(intact.argmax())
    p0 = torch.softmax(intact, 0)[orig].item()
    p1 = torch.softmax(want, 0)[orig].item()
    assert (r.orig_index, r.orig_label) == (orig, CLASSES[orig])
    assert (r.p_orig_top1_before, r.p_orig_top1_after, r.delta) == (p0, p1, p1 - p0)
    assert r.kl == pytest.approx(hand_kl(intact, want), rel=1e-9) and r.kl > 0
    assert len(r.predictions) == 3 and r.predictions[0].index == int(want.argmax())
    # The lesion applied to that call only: the shared model is unchanged.
    assert hook_count(seed_model) == 0 and not seed_model.training
    assert all(torch.equal(v, state[k]) for k, v in seed_model.state_dict().items())
    assert torch.equal(logits_of(seed_model, x), intact)


def test_lesion_sweep_lesions_each_block_alone_and_charts(seed_model):
    x = image(3)
    intact = logits_of(seed_model, x)
    sweep = insight.lesion_sweep(seed_model, x, CLASSES, intact_logits=intact)
    assert [r.lesioned for r in sweep] == [(f"res{i}",) for i in range(1, 10)]
    for r in sweep[::4]:
        assert torch.equal(r.logits, hand_forward(seed_model, x, r.lesioned))
        assert r.kl == pytest.approx(hand_kl(intact, r.logits), rel=1e-9)
    assert torch.equal(insight.lesion(seed_model, x, "res3", CLASSES).logits, sweep[2].logits)  # one name
    img = lesion_sweep_chart(sweep)
    assert img.size[0] > 300 and hook_count(seed_model) == 0


def test_graded_lesion_runs_from_the_lesion_at_alpha_0_to_the_intact_model_at_alpha_1(seed_model):
    x = image(5)
    intact = logits_of(seed_model, x)
    zero = insight.lesion(seed_model, x, ["res3"], CLASSES, alpha=0.0)
    assert torch.equal(zero.logits, insight.lesion(seed_model, x, ["res3"], CLASSES).logits)
    assert zero.alpha == 0.0 and zero.to_dict()["alpha"] == 0.0
    one = insight.lesion(seed_model, x, ["res3", "res7"], CLASSES, alpha=1.0)
    assert torch.equal(one.logits, intact) and one.kl == 0.0 and one.delta == 0.0 and one.alpha == 1.0
    half = insight.lesion(seed_model, x, ["res3"], CLASSES, alpha=0.5)
    with torch.no_grad():  # res3 computing relu(0.5 F(x) + x)
        h = seed_model.stem(x)
        for name, block in seed_model.stages[0].blocks.named_children():
            h = torch.relu(block.branch(h) * 0.5 + block.shortcut(h)) if name == "res3" else block(h)
        for stage in seed_model.stages[1:]:
            h = stage.blocks(stage.transition(h))
        want = seed_model.forward_head(h)[0]
    assert torch.equal(half.logits, want) and half.to_dict()["alpha"] == 0.5
    assert half.kl == pytest.approx(hand_kl(intact, want), rel=1e-9) and 0 < half.kl < zero.kl
    sweep = insight.lesion_sweep(seed_model, x, CLASSES, alpha=0.5)
    assert [r.alpha for r in sweep] == [0.5] * 9 and torch.equal(sweep[2].logits, half.logits)
    ex = Explorer(seed_model, tutorial_card(trained=False), "cpu")
    analysis = ex.analyze(x)
    assert torch.equal(ex.lesion(analysis, ["res3"], alpha=0.5).logits, half.logits)
    assert torch.equal(ex.sweep(analysis, alpha=0.5)[2].logits, half.logits)
    assert ex.lesion(analysis, ["res3"]).alpha == 0.0
    with pytest.raises(ValueError, match="must be a finite number, got inf"):
        ex.lesion(analysis, ["res3"], alpha=float("inf"))
    assert hook_count(seed_model) == 0


def test_unknown_lesion_block_is_refused(seed_model):
    with pytest.raises(KeyError, match="unknown block"):
        insight.lesion(seed_model, image(), ["res42"], CLASSES)
    assert hook_count(seed_model) == 0


def test_a_lesion_in_one_thread_leaves_another_threads_forward_intact(tiny_model):
    x = image(4, (1, 3, 16, 16))
    intact = logits_of(tiny_model, x)
    names = [b.name for b in find_blocks(tiny_model)]
    lesioned_want = insight.lesion(tiny_model, x, names, [str(i) for i in range(10)]).logits
    stop, got = threading.Event(), []

    def lesioner():
        while not stop.is_set():
            got.append(insight.lesion(tiny_model, x, names, [str(i) for i in range(10)]).logits)

    t = threading.Thread(target=lesioner)
    t.start()
    try:
        for _ in range(30):
            assert torch.equal(logits_of(tiny_model, x), intact)
    finally:
        stop.set()
        t.join()
    assert got and all(torch.equal(g, lesioned_want) for g in got)
    assert hook_count(tiny_model) == 0


# --- readout ---------------------------------------------------------------------------------------


def test_readout_of_the_last_block_equals_the_models_logits(seed_model):
    x = image(5)
    ro = insight.readout(seed_model, x, CLASSES)
    assert [r.name for r in ro] == ["res7", "res8", "res9"]  # the blocks of the head's width, 256
    assert torch.equal(ro[-1].logits, logits_of(seed_model, x))
    _, records = capture_forward(seed_model, x)
    w, b = seed_model.fc.weight.detach().double(), seed_model.fc.bias.detach().double()
    for r, rec in zip(ro, records[6:]):
        want = rec.y[0].double().mean(dim=(1, 2)) @ w.T + b  # pool, then the linear head, by hand
        torch.testing.assert_close(r.logits.double(), want, rtol=0, atol=1e-5)
        final = int(ro[-1].logits.argmax())
        assert r.p_final == torch.softmax(r.logits, 0)[final].item()
        assert r.agrees == (int(r.logits.argmax()) == final)
    agrees = [r.agrees for r in ro]
    first = next(i for i in range(len(agrees)) if all(agrees[i:]))
    assert ro.settles_at == ro[first].name and ro.final.index == int(ro[-1].logits.argmax())
    assert ro[-1].p_final == ro.final.prob
    assert readout_chart(ro).size[0] > 200


def test_readout_from_records_and_from_an_analysis_agree(seed_model):
    x = image(6)
    from_x = insight.readout(seed_model, x, CLASSES)
    _, records = capture_forward(seed_model, x)
    from_records = insight.readout(seed_model, records, CLASSES)
    analysis = Explorer(seed_model, tutorial_card(trained=False), "cpu").analyze(x)
    from_analysis = insight.readout(seed_model, analysis, CLASSES)
    for ro in (from_records, from_analysis):
        assert all(torch.equal(a.logits, b.logits) for a, b in zip(ro, from_x))
        assert ro.settles_at == from_x.settles_at
    assert hook_count(seed_model) == 0


def test_head_of_explains_a_model_without_a_head():
    with pytest.raises(ValueError, match="no classifier head"):
        insight.head_of(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))


# --- Grad-CAM --------------------------------------------------------------------------------------


def test_gradcam_has_the_input_size_is_non_negative_and_leaves_no_trace(seed_model):
    x = image(7)
    requires = [p.requires_grad for p in seed_model.parameters()]
    pred = int(logits_of(seed_model, x).argmax())
    for block in ("res3", "res9"):
        cam = insight.gradcam(seed_model, x, block)
        assert cam.shape == (32, 32) and cam.dtype == np.float32
        assert cam.min() == 0 and cam.sum() > 0 and cam.max() == pytest.approx(1.0)
        assert np.array_equal(cam, insight.gradcam(seed_model, x, block, class_index=pred))
    assert hook_count(seed_model) == 0 and not seed_model.training
    assert all(p.grad is None for p in seed_model.parameters())
    assert [p.requires_grad for p in seed_model.parameters()] == requires


def test_gradcam_at_the_last_block_equals_the_closed_form(seed_model):
    # After the last block come only a mean pool and a linear layer, so d logit_c / d A_k = W[c, k] / (h w):
    # Grad-CAM is relu(sum_k W[c, k] A_k), upsampled and min-max normalised.
    x = image(8)
    c = 4
    _, records = capture_forward(seed_model, x, blocks=["res9"])
    a = records[0].y[0]  # (C, h, w)
    cam = torch.relu(torch.einsum("k,khw->hw", seed_model.fc.weight[c].detach(), a))
    cam = torch.nn.functional.interpolate(cam[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    want = ((cam - cam.min()) / (cam.max() - cam.min())).numpy()
    np.testing.assert_allclose(insight.gradcam(seed_model, x, "res9", class_index=c), want, rtol=1e-4, atol=1e-5)


def test_gradcam_is_min_max_normalised_where_its_minimum_is_above_zero(tiny_model):
    # A class whose head weights are all positive reads a map of non-negative block outputs: the map is above 0
    # everywhere, which is where min-max (0 = least evidence, 1 = most, as pytorch-grad-cam) and division by the
    # maximum alone differ. Computed by hand: relu(sum_k W[c, k] A_k) (the closed form at the last block, where
    # d logit_c / d A_k = W[c, k] / (h w)), upsampled bilinearly to the input, then (cam - min) / (max - min).
    c = 1
    with torch.no_grad():
        tiny_model.fc.weight[c] = tiny_model.fc.weight[c].abs() + 0.1
    x = image(13, (1, 3, 16, 16))
    _, records = capture_forward(tiny_model, x, blocks=["res3"])
    a = records[0].y[0].double()  # (C, h, w)
    cam = torch.relu(torch.einsum("k,khw->hw", tiny_model.fc.weight[c].detach().double(), a))
    cam = torch.nn.functional.interpolate(cam[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    assert float(cam.min()) > 0.05 * float(cam.max())  # the case in question: the least location is well above 0
    want = ((cam - cam.min()) / (cam.max() - cam.min())).numpy()
    got = insight.gradcam(tiny_model, x, "res3", class_index=c)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert got.min() == 0.0 and got.max() == pytest.approx(1.0, abs=1e-6)
    assert not np.allclose(got, (cam / cam.max()).numpy(), atol=1e-2)  # what division by the maximum gave


def test_a_flat_gradcam_is_all_zeros(tiny_model):
    # no location speaks for the class (all weights negative on non-negative outputs): relu gives 0 everywhere
    with torch.no_grad():
        tiny_model.fc.weight[2] = -tiny_model.fc.weight[2].abs() - 0.1
    cam = insight.gradcam(tiny_model, image(14, (1, 3, 16, 16)), "res3", class_index=2)
    assert cam.shape == (16, 16) and not cam.any()


def test_gradcam_refuses_bad_arguments_and_works_under_inference_mode(seed_model):
    with pytest.raises(KeyError, match="unknown block 'res99'.*res1"):
        insight.gradcam(seed_model, image(), "res99")
    with pytest.raises(IndexError, match="out of range"):
        insight.gradcam(seed_model, image(), "res9", class_index=10)
    assert hook_count(seed_model) == 0
    with torch.inference_mode():
        cam = insight.gradcam(seed_model, image(9), "res6")
    assert cam.shape == (32, 32) and cam.sum() > 0
    assert all(p.grad is None for p in seed_model.parameters())


def test_gradcam_in_concurrent_threads_matches_serial(seed_model):
    inputs = [image(20 + i) for i in range(3)]
    want = [insight.gradcam(seed_model, x, "res8") for x in inputs]
    got = {}
    barrier = threading.Barrier(len(inputs))

    def work(i):
        barrier.wait()
        got[i] = insight.gradcam(seed_model, inputs[i], "res8")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(inputs)):
        np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-6)
    assert hook_count(seed_model) == 0


def test_overlay_is_drawn_at_the_display_size(seed_model):
    card = tutorial_card(trained=False)
    x = image(10)
    base = input_image(x, card, size=160)
    cam = insight.gradcam(seed_model, x, "res9")
    over = overlay(cam, base)
    assert over.size == base.size == (160, 160) and over.mode == "RGB"
    assert np.array_equal(np.asarray(overlay(cam, base, alpha=0.0)), np.asarray(base.convert("RGB")))
    pure = np.asarray(overlay(np.ones((32, 32), np.float32), base, alpha=1.0))
    assert (pure == colour_lut("turbo")[255]).all()


# --- torchvision ---------------------------------------------------------------------------------


def tv_hand_forward(model, x, lesioned):
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(model, layer)):
                if f"{layer}.{i}" in lesioned:
                    h = torch.relu(block.downsample(h) if block.downsample is not None else h)
                else:
                    h = block(h)
        return model.fc(torch.flatten(model.avgpool(h), 1))[0]


def test_torchvision_resnet18_lesion_readout_and_gradcam(tv_model):
    classes = [str(i) for i in range(10)]
    x = image(11, (1, 3, 64, 64))
    intact = logits_of(tv_model, x)
    assert torch.equal(insight.lesion(tv_model, x, [], classes).logits, intact)
    for lesioned in (("layer3.1",), ("layer2.0", "layer4.1")):  # identity and projection shortcuts
        r = insight.lesion(tv_model, x, lesioned, classes)
        assert torch.equal(r.logits, tv_hand_forward(tv_model, x, lesioned))
        assert r.kl == pytest.approx(hand_kl(intact, r.logits), rel=1e-9)
    assert torch.equal(logits_of(tv_model, x), intact)
    ro = insight.readout(tv_model, x, classes)
    assert [r.name for r in ro] == ["layer4.0", "layer4.1"]
    assert torch.equal(ro[-1].logits, intact)
    cam = insight.gradcam(tv_model, x, "layer4.1")
    assert cam.shape == (64, 64) and cam.min() >= 0 and cam.sum() > 0
    assert hook_count(tv_model) == 0 and not tv_model.training
    assert all(p.grad is None for p in tv_model.parameters())


# --- reference bands -------------------------------------------------------------------------------


def test_bands_are_numpys_percentiles_of_a_hand_computed_case():
    values = {"ratio": {"a": [5.0, 1.0, 3.0, 2.0, 4.0, float("inf")]}, "cosine": {"a": [0.5, -0.5]}}
    bands = bands_from_values(values)
    # Linear interpolation between order statistics of 1..5 (the inf is left out): p5 = 1 + 0.05 * 4.
    assert bands["ratio"]["a"] == pytest.approx({"p5": 1.2, "p25": 2.0, "p50": 3.0, "p75": 4.0, "p95": 4.8})
    want = np.percentile([0.5, -0.5], [5, 25, 50, 75, 95])
    assert [bands["cosine"]["a"][k] for k in ("p5", "p25", "p50", "p75", "p95")] == want.tolist()


def test_compute_bands_over_a_synthetic_batch(tiny_model):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 1, 16, 16), dtype=torch.uint8, generator=g)
    norm = Normalise([0.5], [0.25], in_channels=3, channels_last=False)
    bands = compute_bands(tiny_model, images, normalise=norm, batch_size=3)
    # The same batches as compute_bands, so each image's metrics are bit for bit the same.
    metrics = []
    for i in range(0, 7, 3):
        metrics += block_metrics(capture_forward(tiny_model, norm(images[i : i + 3]))[1])
    assert bands["n"] == 7 and bands["percentiles"] == [5, 25, 50, 75, 95]
    for b, name in enumerate(["res1", "res2", "res3"]):
        for metric in ("ratio", "cosine"):
            vals = [getattr(per_image[b], metric) for per_image in metrics]
            want = np.percentile(vals, [5, 25, 50, 75, 95])
            got = [bands[metric][name][f"p{q}"] for q in (5, 25, 50, 75, 95)]
            assert got == want.tolist()
    with pytest.raises(ValueError, match="normalise"):
        compute_bands(tiny_model, images)
    chart = residual_chart(metrics[0], bands=bands)  # the chart takes them as they are
    assert chart.size[0] > 300


def test_where_places_a_value_in_the_band():
    band = {"p5": 1.0, "p25": 2.0, "p50": 3.0, "p75": 4.0, "p95": 5.0}
    assert where(6.0, band, block="res7") == "res7 works harder on this image than on 95% of test images"
    assert where(0.5, band, block="res7") == "res7 works less on this image than on 95% of test images"
    assert where(3.7, band, block="res7") == (
        "res7 is typical on this image (between the 25th and 75th percentile of test images)"
    )
    assert percentile_rank(4.5, band) == 85.0 and percentile_rank(1.5, band) == 15.0
    assert where(4.5, band, block="res7") == "res7 works harder on this image than on 85% of test images"
    assert where(1.5, band, block="res7") == "res7 works less on this image than on 85% of test images"
    assert "more aligned" in where(5.0, band, block="res2", metric="cosine")
    flat = {"p5": 1.0, "p25": 1.0, "p50": 1.0, "p75": 1.0, "p95": 1.0}
    assert percentile_rank(1.0, flat) == 50.0 and percentile_rank(2.0, flat) == 95.0


def test_describe_names_only_unusual_blocks(seed_model):
    _, records = capture_forward(seed_model, image(12))
    metrics = block_metrics(records)[0]
    bands = {"ratio": {m.name: {"p5": m.ratio * 0.5, "p25": m.ratio * 0.8, "p50": m.ratio, "p75": m.ratio * 1.2,
                                "p95": m.ratio * 1.5} for m in metrics}}
    bands["ratio"]["res4"] = {"p5": 0.0, "p25": 0.0, "p50": 0.0, "p75": 0.0, "p95": metrics[3].ratio / 2}
    assert describe(metrics, bands) == ["res4 works harder on this image than on 95% of test images"]
    assert describe(metrics, None) == []


def test_bands_command_writes_the_card_and_keeps_the_weights(tmp_path, tiny_model):
    for k, cls in enumerate(("cat", "dog")):
        folder = tmp_path / "data" / "test" / cls
        folder.mkdir(parents=True)
        for i in range(3):
            arr = np.random.default_rng(10 * k + i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{i}.png")
    card = ModelCard(name="tiny", classes=["cat", "dog"], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                     config=TINY.to_dict() | {"num_classes": 2}, input_size=16, resize=16, metrics={"accuracy": 0.5})
    model = randomise_bn(build_model(card.resnet_config))
    weights = tmp_path / "tiny.safetensors"
    save_weights(model, card, weights)
    sha = file_sha256(weights)
    bands = bands_main(["--weights", str(weights), "--data", str(tmp_path / "data"), "--device", "cpu",
                        "--cache-dir", str(tmp_path / "cache")])
    saved = json.loads(weights.with_suffix(".json").read_text())
    assert saved["reference_bands"] == json.loads(json.dumps(bands))
    assert saved["metrics"] == {"accuracy": 0.5} and saved["weights_sha256"] == sha == file_sha256(weights)
    reloaded, card2 = load_model(weights)  # the sha256 check still passes
    assert set(card2.reference_bands["ratio"]) == {"res1", "res2", "res3"} and card2.reference_bands["n"] == 6
    imgs = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
                        for p in sorted((tmp_path / "data" / "test").glob("*/*.png"))])
    want = compute_bands(reloaded, imgs, normalise=Normalise(card.mean, card.std, 3, channels_last=False))
    assert card2.reference_bands["ratio"]["res2"] == pytest.approx(want["ratio"]["res2"], rel=1e-12)


# --- export ----------------------------------------------------------------------------------------


def strict_json(text):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_export_round_trip(seed_model, tmp_path):
    card = tutorial_card(trained=False)
    card.weights_sha256 = "ab" * 32
    x = image(13)
    ex = Explorer(seed_model, card, "cpu")
    first = ex.analyze(x)
    card.reference_bands = {"ratio": {m.name: {"p5": 0.0, "p25": 0.1, "p50": m.ratio, "p75": 9.0, "p95": 10.0}
                                      for m in first.metrics}}
    analysis = ex.analyze(x)
    les = insight.lesion(seed_model, x, ["res4"], CLASSES, intact_logits=analysis.logits)
    sweep = insight.lesion_sweep(seed_model, x, CLASSES, intact_logits=analysis.logits)
    ro = insight.readout(seed_model, analysis, CLASSES)
    base = input_image(analysis.input, card)
    images = {"input": base, "Grad-CAM res9": overlay(insight.gradcam(seed_model, x, "res9"), base),
              "residual chart": residual_chart(analysis.metrics, bands=card.reference_bands)}
    data = export_zip(analysis, images=images, lesion=les, sweep=sweep, readout=ro)
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = zf.namelist()
    assert names == ["analysis.json", "input.png", "Grad-CAM_res9.png", "residual_chart.png"]
    doc = strict_json(zf.read("analysis.json"))
    assert doc["images"] == names[1:]
    assert doc["model"]["name"] == "tutorial" and doc["model"]["weights_sha256"] == "ab" * 32
    assert doc["model"]["dataset"] == "CIFAR-10" and doc["tool"]["format"] == 1
    assert doc["logits"] == analysis.logits.tolist()
    assert doc["predictions"] == [{"label": p.label, "index": p.index, "prob": p.prob} for p in analysis.predictions]
    for got, m in zip(doc["blocks"], analysis.metrics, strict=True):
        for key in ("name", "stage", "ratio", "cosine", "norm_x", "norm_f", "norm_y", "active"):
            assert got[key] == getattr(m, key)
        assert got["channel_f"] == m.channel_f.tolist()
        assert got["reference_rank"]["ratio"] == 50.0
    assert doc["lesion"]["lesioned"] == ["res4"] and doc["lesion"]["kl"] == les.kl
    assert doc["lesion"]["logits"] == les.logits.tolist() and doc["lesion"]["delta"] == les.delta
    assert [r["kl"] for r in doc["lesion_sweep"]] == [r.kl for r in sweep]
    assert doc["readout"]["settles_at"] == ro.settles_at
    assert [b["p_final"] for b in doc["readout"]["blocks"]] == [r.p_final for r in ro]
    for name, img in zip(names[1:], images.values()):
        png = Image.open(io.BytesIO(zf.read(name)))
        assert png.format == "PNG"
        if isinstance(img, Image.Image):
            assert png.size == img.size
            assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(img.convert("RGB")))
    written = export_zip(analysis, path=tmp_path / "out" / "analysis.zip")
    assert written.is_file() and zipfile.ZipFile(written).namelist() == ["analysis.json"]


def test_export_writes_non_finite_numbers_as_strings(seed_model):
    analysis = Explorer(seed_model, tutorial_card(trained=False), "cpu").analyze(image(14))
    analysis.metrics[2].ratio = float("inf")
    analysis.metrics[3].cosine = float("nan")
    doc = strict_json(zipfile.ZipFile(io.BytesIO(export_zip(analysis))).read("analysis.json"))
    assert doc["blocks"][2]["ratio"] == "Infinity" and decode_float(doc["blocks"][2]["ratio"]) == float("inf")
    assert doc["blocks"][3]["cosine"] == "NaN" and np.isnan(decode_float(doc["blocks"][3]["cosine"]))
    assert decode_float(doc["blocks"][0]["ratio"]) == analysis.metrics[0].ratio
    assert jsonable({"a": (np.float32(-np.inf), np.int64(3), torch.tensor([1.5]))}) == {"a": ["-Infinity", 3, [1.5]]}
