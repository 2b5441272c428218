"""Data-set exemplars: the stored files against a direct computation, the scan, the crops, the loader's refusals,
the on-demand cache, and the exemplar grid picture."""

import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, randomise_bn

from resnet_demo.core.errors import DataError, InputError, WeightsError
from resnet_demo.core.explorer import Explorer
from resnet_demo.core.model import ResidualBlock, build_model
from resnet_demo.core.studies.distributed import Dist
from resnet_demo.core.studies.evalsets import EvalSet, evalset_for, load_evalset
from resnet_demo.core.studies.exemplars import (
    Exemplars,
    exemplars_file,
    exemplars_for,
    load_exemplars,
    scan_exemplars,
)
from resnet_demo.core.weights.cards import CIFAR10, MNIST, ModelCard
from resnet_demo.core.weights.files import file_sha256
from resnet_demo.core.weights.load import load_model
from resnet_demo.view.channel_view import exemplar_grid

WEIGHTS = ROOT / "weights"
SHIPPED = ["cifar10_resnet", "mnist_resnet"]
VIEWS = ("x", "f", "y")


# --- a direct computation: a plain forward pass with one hook per block, none of the scan's code -------------


def _direct(model, x_all: torch.Tensor, stored: Exemplars, batch: int = 100):
    """Per view: (N, channels) mean of every channel on every image (blocks concatenated in forward order), and
    for every stored (top / bottom) entry the map's value at the stored peak and the map's max / min there.
    Plain hooks: on each block for x and y, on its branch for F(x)."""
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    branch_of = {b.branch: b for b in blocks}
    means = {v: [] for v in VIEWS}
    peaks = {}  # (view, which) -> (value at stored position, extreme of the map), both (channels, k)
    for v, which in [(v, "top") for v in VIEWS] + [("f", "bottom")]:
        shape = stored.arrays[f"{v}_{which}_index"].shape
        peaks[(v, which)] = (np.full(shape, np.nan), np.full(shape, np.nan))
    for start in range(0, len(x_all), batch):
        seen = {}

        def on_block(module, inputs, output, seen=seen):
            seen.setdefault(module, {}).update(x=inputs[0], y=output)

        def on_branch(module, _inputs, output, seen=seen):
            seen.setdefault(branch_of[module], {})["f"] = output

        handles = [b.register_forward_hook(on_block) for b in blocks]
        handles += [b.branch.register_forward_hook(on_branch) for b in blocks]
        try:
            with torch.inference_mode():
                model(x_all[start : start + batch])
        finally:
            for h in handles:
                h.remove()
        for v in VIEWS:
            per_block = [seen[b][v] for b in blocks]
            means[v].append(torch.cat([t.double().mean(dim=(2, 3)) for t in per_block], dim=1))
            for which in ("top", "bottom") if v == "f" else ("top",):
                _peaks_in_batch(per_block, stored, v, which, start, peaks[(v, which)])
    return {v: torch.cat(parts).numpy() for v, parts in means.items()}, peaks


