"""The training timeline: a run folder's snapshots, each block's medians over a data set, the page's tab."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, randomise_bn
from PIL import Image

from resnet_demo.core.capture import capture_forward
from resnet_demo.core.errors import WeightsError
from resnet_demo.core.model import build_model
from resnet_demo.core.studies.evalsets import load_evalset
from resnet_demo.core.studies.timeline import Timeline, find_timelines
from resnet_demo.core.weights.cards import MNIST, WEIGHTS_DIR, ModelCard
from resnet_demo.core.weights.files import save_weights
from resnet_demo.view.pages import Pages
from resnet_demo.view.registry import default_registry
from resnet_demo.view.results import PageState, Settings
from resnet_demo.view.timeline_view import Timelines, timeline_chart, timeline_view

STEPS = (1, 6, 40)
SHIPPED_RUN = WEIGHTS_DIR / "mnist_resnet_timeline"


def snapshot_card(step: int, acc: float) -> ModelCard:
    return ModelCard.from_preset(
        MNIST, f"tiny @ step {step}", config=TINY.to_dict(), metrics={"test_acc": acc},
        training={"run": "tiny", "step": step, "epoch": 1, "steps": STEPS[-1], "command": "python -m train --tiny"},
    )


def write_run(folder: Path, steps=STEPS) -> Path:
    for i, step in enumerate(steps):
        torch.manual_seed(step)
        model = randomise_bn(build_model(TINY), seed=step)
        card = save_weights(model, snapshot_card(step, 0.1 + 0.2 * i), folder / f"step-{step:06d}.safetensors")
        card.write(folder / f"step-{step:06d}.json")
    return folder


@pytest.fixture
def run(tmp_path) -> Timeline:
    return Timeline.read(write_run(tmp_path / "tiny_timeline"), "cpu")


def test_a_run_folder_reads_in_step_order_with_each_cards_step_and_accuracy(run):
    assert [s.step for s in run.snapshots] == list(STEPS)
    assert [s.accuracy for s in run.snapshots] == pytest.approx([0.1, 0.3, 0.5])
    assert run.snapshots[1].label == "step 6 of 40 (epoch 1), 30.00% test accuracy"
    assert run.name == "tiny_timeline" and len(run) == 3
    # Each snapshot is its own model: different weights give different logits.
    x = torch.randn(1, 3, 32, 32)
    assert not torch.equal(run.explorer(0).logits(x), run.explorer(2).logits(x))
    assert run.explorer(1) is run.explorer(1)  # loaded once


def test_bad_run_folders_are_refused_with_the_reason(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        Timeline.read(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="holds no snapshots"):
        Timeline.read(tmp_path / "empty")
    folder = write_run(tmp_path / "liar", steps=(3,))
    card = ModelCard.read(folder / "step-000003.json")
    card.training["step"] = 5
    card.write(folder / "step-000003.json")
    with pytest.raises(WeightsError, match="card says step 5, its name step 3"):
        Timeline.read(folder)
    mixed = write_run(tmp_path / "mixed", steps=(1, 2))
    card = ModelCard.read(mixed / "step-000002.json")
    card.classes = list("abcdefghij")
    card.write(mixed / "step-000002.json")
    with pytest.raises(WeightsError, match="not of the same network"):
        Timeline.read(mixed)
    (tmp_path / "nocard").mkdir()
    (tmp_path / "nocard" / "step-000001.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsError, match="not found: it should sit beside"):
        Timeline.read(tmp_path / "nocard")


@pytest.mark.slow
def test_history_is_each_blocks_median_ratio_and_cosine_over_the_images(run):
    images = load_evalset("mnist_test500").images[:60]
    history = run.history(images, data="mnist_test500", batch_size=25)
    assert history.steps == list(STEPS) and history.blocks == ["res1", "res2", "res3"]
    assert history.stages == [1, 1, 2] and history.n == 60
    for i in range(len(run)):  # by hand: norms of the captured F(x) and s(x), numpy's median
        e = run.explorer(i)
        _, records = capture_forward(e.model, e.batch_input(images))
        for j, r in enumerate(records):
            f, s = r.f.flatten(1).double(), r.s.flatten(1).double()
            ratio = (f.norm(dim=1) / s.norm(dim=1)).numpy()
            cosine = ((f * s).sum(1) / (f.norm(dim=1) * s.norm(dim=1))).numpy()
            assert history.ratio[i, j] == pytest.approx(np.median(ratio), rel=1e-5)
            assert history.cosine[i, j] == pytest.approx(np.median(cosine), rel=1e-5, abs=1e-6)
    assert run.history(images, data="mnist_test500") is history  # cached per data set
    chart = timeline_chart(history, current=6)
    assert chart.size[0] >= 900 and chart.size[1] >= 300


@pytest.mark.slow
def test_the_tab_shows_the_image_through_the_chosen_snapshot(tmp_path):
    write_run(tmp_path / "tiny_timeline")
    timelines = Timelines([tmp_path / "tiny_timeline"], shipped=False, device="cpu")
    assert timelines.choices() == [("tiny_timeline (3 snapshots)", "tiny_timeline")]
    assert timelines.snapshot_choices()[1] == ("tiny_timeline @ step 6", "run:tiny_timeline:6")
    digit = Image.fromarray(load_evalset("mnist_test500").images[0, 0].numpy())
    run = timelines.get("tiny_timeline")
    view = timeline_view(run, 1, digit, "photo", 3, timelines.history("tiny_timeline"))
    want = run.explorer(1).analyze(digit, kind="photo", k=3)
    assert view.predictions == {p.label: p.prob for p in want.predictions}
    assert view.steps == list(STEPS) and view.index == 1
    assert "snapshot 2 of 3: step 6 of 40 (epoch 1), 30.00% test accuracy" in view.text
    assert "500 images of `mnist_test500`" in view.text and "`python -m train --tiny`" in view.text
    # Through the page's handler, and as model B of the comparison.
    pages = Pages(default_registry("cpu"), timelines=timelines)
    state = PageState(digit, "photo", "mnist", 3)
    settings = Settings("mnist", 3)
    assert pages.timeline(state, settings, "tiny_timeline", 2).predictions == {
        p.label: p.prob for p in run.explorer(2).analyze(digit, kind="photo", k=3).predictions}
    assert pages.explorer("run:tiny_timeline:40", "photo")[1] is run.explorer(2)
    with pytest.raises(WeightsError, match=r"no snapshot at step 7; it has steps \[1, 6, 40\]"):
        pages.explorer("run:tiny_timeline:7", "photo")
    with pytest.raises(WeightsError, match="unknown training run 'other'"):
        pages.timeline(state, settings, "other", 0)
    with pytest.raises(ValueError, match="snapshot 4 does not exist"):
        pages.timeline(state, settings, "tiny_timeline", 3)


def test_unreadable_run_folders_are_reported_not_offered(tmp_path):
    timelines = Timelines([tmp_path / "missing"], shipped=False)
    assert timelines.choices() == [] and "not found" in timelines.errors[str(tmp_path / "missing")]
    (tmp_path / "a_timeline").mkdir()
    (tmp_path / "other").mkdir()
    assert find_timelines(tmp_path) == [tmp_path / "a_timeline"]


@pytest.mark.slow  # 500 digits through every snapshot
@pytest.mark.skipif(not SHIPPED_RUN.is_dir(), reason="the shipped MNIST timeline is not in this checkout")
def test_the_shipped_mnist_timeline_is_small_fp16_log_spaced_and_learns():
    from safetensors import safe_open

    files = sorted(SHIPPED_RUN.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    with safe_open(str(files[0]), "pt") as f:
        assert f.get_tensor("stem.conv.weight").dtype == torch.float16
    run = Timeline.read(SHIPPED_RUN, "cpu")
    steps = [s.step for s in run.snapshots]
    assert steps[0] == 1 and steps[-1] == run.snapshots[-1].steps
    assert all(b / a >= 4 for a, b in zip(steps, steps[1:]))  # log-spaced: the early steps close together
    accuracy = [s.accuracy for s in run.snapshots]
    assert accuracy[0] < 0.5 < 0.98 <= accuracy[-1]
    # The card's accuracy is the snapshot's own: on the shipped 500 test digits the last one agrees.
    data = load_evalset("mnist_test500")
    e = run.explorer(len(run) - 1)
    acc = (e.logits(e.batch_input(data.images)).argmax(1) == data.labels).double().mean().item()
    assert acc == pytest.approx(accuracy[-1], abs=0.015)


def test_the_timeline_through_the_real_server(tmp_path, own_app_server):
    gradio_client = pytest.importorskip("gradio_client")

    write_run(tmp_path / "tiny_timeline")
    timelines = Timelines([tmp_path / "tiny_timeline"], shipped=False, device="cpu")
    digit = tmp_path / "digit.png"
    Image.fromarray(load_evalset("mnist_test500").images[3, 0].numpy()).save(digit)
    url = own_app_server(timelines=timelines).url
    client = gradio_client.Client(url, verbose=False)
    client.predict(gradio_client.handle_file(str(digit)), "mnist", 3, "f", "", [], api_name="/analyze_photo")
    label, residual, readout, history, text = client.predict("mnist", 3, "tiny_timeline", 2, api_name="/timeline")
    want = timelines.get("tiny_timeline").explorer(1).analyze(str(digit), kind="photo", k=3)
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert got == pytest.approx({p.label: p.prob for p in want.predictions}, abs=1e-6)
    assert "snapshot 2 of 3" in text and Image.open(history).size[0] >= 900
    # A snapshot is model B of the comparison.
    _, _, preds_b, *_ = client.predict("mnist", 3, "run:tiny_timeline:40", "f", api_name="/compare")
    want_b = timelines.get("tiny_timeline").explorer(2).analyze(str(digit), kind="photo", k=3)
    assert preds_b["label"] == want_b.predictions[0].label
