"""The strange-input score: AUROC by hand, the robust z-score, the page's message, noise against test images,
and the measuring command on a tiny model."""

import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, randomise_bn
from PIL import Image

from resnet_demo.core.explorer import Explorer
from resnet_demo.core.metrics import BlockMetrics
from resnet_demo.core.model import ResNetConfig, build_model
from resnet_demo.core.studies.evalsets import load_evalset
from resnet_demo.core.studies.strangeness import (
    SCORE,
    SCORES,
    Z_CAP,
    auroc,
    band_z,
    candidate_scores,
    strangeness,
    trained_on,
)
from resnet_demo.core.weights.cards import CIFAR10, MNIST, ModelCard
from resnet_demo.core.weights.files import save_weights
from resnet_demo.core.weights.load import load_model
from resnet_demo.training.data import ImageSet, subset
from resnet_demo.training.strange import app_inputs, held_out, noise_images, scores_of

WEIGHTS = ROOT / "weights"


# --- AUROC ------------------------------------------------------------------------------------------


def test_auroc_by_hand_with_ties():
    # positives 2 and 4 against negatives 1, 2, 3: 2 beats 1, ties 2 (a half), loses to 3; 4 beats all three.
    assert auroc([1, 2, 3], [2, 4]) == pytest.approx((1 + 0.5 + 0 + 3) / 6)  # 0.75
    assert auroc([0.3, 0.3], [0.3, 0.3, 0.3]) == 0.5  # all tied
    assert auroc([1, 2], [3, 4]) == 1.0
    assert auroc([3, 4], [1, 2]) == 0.0
    assert auroc([1, 2], [math.inf]) == 1.0


def test_auroc_equals_counting_every_pair():
    rng = np.random.default_rng(0)
    neg, pos = rng.integers(0, 6, 40), rng.integers(2, 8, 30)  # small integers: many ties
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert auroc(neg, pos) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