def _peaks_in_batch(per_block, stored, v, which, start, out):
    index = stored.arrays[f"{v}_{which}_index"].astype(np.int64)
    pos = stored.arrays[f"{v}_{which}_pos"].astype(np.int64)
    first = 0
    for t in per_block:
        c = t.shape[1]
        rows = slice(first, first + c)
        idx, p = index[rows], pos[rows]
        inside = (idx >= start) & (idx < start + t.shape[0])
        ch, kk = np.nonzero(inside)
        img = idx[ch, kk] - start
        at = t[img, ch, p[ch, kk, 0], p[ch, kk, 1]].numpy()
        flat = t.flatten(2)
        extreme = (flat.amax(dim=2) if which == "top" else flat.amin(dim=2))[img, ch].numpy()
        out[0][first + ch, kk] = at
        out[1][first + ch, kk] = extreme
        first += c


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_the_stored_exemplars_are_the_top_9_of_a_direct_computation(name):
    weights = WEIGHTS / f"{name}.safetensors"
    model, card = load_model(weights)
    stored = load_exemplars(card, WEIGHTS)
    evalset = load_evalset(evalset_for(card))
    assert (stored.evalset, stored.n_images, stored.k) == (evalset.name, 500, 9)
    assert stored.weights_sha256 == card.weights_sha256 == file_sha256(weights)
    x = Explorer(model, card, "cpu").batch_input(evalset.images)
    means, peaks = _direct(model, x, stored)
    tol = 1e-5
    for v in VIEWS:
        direct = means[v]  # (500, channels)
        assert direct.shape == (500, int(stored.widths[:, VIEWS.index(v)].sum()))
        np.testing.assert_allclose(stored.arrays[f"{v}_mean"], direct.mean(axis=0), atol=tol)
        for which, sign in [("top", 1)] + ([("bottom", -1)] if v == "f" else []):
            index = stored.arrays[f"{v}_{which}_index"].astype(np.int64)
            value = stored.arrays[f"{v}_{which}_value"]
            # the stored values are the direct means of the stored images...
            np.testing.assert_allclose(value, np.take_along_axis(direct.T, index, axis=1), atol=tol)
            # ...and they are the 9 largest (smallest) of all 500: no image left out beats them
            best = -np.sort(-sign * direct.T, axis=1)[:, :9] * sign
            np.testing.assert_allclose(value, best, atol=tol)
            # where the order is not a near-tie, the very same images in the very same order
            order = np.argsort(-sign * direct.T, axis=1, kind="stable")[:, :9]
            gaps = np.abs(np.diff(-np.sort(-sign * direct.T, axis=1)[:, :10], axis=1)).min(axis=1)
            clear = gaps > 1e-4
            assert clear.mean() > 0.5, f"{v} {which}: only {clear.mean():.0%} of channels without near-ties"
            assert np.array_equal(index[clear], order[clear])
            # the stored peak is where the map is largest (smallest) on that image
            at, extreme = peaks[(v, which)]
            assert not np.isnan(at).any()
            np.testing.assert_allclose(at, extreme, atol=tol)


def test_both_shipped_models_have_small_stored_exemplars_named_in_their_cards():
    for name in SHIPPED:
        card = ModelCard.read(WEIGHTS / f"{name}.json")
        entry = card.studies["exemplars"]
        path = WEIGHTS / entry["file"]
        assert path == exemplars_file(card, WEIGHTS) == WEIGHTS / f"{name}.exemplars.npz"
        assert entry["views"] == ["x", "f", "y"] and entry["k"] == 9 and entry["n"] == 500
        assert entry["evalset"] == evalset_for(card)
        assert path.stat().st_size == entry["bytes"] < 400_000
        stored = load_exemplars(card, WEIGHTS)
        # the tutorial's Net: 3 blocks each at 64, 128 and 256 channels, all views the block's width
        assert stored.widths[:, 0].tolist() == [64] * 3 + [128] * 3 + [256] * 3
        assert stored.channel("res9", "f", 255).bottom and not stored.channel("res9", "y", 0).bottom


# --- the scan on a tiny model ----------------------------------------------------------------------------------


def _tiny_explorer(tiny_model, preset=CIFAR10, sha="0" * 64):
    card = ModelCard.from_preset(preset, "tiny", config=TINY.to_dict(), weights_sha256=sha)
    return Explorer(tiny_model, card, "cpu")


def _random_set(n=40, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, 32, 32), generator=g, dtype=torch.uint8)
    return EvalSet(images, torch.arange(n) % 10, list(CIFAR10.classes), "random40")


