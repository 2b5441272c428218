"""The load test: 16 concurrent gradio_client sessions, 400 distinct images, every answer its own image's."""

from __future__ import annotations

import time

import numpy as np
import pytest
from appserver import weights_dir
from PIL import Image

from resnet_demo.tools.loadtest import Expected, check_answer, make_images, percentile, run_loadtest


def test_images_are_distinct_and_deterministic(tmp_path):
    a = make_images(40, tmp_path / "a", seed=0)
    b = make_images(40, tmp_path / "b", seed=0)
    arrays = [np.asarray(Image.open(p)) for p in a]
    assert {arr.shape for arr in arrays} == {(32, 32, 3), (40, 48, 3)}
    assert len({arr.tobytes() for arr in arrays}) == 40
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b))


def page(label: str, probs: dict[str, float], row: list) -> tuple:
    preds = {"label": label, "confidences": [{"label": k, "confidence": v} for k, v in probs.items()]}
    return (preds, None, None, None, {"headers": [], "data": [row]})


def test_check_answer_tells_its_own_image_from_another():
    mine = Expected("cat", {"cat": 0.5, "dog": 0.3}, ["res1", 1, 0.1234, 0.5, 1.0, 2.0, 3.0, 0.4])
    other = Expected("cat", {"cat": 0.5, "dog": 0.30002}, ["res1", 1, 0.1234, 0.5, 1.0, 2.0, 3.0, 0.4])
    assert check_answer(page("cat", mine.probs, mine.first_row), mine) is None
    assert "p(dog)" in check_answer(page("cat", other.probs, other.first_row), mine)
    assert "top-1" in check_answer(page("dog", mine.probs, mine.first_row), mine)
    row = list(mine.first_row)
    row[2] = 0.1240
    assert "metrics row" in check_answer(page("cat", mine.probs, row), mine)


def test_percentile_is_nearest_rank():
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 0.5) == 50 and percentile(values, 0.95) == 95 and percentile(values, 1.0) == 100


@pytest.mark.slow
def test_sixteen_sessions_four_hundred_images_no_failure_no_cross_talk_no_leak(tmp_path):
    t0 = time.perf_counter()
    report = run_loadtest(spawn=True, weights_dir=weights_dir(tmp_path), clients=16, requests=400, warmup=20,
                          workdir=tmp_path / "run", log=lambda m: print(m, flush=True))
    print(report.table())
    print(f"load test wall time, all included: {time.perf_counter() - t0:.1f} s")
    assert report.distinct_expected == 400  # otherwise a mixed-up answer could pass unnoticed
    assert report.failures == 0 and report.warmup_failures == 0, report.errors
    assert report.mismatches == 0, report.errors
    assert report.ok == 400
    assert report.rss_delta_mb is not None and report.rss_delta_mb <= 100, report.table()
    assert report.passed
