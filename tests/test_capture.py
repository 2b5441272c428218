import platform
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_PROJ, randomise_bn

from resnet_demo.core.capture import capture, capture_forward, find_blocks
from resnet_demo.core.metrics import block_metrics, topk
from resnet_demo.core.model import build_model
from resnet_demo.core.runtime import pack_records, tune_malloc, unpack_records


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_captures_every_block_with_y_equal_relu_f_plus_s(seed_model):
    x = torch.randn(2, 3, 32, 32)
    logits, records = capture_forward(seed_model, x)
    assert [r.name for r in records] == [f"res{i}" for i in range(1, 10)]
    for r in records:
        assert r.x.shape == r.f.shape == r.s.shape == r.y.shape
        torch.testing.assert_close(r.y, torch.relu(r.f + r.s), rtol=0, atol=1e-6)
        assert torch.equal(r.s, r.x)  # identity shortcuts in the tutorial's Net
        assert r.f.abs().sum() > 0 and not r.f.requires_grad


def test_projection_shortcut_is_captured_as_its_own_output(tiny_model):
    model = randomise_bn(build_model(TINY_PROJ))
    _, records = capture_forward(model, torch.randn(1, 3, 16, 16))
    proj = records[-1]
    assert proj.s.shape != proj.x.shape
    block = dict(model.named_modules())[find_blocks(model)[-1].path]
    with torch.no_grad():
        torch.testing.assert_close(proj.s, block.shortcut(proj.x))
        torch.testing.assert_close(proj.f, block.branch(proj.x))
    torch.testing.assert_close(proj.y, torch.relu(proj.f + proj.s))


def test_logits_identical_with_and_without_capture(seed_model):
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        bare = seed_model(x)
    captured, _ = capture_forward(seed_model, x)
    assert torch.equal(bare, captured)


def test_captured_tensors_are_copies_not_views(seed_model):
    x = torch.randn(1, 3, 32, 32)
    _, first = capture_forward(seed_model, x)
    saved = first[0].f.clone()
    capture_forward(seed_model, torch.randn(1, 3, 32, 32))
    assert torch.equal(first[0].f, saved)
    assert first[0].f.data_ptr() != first[0].y.data_ptr()


def test_no_hooks_remain_after_capture_even_after_an_exception(seed_model):
    before = hook_count(seed_model)
    capture_forward(seed_model, torch.randn(1, 3, 32, 32))
    assert hook_count(seed_model) == before == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture(seed_model):
            assert hook_count(seed_model) > 0
            raise RuntimeError("boom")
    assert hook_count(seed_model) == 0
    with pytest.raises(RuntimeError):  # a forward pass that fails half-way (wrong channel count)
        capture_forward(seed_model, torch.randn(1, 5, 32, 32))
    assert hook_count(seed_model) == 0


def test_unknown_block_names_are_refused(seed_model):
    with pytest.raises(KeyError, match="unknown block"):
        with capture(seed_model, lesion=["res42"]):
            pass
    assert hook_count(seed_model) == 0


def test_threads_capturing_different_inputs_get_their_own_results(seed_model):
    inputs = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    expected = [capture_forward(seed_model, x)[1] for x in inputs]
    results: dict[int, list] = {}
    barrier = threading.Barrier(len(inputs))

    def work(i):
        barrier.wait()
        for _ in range(3):
            results[i] = capture_forward(seed_model, inputs[i])[1]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, records in results.items():
        for got, want in zip(records, expected[i]):
            assert torch.equal(got.y, want.y) and torch.equal(got.f, want.f)
    assert hook_count(seed_model) == 0


def test_a_plain_forward_in_another_thread_is_not_recorded(seed_model):
    inside = threading.Event()
    release = threading.Event()
    x_main = torch.randn(1, 3, 32, 32)

    def other():
        inside.wait()
        with torch.inference_mode():
            seed_model(torch.randn(1, 3, 32, 32) * 10)
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with torch.inference_mode(), capture(seed_model) as cap:
        inside.set()
        release.wait()  # the other thread ran its forward while our hooks were registered
        assert all(r.y is None for r in cap.records.values())
        seed_model(x_main)
    t.join()
    want = capture_forward(seed_model, x_main)[1]
    assert all(torch.equal(a.y, b.y) for a, b in zip(cap.blocks, want))


