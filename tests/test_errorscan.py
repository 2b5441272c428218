"""The error browser's numbers and pictures: a scan over a labelled set, its confusion matrix and filters.

A rigged model whose logits are written in its input pixels gives known predictions and confidences, so the
confusion matrix, per-class accuracy and every filter are checked against a hand count. The shipped CIFAR-10
model on its shipped evaluation set matches a direct computation. The confusion picture maps every click
back to its cell.
"""

from __future__ import annotations

import gc
import math
import threading

import numpy as np
import pytest
import torch
from conftest import TINY, randomise_bn
from torch import nn

from resnet_demo.core.capture import capture_forward
from resnet_demo.core.errors import DataError
from resnet_demo.core.explorer import Explorer
from resnet_demo.core.model import ResidualBlock, build_model
from resnet_demo.core.studies.errorscan import SCANS, Scan, ScanCache, scan, scan_logits, scan_set
from resnet_demo.core.studies.evalsets import EvalSet, evalset_for, load_evalset
from resnet_demo.core.studies.labelled import SKIP_NOT_IMAGE, LabelledSet
from resnet_demo.core.weights.cards import CIFAR10, ModelCard
from resnet_demo.view.error_view import (
    caption,
    confusion_cell,
    confusion_image,
    confusion_layout,
    gallery_items,
    labelled_summary,
    scan_summary,
    set_image,
)

CLASSES = ["a", "b", "c"]
SCALE = 8.0  # logit = SCALE · pixel / 255
# Ten images, each with one class's pixel at WINNER and the others at 0: a hand-made table of outcomes.
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PREDICTED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 2]  # wrong: 2 (a -> b), 3 (a -> c), 6 (b -> a)
WINNER = [255, 200, 150, 100, 250, 60, 230, 30, 180, 120]


