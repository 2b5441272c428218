"""Linear CKA (Kornblith et al. 2019) and block similarity over a data set, with values."""

import math

import pytest
import torch
from conftest import TINY, TINY_PROJ, randomise_bn

from resnet_demo.core.explorer import Explorer
from resnet_demo.core.model import build_model
from resnet_demo.core.studies.evalsets import evalset_for, load_evalset
from resnet_demo.core.studies.similarity import block_similarity, gram, hsic_unbiased, linear_cka
from resnet_demo.core.weights.cards import tutorial_card


def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(50, 7, 3, 3, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 12, generator=g, dtype=torch.float64), torch.randn(40, 5, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))  # an orthogonal matrix
    base = linear_cka(x, y)
    assert 0 < base < 1
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x * 7.5, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, y * 0.01) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x + 3.0, y) == pytest.approx(base, abs=1e-12)  # and to a shift (features are centred)


def test_cka_is_not_invariant_to_an_arbitrary_linear_map():
    # Kornblith et al.'s point: CKA is not invariant to invertible linear transforms (CCA would be).
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64)
    stretch = torch.diag(torch.tensor([10.0, 1.0, 1.0, 0.1], dtype=torch.float64))
    assert abs(linear_cka(x @ stretch, y) - linear_cka(x, y)) > 1e-3


def test_a_small_example_by_hand():
    # x = (1, 2, 3), y = (1, 0, 1): centred x = (-1, 0, 1), centred y = (1/3, -2/3, 1/3).
    # For one feature each, linear CKA = <xc, yc>^2 / (|xc|^2 |yc|^2) = 0 here (xc is orthogonal to yc) ...
    x = torch.tensor([[1.0], [2.0], [3.0]])
    assert linear_cka(x, torch.tensor([[1.0], [0.0], [1.0]])) == pytest.approx(0.0, abs=1e-12)
    # ... and for y = (1, 1, 4): yc = (-1, -1, 2), <xc, yc> = 3, |xc|^2 = 2, |yc|^2 = 6: CKA = 9 / 12.
    assert linear_cka(x, torch.tensor([[1.0], [1.0], [4.0]])) == pytest.approx(9 / 12, abs=1e-12)


def test_blocks_of_different_widths_and_sizes_are_compared_flattened():
    g = torch.Generator().manual_seed(3)
    wide_small = torch.randn(20, 64, 4, 4, generator=g)  # 1,024 features per example
    narrow_big = torch.randn(20, 8, 16, 16, generator=g)  # 2,048 features per example
    value = linear_cka(wide_small, narrow_big)
    manual = linear_cka(wide_small.reshape(20, -1), narrow_big.reshape(20, -1))
    assert value == pytest.approx(manual, abs=1e-12) and 0 < value < 1
    assert gram(wide_small).shape == (20, 20)


def test_unbiased_hsic_matches_its_formula():
    # Song et al. (2012), eq. (5), written out with loops over a small Gram pair.
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    k, l_ = x @ x.T, y @ y.T
    n = 6
    kt, lt = k.clone().fill_diagonal_(0), l_.clone().fill_diagonal_(0)
    want = (torch.trace(kt @ lt) + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (kt @ lt).sum())
    want = want / (n * (n - 3))
    assert float(hsic_unbiased(k, l_)) == pytest.approx(float(want), rel=1e-12)


def explorer(config, seed):
    torch.manual_seed(seed)
    return Explorer(randomise_bn(build_model(config), seed), tutorial_card(trained=False), "cpu")


