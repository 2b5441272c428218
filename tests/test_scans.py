"""The lesion study over a data set: per-class lesions, accuracy against alpha, its command (one process and
two under torchrun), and its charts. A tiny ResNet trained for a few steps on a synthetic four-class task
(which quadrant is brighter) gives lesions that matter for some classes and not others."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY
from test_distributed import torchrun

from resnet_demo.core.capture import capture
from resnet_demo.core.errors import DataError
from resnet_demo.core.model import build_model
from resnet_demo.core.studies.lesions import NONE, AlphaCurves, ClassLesions, LesionScan, _Runner, lesion_scan
from resnet_demo.core.weights.cards import ModelCard
from resnet_demo.core.weights.files import file_sha256, save_weights
from resnet_demo.core.weights.load import load_model
from resnet_demo.training.data import Normalise
from resnet_demo.training.scan import main as scan_main
from resnet_demo.view.lesion_charts import alpha_chart, class_lesion_map

CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
NORMALISE = Normalise(MEAN, STD, 3, "cpu", channels_last=False)


def quadrants(n, seed):
    """uint8 noise (N, 3, 16, 16) with the quadrant of each image's class 40 levels brighter."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randint(0, 160, (n, 3, 16, 16), generator=g)
    for k in range(4):
        r, c = divmod(k, 2)
        images[labels == k, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] += 40
    return images.to(torch.uint8), labels


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny passes: on a busy machine a second thread only waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """A tiny ResNet after 15 Adam steps: about two thirds right, blocks of very different importance."""
    torch.manual_seed(0)
    model = build_model(TINY.to_dict() | {"num_classes": 4})
    images, labels = quadrants(256, 0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(15):
        i = torch.randint(0, 256, (32,))
        loss = torch.nn.functional.cross_entropy(model(NORMALISE(images[i])), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def testset():
    return quadrants(90, 1)


def counts_by_class(logits, labels):
    return torch.bincount(labels[logits.argmax(1) == labels], minlength=4).tolist()


# --- the study -------------------------------------------------------------------------------------


def test_the_no_lesion_row_is_the_per_class_accuracy(trained, testset):
    images, labels = testset
    scan = lesion_scan(trained, images, labels, classes=CLASSES, normalise=NORMALISE, alphas=[0, 1], batch_size=16)
    with torch.inference_mode():
        logits = trained(NORMALISE(images))
    direct = counts_by_class(logits, labels)
    support = torch.bincount(labels, minlength=4)
    les = scan.lesions
    assert les.rows == [NONE, "res1", "res2", "res3"] and les.classes == CLASSES
    assert les.correct[0].tolist() == direct and les.support.tolist() == support.tolist() and les.n == 90
    assert les.accuracy[0].tolist() == (np.array(direct) / support.numpy()).tolist()
    assert les.error()[NONE] == 1 - sum(direct) / 90
    assert np.all(les.drop[0] == 0)
    # The task is learnt, and some lesion costs some class many images while another costs little.
    assert 0.5 < sum(direct) / 90 < 1
    assert les.drop[1:].min() < -0.3 and les.drop[1:].max() > -0.1


def test_every_count_equals_a_full_forward_pass_with_the_block_scaled(trained, testset):
    images, labels = testset
    alphas = [0.0, 0.5, 1.0, 1.5]
    scan = lesion_scan(trained, images, labels, classes=CLASSES, normalise=NORMALISE, alphas=alphas, batch_size=16)
    want_rows = np.zeros((4, 4), dtype=np.int64)
    want_curves = np.zeros((3, 4), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, 90, 16):  # the scan's batches
            x, y = NORMALISE(images[start : start + 16]), labels[start : start + 16]
            want_rows[0] += counts_by_class(trained(x), y)
            for b, name in enumerate(["res1", "res2", "res3"]):
                with capture(trained, lesion=[name], record=False):
                    want_rows[1 + b] += counts_by_class(trained(x), y)
                for a, alpha in enumerate(alphas):
                    with capture(trained, scale={name: alpha}, record=False):
                        want_curves[b, a] += int((trained(x).argmax(1) == y).sum())
    assert scan.lesions.correct.tolist() == want_rows.tolist()
    assert scan.curves.correct.tolist() == want_curves.tolist() and scan.curves.n == 90
    assert scan.curves.alphas == alphas and scan.curves.blocks == ["res1", "res2", "res3"]
    # alpha 0 is the lesion and alpha 1 the intact model
    assert scan.curves.correct[:, 0].tolist() == want_rows[1:].sum(1).tolist()
    assert scan.curves.correct[:, 2].tolist() == [want_rows[0].sum()] * 3
    assert len(set(scan.curves.correct.ravel().tolist())) > 4  # the curves are not flat


def test_resuming_from_a_blocks_kept_input_gives_the_full_passes_logits_bit_for_bit(trained, testset):
    x = NORMALISE(testset[0][:20])
    runner = _Runner(trained)
    assert runner.steps is not None
    with torch.inference_mode():
        intact, inputs = runner.intact(x)
        assert torch.equal(intact, trained(x))
        for name in ("res1", "res2", "res3"):
            for alpha in (0.0, 0.5, 2.0):
                with capture(trained, scale={name: alpha}, record=False):
                    want = trained(x)
                assert torch.equal(runner.scaled(x, inputs, name, alpha), want)


def test_the_study_round_trips_through_json(trained, testset):
    images, labels = testset
    scan = lesion_scan(trained, images[:30], labels[:30], classes=CLASSES, normalise=NORMALISE, alphas=[2, 0, 0.5])
    d = json.loads(json.dumps(scan.to_dict(), allow_nan=False))
    back = LesionScan.from_dict(d)
    assert back.curves.alphas == [0.0, 0.5, 2.0]  # sorted
    assert np.array_equal(back.lesions.correct, scan.lesions.correct)
    assert np.array_equal(back.curves.correct, scan.curves.correct) and back.n == 30
    assert d["accuracy"][NONE] == round(float(scan.lesions.overall[0]), 6)
    with pytest.raises(ValueError, match="not a stored lesion scan"):
        LesionScan.from_dict({"per_class": d["per_class"]})
    d["per_class"]["correct"] = d["per_class"]["correct"][:2]
    with pytest.raises(ValueError, match=r"the per-class matrix has shape \(2, 4\), expected \(4, 4\)"):
        LesionScan.from_dict(d)


def test_bad_input_is_refused_with_a_reason(trained, testset):
    images, labels = testset
    kw = dict(classes=CLASSES, normalise=NORMALISE)
    with pytest.raises(DataError, match="labels run from 0 to 3, but there are 3 classes"):
        lesion_scan(trained, images, labels, classes=CLASSES[:3], normalise=NORMALISE)
    with pytest.raises(DataError, match="expected uint8 images"):
        lesion_scan(trained, images.float(), labels, **kw)
    with pytest.raises(DataError, match="one integer label per image"):
        lesion_scan(trained, images, labels[:5], **kw)
    with pytest.raises(ValueError, match="alphas must be finite numbers, got nan"):
        lesion_scan(trained, images, labels, alphas=[0, float("nan")], **kw)
    with pytest.raises(ValueError, match="the model gives 4 logits, but 5 classes were named"):
        lesion_scan(trained, images, labels, classes=[*CLASSES, "x"], normalise=NORMALISE)


# --- the command -----------------------------------------------------------------------------------


def write_model_and_data(folder, trained, testset):
    card = ModelCard(name="quad", classes=CLASSES, mean=MEAN, std=STD, config=TINY.to_dict() | {"num_classes": 4},
                     input_size=16, resize=16, metrics={"accuracy": 0.7})
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "quad.safetensors"
    save_weights(trained, card, weights)
    data = folder.parent / "quad.npz"
    np.savez(data, images=testset[0].numpy(), labels=testset[1].numpy(), classes=np.array(CLASSES))
    return weights, data


def test_scan_command_writes_the_card_and_keeps_the_weights(tmp_path, trained, testset):
    weights, data = write_model_and_data(tmp_path / "w", trained, testset)
    before = weights.read_bytes()
    args = ["--weights", str(weights), "--data", str(data), "--limit", "60", "--alphas", "0", "0.5", "1",
            "--device", "cpu", "--batch-size", "16"]
    study = scan_main(args)
    saved = json.loads(weights.with_suffix(".json").read_text())
    assert saved["studies"]["lesions"] == json.loads(json.dumps(study))
    assert weights.read_bytes() == before and saved["weights_sha256"] == file_sha256(weights)
    assert saved["metrics"] == {"accuracy": 0.7}
    assert study["n"] == 60 and study["data"] == "quad.npz" and study["split"] == "test"
    assert study["processes"] == 1 and study["command"].startswith("python -m resnet_demo.training.scan --weights")
    model, card = load_model(weights)  # the sha256 check still passes
    images, labels = testset
    idx = torch.randperm(90, generator=torch.Generator().manual_seed(0))[:60].sort().values  # subset's draw
    want = lesion_scan(model, images[idx], labels[idx], classes=CLASSES, normalise=NORMALISE, alphas=[0, 0.5, 1],
                       batch_size=16)
    assert LesionScan.from_dict(card.studies["lesions"]).lesions.correct.tolist() == want.lesions.correct.tolist()
    assert study["alpha_curves"]["correct"] == want.curves.correct.tolist()


def test_scan_command_refuses_data_of_other_classes(tmp_path, trained, testset, capsys):
    weights, _ = write_model_and_data(tmp_path / "w", trained, testset)
    other = tmp_path / "other.npz"
    np.savez(other, images=testset[0].numpy(), labels=testset[1].numpy(), classes=np.array(list("abcd")))
    with pytest.raises(SystemExit) as exc:
        scan_main(["--weights", str(weights), "--data", str(other), "--device", "cpu"])
    assert exc.value.code == 2
    assert "do not match the model card's ['top-left'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_scan_by_two_processes_under_torchrun_equals_one_process(tmp_path, trained, testset):
    one, data = write_model_and_data(tmp_path / "one", trained, testset)
    two, _ = write_model_and_data(tmp_path / "two", trained, testset)
    sha = file_sha256(two)
    common = ["--data", str(data), "--alphas", "0", "0.5", "1", "2", "--device", "cpu", "--batch-size", "8"]
    scan_main(["--weights", str(one), *common])
    done = torchrun(["-m", "resnet_demo.training.scan", "--weights", str(two), *common])
    assert done.stdout.count("written to") == 1  # rank 0 alone reports and writes
    got = json.loads(two.with_suffix(".json").read_text())["studies"]["lesions"]
    want = json.loads(one.with_suffix(".json").read_text())["studies"]["lesions"]
    assert (got["processes"], want["processes"]) == (2, 1)
    assert got["command"].startswith("torchrun --nproc-per-node 2 -m resnet_demo.training.scan --weights")
    for key in ("command", "processes", "seconds"):
        del got[key], want[key]
    assert got == want and got["n"] == 90
    assert file_sha256(two) == sha


# --- charts ----------------------------------------------------------------------------------------


def test_heat_map_colours_each_cell_by_its_accuracy_change():
    lesions = ClassLesions([NONE, "res1", "res2"], ["a", "b"], np.array([[10, 10], [10, 0], [10, 10]]),
                           np.array([10, 10]))
    img = class_lesion_map(lesions, cell=(56, 24))
    assert img.size == (420, 78 + 3 * 24 + 40)
    left, top = 70, 78

    def centre_left(i, j):  # a pixel inside cell (row i, column j), away from its number
        return img.getpixel((left + j * 56 + 4, top + i * 24 + 4))

    assert centre_left(0, 0) == (238, 238, 238)  # the intact row is grey
    r, g, b = centre_left(1, 1)  # res1 loses all of class b: full red
    assert r > 80 and g < 30 and b < 40
    r, g, b = centre_left(2, 0)  # res2 changes nothing: near white
    assert min(r, g, b) > 230
    r, g, b = centre_left(1, 2)  # res1 over all images: -50 points, half the scale's colour
    assert r > g + 60 and r > b + 60


def test_alpha_chart_draws_one_line_per_block_and_marks_alpha_one():
    curves = AlphaCurves(["res1", "res2"], [0.0, 1.0, 2.0], np.array([[10, 90, 50], [80, 90, 85]]), 100)
    img = alpha_chart(curves, width=600, height=300)
    assert img.size == (600, 300)
    pixels = np.asarray(img).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert (0x1F, 0x77, 0xB4) in colours and (0xFF, 0x7F, 0x0E) in colours  # the two blocks' colours
    # res1's line at alpha 0 sits at 10%: its first dot, 62 px from the left, low in the plot
    x0, y0, x1, y1 = 62, 48, 600 - 110, 300 - 50
    y = round(y1 - 0.1 * (y1 - y0))  # the axis runs to 100%
    r, g, b = img.getpixel((x0 + 2, y))
    assert b > r + 60  # blue
    # the dashed intact line at alpha 1, half-way along
    column = np.asarray(img)[y0 + 30 : y1 - 30, round((x0 + x1) / 2)]
    assert (column.sum(1) < 400).sum() > 20