class Rigged(nn.Module):
    """Logits read off the input: logit k = SCALE × channel 0, row 0, column k (so, with mean 0 and std 1,
    SCALE × pixel / 255). The residual block is there for the Explorer to find; the answer does not use it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = ResidualBlock(3, 3, name="res1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SCALE * x[:, 0, 0, : len(CLASSES)]


def rigged_set() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(len(LABELS), 3, 4, 4, dtype=torch.uint8)
    for i, (p, w) in enumerate(zip(PREDICTED, WINNER)):
        images[i, 0, 0, p] = w
    images[:, 1:] = 77  # other channels play no part
    return images, torch.tensor(LABELS)


def confidence_by_hand(w: int) -> float:
    a = SCALE * w / 255
    return math.exp(a) / (math.exp(a) + 2)  # the winner's logit a, the two others 0


@pytest.fixture(scope="module")
def rigged() -> Explorer:
    card = ModelCard(name="rigged", classes=CLASSES, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], input_size=4, resize=4)
    return Explorer(Rigged().eval(), card, device="cpu")


@pytest.fixture(scope="module")
def rigged_scan(rigged) -> Scan:
    images, labels = rigged_set()
    return scan(rigged, images, labels, name="rigged")


# --- the numbers ----------------------------------------------------------------------------------------------


def test_predictions_confidences_and_true_class_probabilities_are_the_hand_computed_ones(rigged_scan):
    s = rigged_scan
    assert s.labels.tolist() == LABELS and s.predicted.tolist() == PREDICTED
    assert s.correct.tolist() == [p == t for p, t in zip(PREDICTED, LABELS)]
    expected = [confidence_by_hand(w) for w in WINNER]
    assert s.confidence.tolist() == pytest.approx(expected, abs=1e-6)
    p_true = [c if p == t else 1 / (math.exp(SCALE * w / 255) + 2)
              for c, p, t, w in zip(expected, PREDICTED, LABELS, WINNER)]
    assert s.p_true.tolist() == pytest.approx(p_true, abs=1e-6)


def test_confusion_matrix_and_per_class_accuracy_equal_a_hand_count(rigged_scan):
    s = rigged_scan
    assert s.confusion.tolist() == [[2, 1, 1], [1, 2, 0], [0, 0, 3]]
    assert s.class_counts.tolist() == [4, 3, 3]
    assert s.per_class_accuracy.tolist() == [0.5, 2 / 3, 1.0]
    assert s.n == 10 and s.accuracy == 0.7
    assert s.worst_classes(2) == [(0, 0.5, 4), (1, 2 / 3, 3)]
    assert s.most_confused() == [(0, 1, 1), (0, 2, 1), (1, 0, 1)]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, list(range(10))),
        ({"which": "wrong"}, [2, 3, 6]),
        ({"which": "right"}, [0, 1, 4, 5, 7, 8, 9]),
        ({"true": 0}, [0, 1, 2, 3]),
        ({"true": "A", "predicted": "b"}, [2]),
        ({"predicted": 0}, [0, 1, 6]),
        ({"true": 2, "which": "wrong"}, []),
        ({"confidence": (0.95, 0.999)}, [1, 2, 6, 8, 9]),
        ({"sort": "confidence"}, [0, 4, 6, 1, 8, 2, 9, 3, 5, 7]),
        ({"sort": "least_confident"}, [7, 5, 3, 9, 2, 8, 1, 6, 4, 0]),
        ({"sort": "confidently_wrong"}, [6, 2, 3, 7, 5, 9, 8, 1, 4, 0]),
        ({"which": "wrong", "sort": "confidence"}, [6, 2, 3]),
        ({"which": "right", "confidence": (0.9, 1.0), "sort": "least_confident", "limit": 3}, [9, 8, 1]),
    ],
)
def test_filters_return_exactly_the_expected_indices(rigged_scan, options, expected):
    assert rigged_scan.filter(**options) == expected


@pytest.mark.parametrize(
    ("options", "words"),
    [({"which": "odd"}, "which must be one of"), ({"sort": "random"}, "sort must be one of"),
     ({"confidence": (0.8, 0.2)}, "0 <= low <= high <= 1"), ({"true": "zebra"}, "'zebra' is not one of"),
     ({"predicted": 3}, "class index 3 is out of range")],
)
def test_bad_filters_are_refused_with_a_message(rigged_scan, options, words):
    with pytest.raises(ValueError, match=words):
        rigged_scan.filter(**options)


def test_batches_do_not_change_the_scan_and_progress_is_reported(rigged, rigged_scan):
    images, labels = rigged_set()
    seen = []
    small = scan(rigged, images, labels, batch_size=3, progress=seen.append)
    assert seen == [0.3, 0.6, 0.9, 1.0]
    for field in ("predicted", "confidence", "p_true", "confusion"):
        assert torch.equal(getattr(small, field), getattr(rigged_scan, field)), field


def test_a_scan_from_logits_is_the_same_as_one_from_the_model(rigged, rigged_scan):
    images, labels = rigged_set()
    logits = SCALE * images[:, 0, 0, :3].float() / 255
    direct = scan_logits(logits, labels, CLASSES)
    assert torch.equal(direct.predicted, rigged_scan.predicted)
    assert torch.allclose(direct.confidence, rigged_scan.confidence, atol=1e-6)


def test_malformed_sets_are_refused(rigged):
    images, labels = rigged_set()
    with pytest.raises(DataError, match="uint8 images"):
        scan(rigged, images.float(), labels)
    with pytest.raises(DataError, match="10 images but labels of shape"):
        scan(rigged, images, labels[:4])
    with pytest.raises(DataError, match=r"labels must lie in 0..2 \(the model's 3 classes\), found 0..7"):
        scan(rigged, images, torch.tensor([7] + LABELS[1:]))
    other = EvalSet(images, labels, ["x", "y", "z"], "other")
    with pytest.raises(DataError, match=r"the set other is labelled with other classes \(x, y, z\) than the model's"):
        scan_set(rigged, other, cache=None)


def test_the_cache_keeps_one_scan_per_model_and_set_contents(rigged):
    images, labels = rigged_set()
    cache = ScanCache(per_model=2)
    first = cache.get(rigged, EvalSet(images, labels, CLASSES, "mine"))
    assert cache.get(rigged, EvalSet(images.clone(), labels.clone(), CLASSES, "mine")) is first
    changed = images.clone()
    changed[0, 0, 0, :3] = torch.tensor([0, 255, 0], dtype=torch.uint8)  # image 0 now predicted "b"
    second = cache.get(rigged, EvalSet(changed, labels, CLASSES, "mine"))  # same name, other content
    assert second is not first and second.predicted[0] == 1 and first.predicted[0] == 0
    cache.get(rigged, EvalSet(images[:5], labels[:5], CLASSES, "part"))  # a third set: the oldest goes
    assert len(cache) == 2
    assert cache.get(rigged, EvalSet(images, labels, CLASSES, "mine")) is not first


def test_the_cache_lets_a_model_go():
    cache = ScanCache()
    card = ModelCard(name="rigged", classes=CLASSES, mean=[0.0] * 3, std=[1.0] * 3, input_size=4, resize=4)
    explorer = Explorer(Rigged().eval(), card, device="cpu")
    images, labels = rigged_set()
    cache.get(explorer, EvalSet(images, labels, CLASSES, "mine"))
    assert len(cache) == 1
    del explorer
    gc.collect()
    assert len(cache) == 0


def test_concurrent_scans_and_lesioned_captures_on_one_model_do_not_disturb_each_other():
    # One shared model: threads scan while another captures with a block lesioned (hooks on the same model).
    torch.manual_seed(0)
    model = randomise_bn(build_model(TINY))
    explorer = Explorer(model, ModelCard.from_preset(CIFAR10, "tiny", config=TINY.to_dict()), device="cpu")
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,), generator=g)
    serial = scan(explorer, images, labels, batch_size=16)
    results, errors, stop = [], [], threading.Event()

    def scanning():
        try:
            results.append(scan(explorer, images, labels, batch_size=16))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def lesioning():
        x = explorer.batch_input(images[:8])
        while not stop.is_set():
            capture_forward(model, x, lesion=[explorer.block_names[0]])

    other = threading.Thread(target=lesioning)
    other.start()
    threads = [threading.Thread(target=scanning) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    other.join()
    assert not errors and len(results) == 3
    for r in results:
        assert torch.equal(r.predicted, serial.predicted) and torch.equal(r.confidence, serial.confidence)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.slow
def test_the_shipped_cifar10_model_on_its_evaluation_set_matches_a_direct_computation():
    explorer = Explorer.from_weights("weights/cifar10_resnet.safetensors", device="cpu")
    name = evalset_for(explorer.card)
    assert name == "cifar10_test500"
    data = load_evalset(name)
    s = scan_set(explorer, data, cache=None)
    with torch.inference_mode():
        logits = explorer.model(explorer.batch_input(data.images)).float()  # all 500 in one pass
    predicted = logits.argmax(dim=1)
    assert torch.equal(s.predicted, predicted)
    right = int((predicted == data.labels).sum())
    assert s.accuracy == right / 500 and int(s.confusion.diagonal().sum()) == right
    assert s.confusion.sum() == 500 and s.class_counts.tolist() == [50] * 10
    assert s.accuracy >= 0.9, s.accuracy  # the model's test accuracy is 93-94%
    assert torch.allclose(s.confidence, torch.softmax(logits, dim=1).max(dim=1).values, atol=1e-6)
    assert scan_set(explorer, data) is scan_set(explorer, data)  # the server's cache
    SCANS.clear()


# --- the pictures and words ------------------------------------------------------------------------------------


def test_a_click_on_the_confusion_picture_selects_the_cell_under_it(rigged_scan):
    lay = confusion_layout(CLASSES)
    img = confusion_image(rigged_scan)
    assert img.size == (lay.width, lay.height) and lay.cell == 40
    for t in range(3):
        for p in range(3):
            x0, y0 = lay.left + p * lay.cell, lay.top + t * lay.cell
            for x, y in ((x0, y0), (x0 + lay.cell - 1, y0 + lay.cell - 1), (x0 + 20.5, y0 + 3.2)):
                assert confusion_cell(CLASSES, x, y) == (t, p)
    mid = lay.cell // 2
    assert confusion_cell(CLASSES, lay.left - 30, lay.top + 2 * lay.cell + mid) == (2, None)  # a row's name
    assert confusion_cell(CLASSES, lay.left + lay.cell + mid, lay.top - 20) == (None, 1)  # a column's name
    assert confusion_cell(CLASSES, lay.left + 3 * lay.cell, lay.top + mid) is None  # right of the matrix
    assert confusion_cell(CLASSES, lay.left - 1, lay.top - 1) is None  # the corner above the row names
    assert confusion_cell(CLASSES, lay.left + mid, lay.top + 3 * lay.cell) is None  # below it


def test_the_confusion_picture_shows_right_green_wrong_red_and_nothing_white(rigged_scan):
    lay = confusion_layout(CLASSES)
    img = np.asarray(confusion_image(rigged_scan)).astype(int)

    def colour(t: int, p: int) -> np.ndarray:  # a pixel inside the cell, clear of the border and the number
        return img[lay.top + t * lay.cell + 4, lay.left + p * lay.cell + 4]

    for t in range(3):
        g = colour(t, t)
        assert g[1] > g[0] + 60 and g[1] > g[2] + 30, (t, g)  # green
    r = colour(0, 1)
    assert r[0] > r[1] + 20 and r[0] > r[2] + 20, r  # red: one of a's four images went to b
    assert colour(1, 2).tolist() == [255, 255, 255] and colour(2, 0).tolist() == [255, 255, 255]
    assert (colour(2, 2) < colour(0, 0)).all()  # c all right (3/3) is darker than a half right (2/4)
    cell = img[lay.top + 2 * lay.cell : lay.top + 3 * lay.cell, lay.left + 2 * lay.cell : lay.left + 3 * lay.cell]
    assert (cell.min(axis=2) > 240).any()  # the count "3" is written in white on the dark green


def test_gallery_items_are_enlarged_sharply_and_captioned(rigged_scan):
    images, _ = rigged_set()
    items = gallery_items(images, rigged_scan, [2, 0, 6], size=96)
    assert [c for _, c in items] == ["a → b 98%", "a ✓ 100%", "b → a 100%"]
    pic = np.asarray(items[0][0])
    assert items[0][0].size == (96, 96) and pic.shape == (96, 96, 3)
    assert np.array_equal(pic[::24, ::24], images[2].permute(1, 2, 0).numpy())  # 24× nearest neighbour
    assert (pic[:24, 24:48] == pic[0, 24]).all()
    assert caption(rigged_scan, 7) == "c ✓ 56%"
    assert len(gallery_items(images, rigged_scan, range(10), limit=4)) == 4
    assert set_image(images, 3).size == (4, 4) and set_image(images[:, :1], 3).mode == "L"


def test_the_summary_gives_accuracy_the_hardest_classes_and_the_most_confused_pairs(rigged_scan):
    assert scan_summary(rigged_scan) == (
        "**70.0%** right (7 of 10 images of rigged).  \n"
        "Hardest classes: a 50% (2/4), b 67% (2/3).  \n"
        "Most confused (true → predicted): a → b (1), a → c (1), b → a (1)."
    )
    perfect = scan_logits(torch.eye(3), torch.arange(3), CLASSES, "easy")
    assert scan_summary(perfect) == "**100.0%** right (3 of 3 images of easy).  \nNo image is predicted wrong."


def test_the_labelled_summary_says_what_was_read_and_skipped():
    data = LabelledSet(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 2]), CLASSES, "pets",
                       ["a/1.png", "a/2.png", "c/3.png"], {SKIP_NOT_IMAGE: 2, "unreadable image": 1},
                       ["c/4.png: truncated"])
    assert labelled_summary(data) == (
        "Read 3 images of 2 of the model's 3 classes from pets. Skipped 3 file(s): 2 not an image, "
        "1 unreadable image. Unreadable: c/4.png: truncated."
    )