def test_a_model_against_itself_has_ones_on_the_diagonal_and_is_symmetric():
    a = explorer(TINY, 0)
    images = torch.randint(0, 256, (24, 3, 32, 32), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    sim = block_similarity(a, a, images, batch_size=12)
    assert sim.blocks_a == sim.blocks_b == a.block_names and sim.n == 24
    assert torch.allclose(torch.diagonal(sim.matrix), torch.ones(len(a.block_names), dtype=torch.float64), atol=1e-9)
    assert torch.allclose(sim.matrix, sim.matrix.T, atol=1e-9)


def test_block_similarity_with_one_batch_is_the_unbiased_cka_of_the_set():
    a, b = explorer(TINY, 0), explorer(TINY_PROJ, 1)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    sim = block_similarity(a, b, images, batch_size=16)
    from resnet_demo.core.capture import capture_forward

    ya = [r.y for r in capture_forward(a.model, a.batch_input(images))[1]]
    yb = [r.y for r in capture_forward(b.model, b.batch_input(images))[1]]
    for i, p in enumerate(ya):
        for j, q in enumerate(yb):
            k, l_ = gram(p), gram(q)
            want = hsic_unbiased(k, l_) / math.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l_, l_))
            assert float(sim.matrix[i, j]) == pytest.approx(float(want), abs=1e-9)


def test_the_shipped_evaluation_sets_feed_the_models_as_they_were_trained():
    # batch_input on an evaluation set must reproduce the shipped model's accuracy (its card: 93% / 99.6%).
    from conftest import ROOT

    for name, bar in (("cifar10_resnet", 0.88), ("mnist_resnet", 0.98)):
        path = ROOT / "weights" / f"{name}.safetensors"
        if not path.is_file():
            pytest.skip("shipped weights absent")
        ex = Explorer.from_weights(path, "cpu")
        data = load_evalset(evalset_for(ex.card))
        data = data._replace(images=data.images[:200], labels=data.labels[:200])
        with torch.inference_mode():
            pred = torch.cat([ex.model(ex.batch_input(data.images[s : s + 100])).argmax(1)
                              for s in range(0, len(data.labels), 100)])
        assert float((pred == data.labels).float().mean()) >= bar


# --- what each model sees: the page's preprocessing, batched ---------------------------------------------

from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from resnet_demo.core.studies import similarity  # noqa: E402
from resnet_demo.core.weights.cards import MNIST, ModelCard  # noqa: E402


def grey_explorer(channels, seed=2):
    """A tiny model with MNIST's card (grey input) and ``channels`` input channels (the shipped MNIST model has 3)."""
    torch.manual_seed(seed)
    config = replace(TINY, in_channels=channels)
    card = ModelCard.from_preset(MNIST, f"tiny-grey{channels}", config=config.to_dict(), trained=False)
    return Explorer(randomise_bn(build_model(config), seed), card, "cpu")


def photo(explorer, image):
    """What the page feeds ``explorer`` for one uint8 (C, H, W) image taken as a photo."""
    arr = image.permute(1, 2, 0).numpy()
    return explorer.prepare(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr), kind="photo").tensor


def test_luma_is_pils_grey_conversion_exactly():
    rgb = torch.randint(0, 256, (1, 3, 64, 64), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    rgb[0, :, 0, :4] = torch.tensor([[0, 255, 255, 128], [0, 255, 0, 128], [0, 255, 0, 128]], dtype=torch.uint8)
    want = np.asarray(Image.fromarray(rgb[0].permute(1, 2, 0).numpy()).convert("L"))
    assert np.array_equal(similarity._luma(rgb)[0, 0].numpy(), want)


def test_each_model_gets_what_the_page_gives_it_for_the_same_image():
    g = torch.Generator().manual_seed(8)
    colour = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8)
    grey = torch.randint(0, 256, (1, 32, 32), generator=g, dtype=torch.uint8)
    odd = torch.randint(0, 256, (3, 28, 40), generator=g, dtype=torch.uint8)  # another size: resized, cropped
    rgb_model = explorer(TINY, 0)
    cases = [(grey_explorer(3), colour), (grey_explorer(1), colour), (grey_explorer(3), grey), (rgb_model, colour),
             (rgb_model, grey), (rgb_model, odd), (grey_explorer(3), odd)]
    for ex, image in cases:
        got = similarity.model_input(ex, image[None])
        assert got.shape == (1, ex.in_channels, 32, 32)
        torch.testing.assert_close(got, photo(ex, image), rtol=0, atol=1e-6)
    # a batch is each image on its own
    batch = torch.stack([colour, torch.flip(colour, dims=(2,))])
    ex = grey_explorer(3)
    torch.testing.assert_close(similarity.model_input(ex, batch), torch.cat([photo(ex, im) for im in batch]),
                               rtol=0, atol=1e-6)
    # what it replaces: batch_input gives a 3-channel grey model the colour channels as they are
    assert (ex.batch_input(colour[None]) - photo(ex, colour)).abs().max() > 0.1