def test_the_scan_keeps_the_k_extreme_images_of_every_channel(tiny_model):
    explorer = _tiny_explorer(tiny_model)
    data = _random_set()
    done = []
    result = scan_exemplars(explorer, data, k=3, batch_size=16, progress=done.append)
    assert done == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert result.blocks == ["res1", "res2", "res3"] and result.widths.tolist() == [[8, 8, 8], [8, 8, 8], [16, 16, 16]]
    # the same numbers with every tensor of every block taken from one plain batch, by hand
    x = explorer.batch_input(data.images)
    blocks = [m for m in tiny_model.modules() if isinstance(m, ResidualBlock)]
    with torch.inference_mode():
        h = tiny_model.stem(x)
        maps = {"x": [], "f": [], "y": []}
        for stage in tiny_model.stages:
            h = stage.transition(h)
            for b in stage.blocks:
                f = b.branch(h)
                maps["x"].append(h), maps["f"].append(f)
                h = b(h)
                maps["y"].append(h)
    assert len(blocks) == 3
    for v in VIEWS:
        ch = 0
        for block, t in zip(result.blocks, maps[v]):
            for c in range(t.shape[1]):
                m = t[:, c].mean(dim=(1, 2))
                top = torch.sort(m, descending=True, stable=True).indices[:3]
                got = result.channel(block, v, c)
                assert [e.index for e in got.top] == top.tolist()
                np.testing.assert_allclose([e.value for e in got.top], m[top].numpy(), rtol=1e-5, atol=1e-6)
                w = t.shape[-1]
                assert [e.peak for e in got.top] == [divmod(int(t[i, c].argmax()), w) for i in top]
                if v == "f":
                    low = torch.sort(m, stable=True).indices[:3]
                    assert [e.index for e in got.bottom] == low.tolist()
                    assert [e.peak for e in got.bottom] == [divmod(int(t[i, c].argmin()), w) for i in low]
                else:
                    assert got.bottom == ()
                assert got.mean == pytest.approx(float(m.double().mean()), abs=1e-6)
                ch += 1


def test_the_scan_is_the_same_in_any_batch_size_and_through_a_single_process_dist(tiny_model):
    explorer = _tiny_explorer(tiny_model)
    data = _random_set()
    a = scan_exemplars(explorer, data, k=4, batch_size=40)
    b = scan_exemplars(explorer, data, k=4, batch_size=7, dist=Dist())
    for key in a.arrays:
        if key.endswith("_index") or key.endswith("_pos"):
            assert np.array_equal(a.arrays[key], b.arrays[key]), key
        else:
            np.testing.assert_allclose(a.arrays[key], b.arrays[key], rtol=1e-5, atol=1e-6)


def test_crops_follow_the_receptive_field_geometry(tiny_model):
    explorer = _tiny_explorer(tiny_model)
    result = scan_exemplars(explorer, _random_set(), k=3)
    geo = result.geometry  # (blocks, views, 5): h, w, crop side, offset y, x
    assert geo[:, :, :2].tolist() == [[[32, 32]] * 3, [[32, 32]] * 3, [[16, 16]] * 3]
    # a quarter of the input at least, the whole input at most, wider for the later block
    assert (geo[:, :, 2] >= 8).all() and (geo[:, :, 2] <= 32).all()
    assert geo[2, 2, 2] >= geo[0, 0, 2]
    # hand-made geometry: an 8x8 map over 32 pixels (stride 4), crops of 12, no offset
    one = Exemplars(blocks=["b"], widths=np.array([[1, 1, 1]]), geometry=np.array([[[8, 8, 12, 0, 0]] * 3]),
                    arrays=_one_channel_arrays([[0, 0], [4, 2], [7, 7]]), evalset="hand", n_images=3, k=3,
                    input_size=(32, 32))
    boxes = [e.box for e in one.channel("b", "y", 0).top]
    # centres (0,0) -> clamped to the corner; (16, 8) -> 16 - 5.5 = 10.5 -> 10, 8 - 5.5 -> 2; (28, 28) -> clamped to 20
    assert boxes == [(0, 0, 12), (10, 2, 12), (20, 20, 12)]
    images = torch.arange(3 * 32 * 32, dtype=torch.int64).reshape(3, 1, 32, 32).remainder(251).to(torch.uint8)
    crops = one.channel("b", "y", 0).crops(images)
    assert [c.shape for c in crops] == [(12, 12)] * 3
    assert np.array_equal(crops[1], images[1, 0, 10:22, 2:14].numpy())


