"""The CUDA path: graphed analyses give the eager numbers, each request its own. Skipped without a GPU.

CI has no GPU; these run wherever one is (``python -m pytest tests/test_cuda.py``), and were run on an
H100 when the GPU figures in docs/performance.md were measured.
"""

import threading

import pytest
import torch
from conftest import randomise_bn

from resnet_demo.core.capture import find_blocks
from resnet_demo.core.explorer import Explorer
from resnet_demo.core.model import build_model
from resnet_demo.core.weights.cards import tutorial_card

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def explorers():
    torch.manual_seed(0)
    model = randomise_bn(build_model())
    card = tutorial_card(trained=False)
    cpu = Explorer(model, card, "cpu")
    gpu_model = randomise_bn(build_model())
    gpu_model.load_state_dict(model.state_dict())
    graphed = Explorer(gpu_model, card, "cuda")
    eager = Explorer(gpu_model, card, "cuda", cuda_graphs=False)
    return cpu, graphed, eager


def images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 32, 32, generator=g) for _ in range(n)]


def assert_same(a, b, tol=1e-5):
    """Same logits, tensors and metrics within ``tol`` (relative to each tensor's scale)."""
    assert torch.allclose(a.logits, b.logits, atol=tol * float(a.logits.abs().max()), rtol=tol)
    for ra, rb in zip(a.blocks, b.blocks, strict=True):
        assert ra.name == rb.name
        for k in ("x", "f", "s", "y"):
            ta, tb = getattr(ra, k), getattr(rb, k)
            assert ta.device.type == tb.device.type == "cpu"
            assert torch.allclose(ta, tb, atol=tol * float(ta.abs().max()), rtol=tol), (ra.name, k, (ta - tb).abs().max())
    for ma, mb in zip(a.metrics, b.metrics, strict=True):
        assert ma.ratio == pytest.approx(mb.ratio, rel=10 * tol) and ma.cosine == pytest.approx(mb.cosine, abs=10 * tol)


# cuDNN may use TF32 for fp32 convolutions: GPU and CPU agree to ~1e-3 of each tensor's scale, not 1e-6.
CPU_TOL = 1e-2


def test_graphed_analysis_equals_eager_and_cpu(explorers):
    cpu, graphed, eager = explorers
    for x in images(3):
        g, e, c = graphed.analyze(x), eager.analyze(x), cpu.analyze(x)
        assert_same(g, e)
        assert [p.index for p in g.predictions] == [p.index for p in e.predictions]
        assert_same(g, c, CPU_TOL)
    assert graphed._graphs[(1, 3, 32, 32)] is not None  # the graph was used, not an eager fallback


def test_consecutive_requests_get_their_own_results_not_a_stale_buffer(explorers):
    _, graphed, eager = explorers
    xs = images(4, seed=1)
    results = [graphed.analyze(x) for x in xs]
    for x, r in zip(xs, results):
        assert_same(r, eager.analyze(x))
    assert not torch.equal(results[0].blocks[0].y, results[1].blocks[0].y)


def test_concurrent_threads_never_mix(explorers):
    _, graphed, eager = explorers
    xs = images(24, seed=2)
    expected = [eager.analyze(x).logits for x in xs]
    got: dict[int, torch.Tensor] = {}

    def work(i0):
        for i in range(i0, len(xs), 4):
            got[i] = graphed.analyze(xs[i]).logits

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in enumerate(expected):
        assert torch.allclose(got[i], e, atol=1e-5 * float(e.abs().max()), rtol=1e-5), i


def test_lesions_and_batches_run_eagerly_and_hooks_are_gone(explorers):
    cpu, graphed, _ = explorers
    x = images(1, seed=3)[0]
    assert_same(graphed.analyze(x, lesion=["res4"]), cpu.analyze(x, lesion=["res4"]), CPU_TOL)
    batch = torch.cat(images(2, seed=4))
    assert graphed.analyze(batch).logits.shape == (10,)  # analyse reports the first image
    for spec in find_blocks(graphed.model):
        for m in (spec.module, spec.branch_end, spec.shortcut):
            if m is not None:
                assert not m._forward_hooks