def test_block_similarity_feeds_b_as_the_page_does():
    a, b = explorer(TINY, 0), grey_explorer(3)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    sim = block_similarity(a, b, images, batch_size=16)
    from resnet_demo.core.capture import capture_forward

    ya = [r.y for r in capture_forward(a.model, a.batch_input(images))[1]]
    yb = [r.y for r in capture_forward(b.model, torch.cat([photo(b, im) for im in images]))[1]]
    for i, p in enumerate(ya):
        for j, q in enumerate(yb):
            k, l_ = gram(p), gram(q)
            want = hsic_unbiased(k, l_) / math.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l_, l_))
            assert float(sim.matrix[i, j]) == pytest.approx(float(want), abs=1e-9)


# --- memory: the study keeps only Gram matrices, and fits the budget or is refused -------------------------


def test_a_gram_matrix_in_slices_is_the_gram_matrix(monkeypatch):
    x = torch.randn(6, 5, 7, 3, generator=torch.Generator().manual_seed(10))
    whole = gram(x)
    monkeypatch.setattr(similarity, "GRAM_SLICE", 6 * 4)  # 4 features at a time, the last slice shorter
    torch.testing.assert_close(gram(x), whole, rtol=1e-14, atol=1e-12)
    flat = x.reshape(6, -1).double()
    torch.testing.assert_close(whole, flat @ flat.T, rtol=0, atol=0)


def test_the_study_keeps_only_the_gram_matrices_of_the_block_outputs(monkeypatch):
    a, b = explorer(TINY, 0), explorer(TINY_PROJ, 1)
    images = torch.randint(0, 256, (10, 3, 32, 32), generator=torch.Generator().manual_seed(11), dtype=torch.uint8)
    want = block_similarity(a, b, images, batch_size=5).matrix
    held = []
    real = similarity.capture_forward

    def spy(model, x, **kw):
        logits, records = real(model, x, **kw)
        held.append([(r.x, r.f, r.s, r.y) for r in records])
        return logits, records

    monkeypatch.setattr(similarity, "capture_forward", spy)
    sim = block_similarity(a, b, images, batch_size=5)
    assert torch.equal(sim.matrix, want)
    assert len(held) == 4  # two batches, two models
    for records in held:
        for x, f, s, y in records:
            assert x is None and f is None and s is None
            assert y.shape == (5, 5) and y.dtype == torch.float64  # the Gram matrix, not the (5, C, H, W) output
    # everything the capture held for a batch: blocks x 5 x 5 float64 numbers
    assert max(sum(t[3].nbytes for t in records) for records in held) == 8 * 5 * 5 * len(a.block_names)


def test_a_study_over_the_budget_is_refused_before_it_starts():
    from resnet_demo.core.studies.budget import StudyTooLarge, held

    a = explorer(TINY, 0)
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(12), dtype=torch.uint8)
    done = []
    with pytest.raises(StudyTooLarge, match=r"Block similarity of tutorial and tutorial over 8 images would need "
                                            r"about \d+ MiB of memory at once .*it was not started"):
        block_similarity(a, a, images, batch_size=8, progress=done.append, budget=100_000)
    assert done == [] and held() == 0
    assert block_similarity(a, a, images, batch_size=8, budget=2**30).n == 8