def _one_channel_arrays(peaks):
    k = len(peaks)
    out = {}
    for v in VIEWS:
        for which in ("top", "bottom") if v == "f" else ("top",):
            out[f"{v}_{which}_index"] = np.arange(k, dtype=np.int16)[None]
            out[f"{v}_{which}_value"] = np.linspace(1, 0, k, dtype=np.float32)[None]
            out[f"{v}_{which}_pos"] = np.asarray(peaks, dtype=np.int16)[None]
        out[f"{v}_mean"] = np.zeros(1, dtype=np.float32)
    return out


def test_bad_requests_are_refused_with_the_reason(tiny_model):
    explorer = _tiny_explorer(tiny_model)
    result = scan_exemplars(explorer, _random_set(), k=3)
    with pytest.raises(InputError, match=r"f of block res3 has 16 channels \(0 to 15\); got 16"):
        result.channel("res3", "f", 16)
    with pytest.raises(InputError, match="unknown block 'res9'"):
        result.channel("res9", "f", 0)
    with pytest.raises(InputError, match="unknown part 's'"):
        result.channel("res1", "s", 0)
    with pytest.raises(InputError, match="needs at least 50 images; the set has 40"):
        scan_exemplars(explorer, _random_set(), k=50)


# --- the stored file ----------------------------------------------------------------------------------------------


@pytest.fixture
def stored(tiny_model, tmp_path):
    explorer = _tiny_explorer(tiny_model, sha="ab" * 32)
    result = scan_exemplars(explorer, _random_set(), k=3)
    path = tmp_path / "tiny.exemplars.npz"
    result.save(path)
    return result, path


def test_a_saved_file_loads_back_identical(stored):
    result, path = stored
    back = Exemplars.load(path, evalset="random40", weights_sha256="ab" * 32)
    assert (back.blocks, back.evalset, back.n_images, back.k, back.input_size) == (
        result.blocks, "random40", 40, 3, (32, 32))
    assert sorted(back.arrays) == sorted(result.arrays)
    for key in result.arrays:
        assert np.array_equal(back.arrays[key], result.arrays[key]), key
    assert back.channel("res2", "f", 3) == result.channel("res2", "f", 3)


def test_the_loader_refuses_a_missing_corrupt_or_stale_file(stored, tmp_path):
    _, path = stored
    with pytest.raises(WeightsError, match="exemplars file .*nothing.npz not found"):
        Exemplars.load(tmp_path / "nothing.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated.npz is not a readable .npz file"):
        Exemplars.load(truncated)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(WeightsError, match="garbage.npz is not a readable .npz file"):
        Exemplars.load(garbage)
    with pytest.raises(WeightsError, match=r"computed for other weights \(sha256 abababababab…, these are cdcdcdcdcdcd…\): it is stale"):
        Exemplars.load(path, weights_sha256="cd" * 32)
    with pytest.raises(WeightsError, match="computed over 'random40', not 'cifar10_test500': it is stale"):
        Exemplars.load(path, evalset="cifar10_test500")
    # a file with one array missing, and one with an index outside the set
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    partial = tmp_path / "partial.npz"
    np.savez(partial, **{k: v for k, v in arrays.items() if k != "f_bottom_pos"})
    with pytest.raises(WeightsError, match="partial.npz is malformed .*f_bottom_pos"):
        Exemplars.load(partial)
    arrays["y_top_index"] = arrays["y_top_index"].copy()
    arrays["y_top_index"][0, 0] = 40
    outside = tmp_path / "outside.npz"
    np.savez(outside, **arrays)
    with pytest.raises(WeightsError, match="outside.npz is malformed .*y_top_index holds indices outside the 40 images"):
        Exemplars.load(outside)


def test_a_corrupted_byte_inside_the_archive_is_refused(stored, tmp_path):
    _, path = stored
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("y_top_value.npy")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the array's compressed bytes
    data[start + info.compress_size // 2] ^= 0xFF  # its CRC (or the deflate stream) no longer holds
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="flipped.npz is (not a readable .npz file|malformed)"):
        Exemplars.load(bad)