def test_auroc_refuses_empty_groups_and_nan():
    with pytest.raises(ValueError, match="both groups, got 0 negatives and 1 positives"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auroc([1.0, float("nan")], [2.0])


# --- the score ----------------------------------------------------------------------------------


BAND = {"p5": 1.0, "p25": 1.5, "p50": 2.0, "p75": 2.5, "p95": 4.0}


def test_band_z_puts_the_band_ends_at_1_645():
    assert band_z(4.0, BAND) == pytest.approx(1.645)
    assert band_z(1.0, BAND) == pytest.approx(-1.645)
    assert band_z(3.0, BAND) == pytest.approx(1.645 / 2)  # half way from p50 to p95
    assert band_z(2.0, BAND) == 0.0
    assert band_z(math.inf, BAND) == Z_CAP
    assert band_z(1e9, BAND) == Z_CAP


def _metrics(values: list[tuple[float, float]]) -> list[BlockMetrics]:
    return [BlockMetrics(f"res{i + 1}", 1, r, c, 1.0, 1.0, 1.0, 0.5, np.zeros(1)) for i, (r, c) in enumerate(values)]


COS_BAND = {"p5": -0.5, "p25": -0.2, "p50": 0.0, "p75": 0.2, "p95": 0.5}
BANDS = {"ratio": {"res1": BAND, "res2": BAND}, "cosine": {"res1": COS_BAND, "res2": COS_BAND}}


def test_candidate_scores_by_hand():
    # res1: ratio 4 (z 1.645, at the band's end, inside), cosine 0 (z 0); res2: ratio 7 (z 1.645*5/2 = 4.1125,
    # outside by 3/3 band widths), cosine -0.5 (z -1.645, inside).
    logits = torch.tensor([2.0, 0.0, 0.0])
    s = candidate_scores(_metrics([(4.0, 0.0), (7.0, -0.5)]), logits, BANDS)
    zs = [1.645, 0.0, 4.1125, -1.645]
    assert s["band_rms"] == pytest.approx(math.sqrt(sum(z * z for z in zs) / 4))
    assert s["band_max"] == pytest.approx(4.1125)
    assert s["band_excess"] == pytest.approx((0 + 0 + 1.0 + 0) / 4)
    assert s["outside"] == 1.0
    assert s["msp"] == pytest.approx(1 - math.exp(2) / (math.exp(2) + 2))
    assert s["energy"] == pytest.approx(-math.log(math.exp(2) + 2))
    assert set(s) == set(SCORES)


def _card(threshold: float | None) -> ModelCard:
    card = ModelCard.from_preset(CIFAR10, "c", reference_bands=BANDS)
    if threshold is not None:
        card.studies = {"strangeness": {"threshold": threshold}}
    return card


def test_the_page_message_in_the_issues_words():
    far = strangeness(_metrics([(9.0, 0.9), (7.0, 0.0)]), torch.zeros(10), _card(2.0))
    assert far.strange and far.outside == 2 and far.outside_blocks == ["res1", "res2"]
    assert far.message == ("This image is unlike the training data: 2 of 2 blocks outside their usual range; "
                           "this model was trained on 32×32 photos of 10 classes (CIFAR-10).")
    assert far.confidence == pytest.approx(0.1)
    usual = strangeness(_metrics([(2.0, 0.0), (2.5, 0.7)]), torch.zeros(10), _card(2.0))
    assert not usual.strange and usual.outside == 1
    assert usual.message == "1 of 2 blocks outside its usual range, as on many test images: nothing unusual."
    unmeasured = strangeness(_metrics([(9.0, 0.9), (7.0, 0.0)]), torch.zeros(10), _card(None))
    assert not unmeasured.strange and "no warning threshold has been measured" in unmeasured.message
    assert strangeness(_metrics([(9.0, 0.9)]), torch.zeros(10), ModelCard.from_preset(CIFAR10, "c")) is None


def test_trained_on_names_size_kind_classes_and_data_set():
    assert trained_on(ModelCard.from_preset(MNIST, "m", dataset="MNIST (mnist-png.tar.gz)")) == \
        "32×32 drawings of 10 classes (MNIST)"


# --- on the shipped models ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "evalset"), [("cifar10_resnet", "cifar10_test500"), ("mnist_resnet", "mnist_test500")])
def test_noise_is_stranger_than_every_test_image_median(name, evalset):
    torch.set_num_threads(1)
    model, card = load_model(WEIGHTS / f"{name}.safetensors")
    explorer = Explorer(model, card, "cpu")
    test = load_evalset(evalset)
    channels = 1 if card.colour_mode == "gray" else 3
    noise = app_inputs(noise_images("uniform", 20, channels, card.input_size, seed=1), card, explorer.in_channels)
    test_scores = scores_of(model, explorer.batch_input(test.images), card.reference_bands)[SCORE]
    noise_scores = scores_of(model, noise, card.reference_bands)[SCORE]
    assert (noise_scores > np.median(test_scores)).all(), (noise_scores, np.median(test_scores))
    # ... and above the page's threshold, so the page warns about all 20
    threshold = card.studies["strangeness"]["threshold"]
    assert card.studies["strangeness"]["score"] == SCORE
    assert (noise_scores > threshold).all()
    assert 0.01 < (test_scores > threshold).mean() < 0.15  # about 5% of test images by construction


def test_an_analysed_noise_image_gets_the_warning():
    explorer = Explorer(*load_model(WEIGHTS / "cifar10_resnet.safetensors"), "cpu")
    rng = np.random.default_rng(3)
    analysis = explorer.analyze(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    result = strangeness(analysis.metrics, analysis.logits, explorer.card)
    assert result.strange
    assert result.message.endswith(
        "of 9 blocks outside their usual range; this model was trained on 32×32 photos of 10 classes (CIFAR-10).")


# --- the command ------------------------------------------------------------------------------------


def test_held_out_leaves_out_exactly_the_bands_draw():
    index = torch.arange(10)
    test = ImageSet(index.view(-1, 1, 1, 1).to(torch.uint8), index, ["a"])
    card = ModelCard("m", ["a"], [0.5], [0.5], reference_bands={"n": 4, "split": "test", "data": "d.tar.gz"})
    kept, left_out = held_out(test, card, "d.tar.gz")
    used = subset(test, 4).labels.tolist()
    assert left_out and sorted(kept.labels.tolist() + used) == list(range(10)) and len(kept.labels) == 6
    assert held_out(test, card, "other.tar.gz") == (test, False)  # bands from another data set: nothing to leave out


def _folder(root: Path, classes: dict[str, tuple[int, int, int]], per_split: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for cls, colour in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(colour) + rng.integers(-40, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i:02d}.png")
    return root


@pytest.fixture
def tiny_setup(tmp_path):
    """A tiny model's weights and card, and an ImageFolder of three coloured classes."""
    torch.manual_seed(0)
    config = ResNetConfig.from_dict({**TINY.to_dict(), "num_classes": 3})
    card = ModelCard(name="tiny", classes=["a", "b", "c"], mean=[0.5] * 3, std=[0.25] * 3, config=config.to_dict(),
                     input_size=16, resize=16, dataset="colours")
    weights = tmp_path / "tiny.safetensors"
    save_weights(randomise_bn(build_model(config)), card, weights)
    data = _folder(tmp_path / "colours", {"a": (200, 40, 40), "b": (40, 200, 40), "c": (40, 40, 200)},
                   {"train": 8, "test": 6})
    return weights, data


def test_strange_command_on_a_tiny_model_writes_the_card_only(tiny_setup, tmp_path, capsys):
    from resnet_demo.training.bands import main as bands_main
    from resnet_demo.training.strange import main as strange_main

    weights, data = tiny_setup
    cache = ["--cache-dir", str(tmp_path / "cache")]
    bands_main(["--weights", str(weights), "--data", str(data), "--device", "cpu", *cache])
    before = weights.read_bytes()
    study = strange_main(["--weights", str(weights), "--data", str(data), "--noise", "5", "--device", "cpu", *cache])
    assert weights.read_bytes() == before
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["weights_sha256"] == hashlib.sha256(before).hexdigest()
    stored = card["studies"]["strangeness"]
    assert stored["threshold"] == study["threshold"] and stored["score"] == SCORE
    # the bands used all 18 test images: none left to hold out, so all are measured
    assert stored["test"] == {**stored["test"], "n": 18, "held_out_from_bands": False}
    assert set(stored["sets"]) == {"uniform_noise", "gaussian_noise", "blank"}  # no sibling data set here
    assert stored["sets"]["blank"]["n"] == 9 and set(stored["sets"]["blank"]["per_level"]) == {
        "0", "32", "64", "96", "128", "160", "192", "224", "255"}
    for s in stored["sets"].values():
        assert set(s["auroc"]) == set(SCORES) and all(0 <= v <= 1 for v in s["auroc"].values())
    assert "written to" in capsys.readouterr().out


@pytest.mark.slow
def test_strange_command_under_torchrun_gives_one_processes_figures(tiny_setup, tmp_path):
    from test_distributed import torchrun

    from resnet_demo.training.bands import main as bands_main

    weights, data = tiny_setup
    cache = ["--cache-dir", str(tmp_path / "cache")]
    bands_main(["--weights", str(weights), "--data", str(data), "--device", "cpu", "--limit", "8", *cache])
    common = ["--weights", str(weights), "--data", str(data), "--noise", "7", "--device", "cpu", "--batch-size", "4",
              *cache]
    # the one process runs as torchrun's do (its own interpreter, one thread): see test_probes
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "resnet_demo.training.strange", *common], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    want = json.loads(weights.with_suffix(".json").read_text())["studies"]["strangeness"]
    torchrun(["-m", "resnet_demo.training.strange", *common])
    got = json.loads(weights.with_suffix(".json").read_text())["studies"]["strangeness"]
    assert got["processes"] == 2 and want["processes"] == 1
    assert got["test"] == want["test"] and got["test"]["n"] == 10 and got["test"]["held_out_from_bands"]
    for key in ("threshold", "sets"):
        assert got[key] == want[key]


def test_the_page_warns_for_noise_and_not_for_a_test_photo():
    import numpy as np
    from PIL import Image

    from resnet_demo.view.pages import Pages
    from resnet_demo.view.registry import default_registry
    from resnet_demo.view.results import Settings

    registry = default_registry("cpu")
    registry.load_all()
    pages = Pages(registry)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    summary = pages.analyze(noise, "photo", Settings("cifar10", 5)).page.summary
    assert "⚠ This image is unlike the training data:" in summary
    assert "this model was trained on 32×32 photos of 10 classes (CIFAR-10)" in summary
    ship = Path(__file__).resolve().parent.parent / "examples" / "cifar10-ship-0.jpg"
    assert "⚠" not in pages.analyze(str(ship), "photo", Settings("cifar10", 5)).page.summary