@pytest.mark.parametrize("chunk", [None, 1000])  # 1000: every block's sums taken over several float64 chunks
def test_metrics_equal_a_hand_computation(seed_model, monkeypatch, chunk):
    if chunk is not None:
        import resnet_demo.core.metrics as metrics_module

        monkeypatch.setattr(metrics_module, "_CHUNK", chunk)
    x = torch.randn(2, 3, 32, 32)
    _, records = capture_forward(seed_model, x)
    metrics = block_metrics(records)
    assert len(metrics) == 2 and len(metrics[0]) == 9
    for img in range(2):
        for r, m in zip(records, metrics[img]):
            f = r.f[img].double().numpy().ravel()
            s = r.s[img].double().numpy().ravel()
            y = r.y[img].double().numpy().ravel()
            assert m.ratio == pytest.approx(np.linalg.norm(f) / np.linalg.norm(s), rel=1e-12)
            assert m.cosine == pytest.approx(f @ s / np.linalg.norm(f) / np.linalg.norm(s), rel=1e-9, abs=1e-12)
            assert m.norm_x == pytest.approx(np.linalg.norm(r.x[img].double().numpy()), rel=1e-12)
            assert m.norm_f == pytest.approx(np.linalg.norm(f), rel=1e-12)
            assert m.norm_y == pytest.approx(np.linalg.norm(y), rel=1e-12)
            assert m.active == pytest.approx((y > 0).mean(), abs=1e-12)
            want = np.abs(r.f[img].double().numpy()).mean(axis=(1, 2))
            np.testing.assert_allclose(m.channel_f, want, rtol=1e-6)


def test_metrics_of_a_known_tiny_tensor():
    from resnet_demo.core.capture import BlockRecord

    f = torch.tensor([3.0, 0.0, -4.0, 0.0]).view(1, 1, 2, 2)
    s = torch.tensor([0.0, 5.0, 0.0, 0.0]).view(1, 1, 2, 2)
    rec = BlockRecord("b", 1, x=s, f=f, s=s, y=torch.relu(f + s))
    (m,) = block_metrics([rec])[0]
    assert (m.ratio, m.cosine, m.norm_f, m.norm_x) == (1.0, 0.0, 5.0, 5.0)
    assert m.norm_y == pytest.approx(34**0.5)
    assert m.active == 0.5
    assert m.channel_f.tolist() == [pytest.approx(7 / 4)]
    dead = BlockRecord("d", 1, x=torch.zeros(1, 1, 2, 2), f=f, s=torch.zeros(1, 1, 2, 2), y=torch.relu(f))
    (m,) = block_metrics([dead])[0]
    assert m.ratio == float("inf") and m.cosine == 0.0


def test_topk_probabilities_and_labels():
    logits = torch.tensor([1.0, 3.0, 2.0])
    preds = topk(logits, ["a", "b", "c"], k=2)
    p = F.softmax(logits, dim=0)
    assert [(q.label, q.index) for q in preds] == [("b", 1), ("c", 2)]
    assert preds[0].prob == pytest.approx(float(p[1]))
    assert len(topk(logits, ["a", "b", "c"], k=99)) == 3
    with pytest.raises(ValueError, match="3 logits but 2 class names"):
        topk(logits, ["a", "b"])


def test_lesion_nothing_gives_intact_logits_and_lesion_equals_hand_forward(seed_model):
    x = torch.randn(2, 3, 32, 32)
    intact, _ = capture_forward(seed_model, x)
    same, _ = capture_forward(seed_model, x, lesion=[])
    assert torch.equal(intact, same)

    lesioned, records = capture_forward(seed_model, x, lesion=["res5"])
    # Hand-built forward: the same network with res5's branch removed.
    with torch.no_grad():
        h = seed_model.stem(x)
        for stage in seed_model.stages:
            h = stage.transition(h)
            for name, block in stage.blocks.named_children():
                h = torch.relu(block.shortcut(h)) if name == "res5" else block(h)
        want = seed_model.forward_head(h)
    torch.testing.assert_close(lesioned, want, rtol=0, atol=1e-5)
    assert not torch.allclose(lesioned, intact)
    res5 = next(r for r in records if r.name == "res5")
    assert res5.f.abs().sum() == 0
    # The shared model is unchanged afterwards.
    with torch.inference_mode():
        assert torch.equal(seed_model(x), intact)
    assert hook_count(seed_model) == 0


def scaled_hand_forward(model, x, scales):
    """The project's ResNet written out, block ``name`` computing relu(alpha * F(x) + s(x))."""
    with torch.no_grad():
        h = model.stem(x)
        for stage in model.stages:
            h = stage.transition(h)
            for name, block in stage.blocks.named_children():
                h = torch.relu(block.branch(h) * scales[name] + block.shortcut(h)) if name in scales else block(h)
        return model.forward_head(h)