def test_load_exemplars_checks_the_file_against_the_card(tmp_path):
    card = ModelCard.read(WEIGHTS / "cifar10_resnet.json")
    for name in ("cifar10_resnet.json", "cifar10_resnet.exemplars.npz"):
        shutil.copy(WEIGHTS / name, tmp_path / name)
    assert load_exemplars(card, tmp_path).weights_sha256 == card.weights_sha256
    card.weights_sha256 = "0" * 64  # as if the weights had been retrained and the file not remade
    with pytest.raises(WeightsError, match="computed for other weights .*it is stale"):
        load_exemplars(card, tmp_path)
    card.studies = {}
    with pytest.raises(WeightsError, match=r"the card of cifar10_resnet names no stored exemplars \(studies\['exemplars'\]\)"):
        load_exemplars(card, tmp_path)


# --- on demand ------------------------------------------------------------------------------------------------------


def test_another_model_is_scanned_on_demand_once_with_progress(tiny_model):
    explorer = _tiny_explorer(tiny_model)
    done = []
    first = exemplars_for(explorer, progress=done.append)
    assert first.evalset == "cifar10_test500" and first.n_images == 500
    assert done[-1] == 1.0 and len(done) == 10  # 500 images in batches of 50
    again = exemplars_for(explorer, progress=done.append)
    assert again is first and len(done) == 10  # cached: no second scan
    torch.manual_seed(1)
    other = exemplars_for(_tiny_explorer(randomise_bn(build_model(TINY))))
    assert other is not first and not np.array_equal(other.arrays["y_top_index"], first.arrays["y_top_index"])


def test_a_model_without_an_evaluation_set_is_refused(tiny_model):
    card = ModelCard.from_preset(CIFAR10, "tiny", config=TINY.to_dict())
    card.classes = [f"class {i}" for i in range(10)]
    with pytest.raises(DataError, match="no shipped evaluation set fits tiny"):
        exemplars_for(Explorer(tiny_model, card, "cpu"))


def test_a_shipped_model_reads_its_stored_file():
    explorer = Explorer.from_weights(WEIGHTS / "mnist_resnet.safetensors", "cpu")
    result = exemplars_for(explorer, progress=lambda _: pytest.fail("a stored model must not be scanned"))
    assert result.evalset == "mnist_test500"
    crops = result.channel("res1", "y", 0).crops(load_evalset("mnist_test500").images)
    side = result.crop_side("res1", "y")
    assert [c.shape for c in crops] == [(side, side)] * 9  # grey crops for a grey evaluation set


# --- the picture ---------------------------------------------------------------------------------------------------


def test_the_exemplar_grid_shows_each_crop_enlarged_and_a_negative_row_for_f(tiny_model):
    explorer = _tiny_explorer(tiny_model, preset=MNIST)
    data = _random_set(channels=1)
    data = EvalSet(data.images, data.labels, list(MNIST.classes), "random40")
    result = scan_exemplars(explorer, data, k=3)
    f_grid = exemplar_grid(result.channel("res1", "f", 2), data, cell=48)
    y_grid = exemplar_grid(result.channel("res1", "y", 2), data, cell=48)
    assert f_grid.mode == "RGB" and f_grid.size[1] > y_grid.size[1]  # two rows against one
    ex = result.channel("res1", "f", 2)
    side = result.crop_side("res1", "f")
    rep = 48 // side
    pixels = np.asarray(f_grid)
    for crop in ex.crops(data.images) + ex.crops(data.images, negative=True):
        big = np.repeat(np.repeat(crop, rep, axis=0), rep, axis=1)  # nearest neighbour, whole factor
        assert _contains(pixels[:, :, 0], big), "a crop is missing from the grid"
    with pytest.raises(ValueError, match="these exemplars index 'random40', not 'cifar10_test500'"):
        exemplar_grid(ex, load_evalset("cifar10_test500"))


def _contains(image: np.ndarray, patch: np.ndarray) -> bool:
    h, w = patch.shape
    windows = np.lib.stride_tricks.sliding_window_view(image, (h, w))
    return bool((windows == patch).all(axis=(2, 3)).any())
