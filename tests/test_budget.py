"""The server's memory budget for studies (core/studies/budget.py): the estimate, the batch it plans, the refusal,
and that every study holds only the parts of the capture it uses."""

import threading

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_PROJ, randomise_bn

from resnet_demo.core.capture import activation_sizes, block_shapes
from resnet_demo.core.explorer import Explorer
from resnet_demo.core.model import build_model
from resnet_demo.core.studies import bands, budget, errorscan, exemplars, lesions
from resnet_demo.core.studies.budget import Footprint, StudyTooLarge, budgeted, footprint, held, plan
from resnet_demo.core.studies.evalsets import EvalSet
from resnet_demo.core.weights.cards import CIFAR10, ModelCard


def tiny(config=TINY, seed=0):
    torch.manual_seed(seed)
    model = randomise_bn(build_model(config), seed)
    card = ModelCard.from_preset(CIFAR10, "tiny", config=config.to_dict(), weights_sha256="0" * 64)
    return Explorer(model, card, "cpu")


def images(n=24, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_the_estimate_is_the_block_shapes_times_the_bytes():
    ex = tiny(TINY_PROJ)
    x = ex.batch_input(images(1))
    shapes, largest = activation_sizes(ex.model, x)
    assert shapes == block_shapes(ex.model, x)
    sizes = {name: (int(np.prod(a)), int(np.prod(b))) for name, (a, b) in shapes.items()}
    assert largest == 8 * 32 * 32 == max(max(pair) for pair in sizes.values())  # the stem's and res1's width
    assert footprint(ex.model, x) == Footprint(4 * budget.WORKING_SET * largest, budget.OVERHEAD)
    kept = sum(x_ + y for x_, y in sizes.values()) + 2 * sum(y for _, y in sizes.values())  # x, y, and f, s
    assert footprint(ex.model, x, kept=("x", "f", "s", "y")).per_image == 4 * (budget.WORKING_SET * largest + kept)
    grad = footprint(ex.model, x, grad=True, fixed=123)
    assert grad == Footprint(4 * (budget.WORKING_SET * largest + budget.SAVED_FOR_GRAD * sum(map(sum, sizes.values()))),
                             budget.OVERHEAD + 123)
    assert footprint(ex.model, x, working=5).per_image == 4 * 5 * largest  # a pass with one more tensor alive
    assert footprint(ex.model.double(), x.double()).per_image == 8 * budget.WORKING_SET * largest  # bytes per element


def test_the_largest_activation_may_be_outside_every_block():
    # torchvision's ResNet-18: the stem's 7x7 convolution (stride 2) outputs 64 channels at half the input's side,
    # four times the size of any block's output (after the max-pool)
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    shapes, largest = activation_sizes(model, torch.randn(1, 3, 64, 64))
    assert largest == 64 * 32 * 32 == 4 * max(int(np.prod(y)) for _, y in shapes.values())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_plan_takes_the_largest_batch_that_fits_or_refuses_with_a_sentence():
    need = Footprint(per_image=1000, fixed=500)
    assert plan(need, 64, what="A study", budget=10**6) == 64
    assert plan(need, 64, what="A study", budget=10_500) == 10
    with pytest.raises(StudyTooLarge, match=r"^A study would need about 0 MiB of memory at once \(4 images per pass\), "
                                            r"more than this server allows a study \(0 MiB\); it was not started\.$"):
        plan(need, 64, what="A study", smallest=4, budget=4000)
    big = Footprint(per_image=3 * 2**30)
    with pytest.raises(StudyTooLarge, match=r"about 3\.0 GiB .* \(2\.0 GiB\)"):
        plan(big, 100, what="CKA", budget=2 * 2**30)


def test_the_budget_is_shared_by_the_studies_running_at_once():
    need = Footprint(per_image=1000)
    with budgeted(need, 8, what="First", budget=10_000) as first:
        assert first == 8 and held() == 8000
        with budgeted(need, 8, what="Second", budget=10_000) as second:
            assert second == 2 and held() == 10_000  # the room the first leaves
            with pytest.raises(StudyTooLarge, match=r"^Third would need .* other studies running on this server "
                                                    r"hold .* try again when they are done\.$"):
                with budgeted(need, 8, what="Third", budget=10_000):
                    pass
        assert held() == 8000
    assert held() == 0
    with pytest.raises(RuntimeError):
        with budgeted(need, 8, what="Failing", budget=10_000):
            raise RuntimeError("the study failed")
    assert held() == 0  # given back whatever happens


def test_the_module_budget_applies_to_every_study(monkeypatch):
    ex = tiny()
    data = images()
    labels = torch.arange(len(data)) % 10
    monkeypatch.setattr(budget, "BUDGET", 1000)
    for study in (
        lambda: lesions.scan_explorer(ex, data, labels),
        lambda: errorscan.scan(ex, data, labels),
        lambda: exemplars.scan_exemplars(ex, EvalSet(data, labels, list(CIFAR10.classes), "random"), k=3),
        lambda: bands.compute_bands(ex.model, data, normalise=ex.batch_input),
        lambda: bands.band_values(ex.model, data, normalise=ex.batch_input),
    ):
        with pytest.raises(StudyTooLarge, match="it was not started"):
            study()
    assert held() == 0


def test_a_smaller_batch_to_fit_the_budget_gives_the_same_results(monkeypatch):
    ex = tiny()
    data = images()
    labels = torch.arange(len(data)) % 10
    evalset = EvalSet(data, labels, list(CIFAR10.classes), "random")
    full = (lesions.scan_explorer(ex, data, labels), errorscan.scan(ex, data, labels),
            exemplars.scan_exemplars(ex, evalset, k=3), bands.band_values(ex.model, data, normalise=ex.batch_input))
    need = footprint(ex.model, ex.batch_input(data[:1]), kept=("x",), working=budget.WORKING_SET + 1)  # the lesions'
    monkeypatch.setattr(budget, "BUDGET", need.fixed + 5 * need.per_image + 1)  # 5 images per pass
    sizes = []
    real = budget.plan

    def spy(*args, **kw):
        sizes.append(real(*args, **kw))
        return sizes[-1]

    monkeypatch.setattr(budget, "plan", spy)
    small = (lesions.scan_explorer(ex, data, labels), errorscan.scan(ex, data, labels),
             exemplars.scan_exemplars(ex, evalset, k=3), bands.band_values(ex.model, data, normalise=ex.batch_input))
    assert all(s < 24 for s in sizes) and len(sizes) == 5
    assert np.array_equal(small[0].lesions.correct, full[0].lesions.correct)
    assert np.array_equal(small[0].curves.correct, full[0].curves.correct)
    torch.testing.assert_close(small[1].confidence, full[1].confidence, rtol=1e-6, atol=1e-6)
    assert torch.equal(small[1].predicted, full[1].predicted)
    for key in full[2].arrays:
        if key.endswith(("_index", "_pos")):
            assert np.array_equal(small[2].arrays[key], full[2].arrays[key]), key
        else:
            np.testing.assert_allclose(small[2].arrays[key], full[2].arrays[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full[2].geometry, small[2].geometry, rtol=1e-5, atol=1e-6)  # float32 sums
    for metric in full[3]:
        for block in full[3][metric]:
            np.testing.assert_allclose(small[3][metric][block], full[3][metric][block], rtol=1e-6)


@pytest.mark.parametrize("study", ["bands", "exemplars"])
def test_a_study_captures_only_the_parts_it_uses(monkeypatch, study):
    ex = tiny(TINY_PROJ)
    data = images(12)
    module = bands if study == "bands" else exemplars
    seen = []
    real = module.capture_forward

    def spy(model, x, **kw):
        logits, records = real(model, x, **kw)
        seen.append((len(x), records))
        return logits, records

    monkeypatch.setattr(module, "capture_forward", spy)
    if study == "bands":
        bands.compute_bands(ex.model, data, normalise=ex.batch_input, batch_size=6)
        for n, records in seen:  # ratio and cosine: F(x) and s(x), nothing else
            assert all(r.x is None and r.y is None and r.f.shape[0] == r.s.shape[0] == n for r in records)
    else:
        exemplars.scan_exemplars(ex, EvalSet(data, torch.arange(12) % 10, list(CIFAR10.classes), "random"), k=3,
                                 batch_size=6)
        for n, records in seen:  # per channel: mean, argmax and argmin of x, F(x) and y; no map, no s(x)
            assert all(r.s is None for r in records)
            for r in records:
                for t, width in ((r.x, r.x.shape[1]), (r.f, r.f.shape[1]), (r.y, r.y.shape[1])):
                    assert t.shape == (n, width, 3)
    assert len(seen) == 2


def test_lesion_and_error_scans_record_nothing(monkeypatch):
    # the lesion study captures with record=False (interventions only); the error scan runs bare passes
    ex = tiny()
    data = images(8)
    opened = []
    from resnet_demo.core import capture as capture_module

    real = capture_module.capture

    def spy(model, **kw):
        opened.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(lesions, "capture", spy)
    lesions.scan_explorer(ex, data, torch.arange(8) % 10)
    assert opened and all(kw.get("record") is False for kw in opened)
    errorscan.scan(ex, data, torch.arange(8) % 10)


def test_concurrent_studies_hold_their_estimates_and_give_them_back():
    ex = tiny()
    data = images(16)
    errors = []

    def work():
        try:
            errorscan.scan(ex, data, torch.arange(16) % 10)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and held() == 0