def test_a_scaled_branch_is_alpha_times_f_and_alpha_0_and_1_are_the_lesion_and_the_intact_model(seed_model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    intact, _ = capture_forward(seed_model, x)
    lesioned, _ = capture_forward(seed_model, x, lesion=["res5"])
    zero, zero_records = capture_forward(seed_model, x, scale={"res5": 0.0})
    one, one_records = capture_forward(seed_model, x, scale={"res5": 1.0, "res2": 1})
    assert torch.equal(zero, lesioned) and torch.equal(one, intact)
    assert not torch.equal(zero, intact)
    assert zero_records[4].f.abs().sum() == 0
    _, intact_records = capture_forward(seed_model, x)
    assert torch.equal(one_records[4].f, intact_records[4].f)
    scales = {"res2": 2.0, "res5": 0.5}
    graded, records = capture_forward(seed_model, x, scale=scales)
    assert torch.equal(graded, scaled_hand_forward(seed_model, x, scales))
    res5 = records[4]  # its record holds the branch as it was added
    with torch.no_grad():
        assert torch.equal(res5.f, seed_model.stages[1].blocks.res5.branch(res5.x) * 0.5)
    assert torch.equal(res5.y, torch.relu(res5.f + res5.s))
    with torch.inference_mode():
        assert torch.equal(seed_model(x), intact)
    assert hook_count(seed_model) == 0


def test_bad_scales_are_refused_with_a_reason(seed_model):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(KeyError, match=r"unknown block\(s\) \['res42'\] for scale"):
        capture_forward(seed_model, x, scale={"res42": 0.5})
    with pytest.raises(ValueError, match="the scale of block res5 must be a finite number, got nan"):
        capture_forward(seed_model, x, scale={"res5": float("nan")})
    with pytest.raises(ValueError, match="block res5 is both lesioned and scaled by 0.5"):
        capture_forward(seed_model, x, lesion=["res5"], scale={"res5": 0.5})
    both, _ = capture_forward(seed_model, x, lesion=["res5"], scale={"res5": 0})
    assert torch.equal(both, capture_forward(seed_model, x, lesion=["res5"])[0])
    assert hook_count(seed_model) == 0


def test_a_scale_in_one_thread_leaves_another_threads_forward_intact(tiny_model):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        intact = tiny_model(x)
    scaled_want, _ = capture_forward(tiny_model, x, scale={"res1": 2.0, "res3": 0.25})
    assert not torch.equal(scaled_want, intact)
    stop, got = threading.Event(), []

    def scaler():
        while not stop.is_set():
            got.append(capture_forward(tiny_model, x, scale={"res1": 2.0, "res3": 0.25})[0])

    t = threading.Thread(target=scaler)
    t.start()
    try:
        for _ in range(30):
            with torch.inference_mode():
                assert torch.equal(tiny_model(x), intact)
    finally:
        stop.set()
        t.join()
    assert got and all(torch.equal(g, scaled_want) for g in got)
    assert hook_count(tiny_model) == 0


def test_pack_and_unpack_move_a_capture_in_one_tensor_and_keep_its_sharing(tiny_model):
    # The GPU path packs logits and every record into one tensor for a single device-to-host copy.
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    logits, records = capture_forward(tiny_model, x)
    flat, layout = pack_records(logits, records)
    unique = {id(t) for r in records for t in (r.x, r.f, r.s, r.y)}
    assert flat.ndim == 1 and flat.numel() == logits.numel() + sum(
        t.numel() for t in {id(t): t for r in records for t in (r.x, r.f, r.s, r.y)}.values()
    )
    assert len(unique) < 4 * len(records)  # identity shortcuts and chained blocks share copies
    logits2, records2 = unpack_records(flat.clone(), layout)
    assert torch.equal(logits2, logits)
    for a, b in zip(records, records2, strict=True):
        assert (a.name, a.stage) == (b.name, b.stage)
        for k in ("x", "f", "s", "y"):
            assert torch.equal(getattr(a, k), getattr(b, k)), (a.name, k)
        assert (a.s is a.x) == (b.s is b.x)
    for prev, nxt in zip(records2, records2[1:]):
        same = next(r for r in records if r.name == nxt.name).x is next(r for r in records if r.name == prev.name).y
        assert (nxt.x is prev.y) == same
    assert block_metrics(records2)[1][0].ratio == block_metrics(records)[1][0].ratio


def test_a_module_that_writes_in_place_after_a_block_does_not_change_its_record(tiny_model):
    # The project's ResNet is recorded without copies (it never writes into its outputs); any model
    # with an in-place module gets copies, so a later in-place write cannot reach a record.
    class AddOneInPlace(torch.nn.Module):
        inplace = True

        def forward(self, t):
            return t.add_(1.0)

    torch.manual_seed(2)
    x = torch.randn(1, 3, 16, 16)
    _, plain = capture_forward(tiny_model, x)
    tiny_model.stages[1].transition = torch.nn.Sequential(AddOneInPlace(), tiny_model.stages[1].transition)
    _, records = capture_forward(tiny_model, x)
    last_of_stage1 = records[1]  # TINY: stage 1 has blocks res1, res2
    assert torch.equal(last_of_stage1.y, plain[1].y)
    assert torch.equal(last_of_stage1.y, F.relu(last_of_stage1.f + last_of_stage1.s))


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_tune_malloc_applies_on_glibc_and_changes_nothing_elsewhere(monkeypatch):
    import resnet_demo.core.runtime as explorer

    assert tune_malloc() is True
    calls = []

    def no_such_library(name):
        calls.append(name)
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(explorer.ctypes, "CDLL", no_such_library)
    assert tune_malloc() is False and calls == ["libc.so.6"]  # musl & co.: no libc.so.6, nothing changed
    monkeypatch.setattr(explorer.sys, "platform", "darwin")
    assert tune_malloc() is False and calls == ["libc.so.6"]  # not even looked up off Linux


# --- keeping only some parts ---------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [("y",), ("x",), ("f",), ("s",), ("f", "s"), ("x", "f", "y"), ()])
@pytest.mark.parametrize("kind", ["project", "torchvision"])
def test_a_capture_keeps_only_the_parts_asked_for(keep, kind):
    if kind == "project":
        model, x = randomise_bn(build_model(TINY_PROJ)), torch.randn(2, 3, 16, 16)  # identity and projection shortcuts
    else:
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(0)
        model, x = randomise_bn(torchvision.models.resnet18(num_classes=5).eval()), torch.randn(2, 3, 64, 64)
    full_logits, full = capture_forward(model, x)
    logits, records = capture_forward(model, x, keep=keep)
    assert torch.equal(logits, full_logits)
    assert [r.name for r in records] == [r.name for r in full]  # every block reached, whatever is kept
    for rec, ref in zip(records, full):
        for part in ("x", "f", "s", "y"):
            got = getattr(rec, part)
            if part in keep:
                assert torch.equal(got, getattr(ref, part)), (rec.name, part)
            else:
                assert got is None, (rec.name, part)
    assert hook_count(model) == 0


def test_hooks_are_registered_only_for_the_parts_kept(tiny_model):
    blocks = len(find_blocks(tiny_model))
    with capture(tiny_model, keep=("y",)):
        assert hook_count(tiny_model) == blocks  # one per block: its output (and that it was reached)
    with capture(tiny_model):
        assert hook_count(tiny_model) == 2 * blocks  # the branch and the block (x is shared with the last y)
    assert hook_count(tiny_model) == 0
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['z'\]"):
        with capture(tiny_model, keep=("y", "z")):
            pass


def test_a_reduced_capture_holds_only_the_reduction():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = randomise_bn(torchvision.models.resnet18(num_classes=5).eval()), torch.randn(3, 3, 64, 64)
    _, full = capture_forward(model, x)

    def channel_means(t):
        return t.mean(dim=(2, 3))

    _, records = capture_forward(model, x, keep=("x", "f", "y"), reduce=channel_means)
    for rec, ref in zip(records, full):
        # F(x) as the branch produced it, before torchvision adds the shortcut into it in place
        for part in ("x", "f", "y"):
            torch.testing.assert_close(getattr(rec, part), channel_means(getattr(ref, part)), rtol=0, atol=0)
        assert rec.s is None
    # a reduction that returns a view of the activation is copied, so a later in-place write cannot reach it
    _, views = capture_forward(model, x, keep=("f",), reduce=lambda t: t[:, :1])
    for rec, ref in zip(views, full):
        assert torch.equal(rec.f, ref.f[:, :1])


def test_block_shapes_are_the_captured_shapes(tiny_model):
    from resnet_demo.core.capture import block_shapes

    x = torch.randn(1, 3, 16, 16)
    _, records = capture_forward(tiny_model, x)
    assert block_shapes(tiny_model, x) == {r.name: (tuple(r.x.shape[1:]), tuple(r.y.shape[1:])) for r in records}
    assert hook_count(tiny_model) == 0
