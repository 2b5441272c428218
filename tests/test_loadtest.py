"""The load test: 16 concurrent sessions, 400 distinct images, every answer its own image's.

The sessions are the lean HTTP client (``HttpSession``, the default); a test checks that its answers are
gradio_client's, value for value.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from appserver import weights_dir
from PIL import Image

from resnet_demo.tools.loadtest import (
    Expected,
    HttpEndpoint,
    HttpSession,
    RemoteError,
    check_answer,
    expected_results,
    make_images,
    percentile,
    run_loadtest,
)

SETTINGS = ("auto", 5, "f", "", [])  # a fresh page's: auto model, top-5, F(x) view, last block enlarged


def test_images_are_distinct_and_deterministic(tmp_path):
    a = make_images(40, tmp_path / "a", seed=0)
    b = make_images(40, tmp_path / "b", seed=0)
    arrays = [np.asarray(Image.open(p)) for p in a]
    assert {arr.shape for arr in arrays} == {(32, 32, 3), (40, 48, 3)}
    assert len({arr.tobytes() for arr in arrays}) == 40
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b))


def page(label: str, probs: dict[str, float], summary: str) -> tuple:
    preds = {"label": label, "confidences": [{"label": k, "confidence": v} for k, v in probs.items()]}
    return (preds, None, None, None, {"__type__": "update"}, summary)


def test_check_answer_tells_its_own_image_from_another():
    text = "Block **res1** changes its input most (‖F‖/‖s‖ = 1.59); **res9** least (0.12)."
    mine = Expected("cat", {"cat": 0.5, "dog": 0.3}, text)
    other = Expected("cat", {"cat": 0.5, "dog": 0.30002}, text)
    assert check_answer(page("cat", mine.probs, mine.summary), mine) is None
    assert "p(dog)" in check_answer(page("cat", other.probs, other.summary), mine)
    assert "top-1" in check_answer(page("dog", mine.probs, mine.summary), mine)
    assert "summary" in check_answer(page("cat", mine.probs, text.replace("1.59", "1.58")), mine)


def test_percentile_is_nearest_rank():
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 0.5) == 50 and percentile(values, 0.95) == 95 and percentile(values, 1.0) == 100


@pytest.mark.slow
def test_sixteen_sessions_four_hundred_images_no_failure_no_cross_talk_no_leak(tmp_path):
    t0 = time.perf_counter()
    report = run_loadtest(spawn=True, weights_dir=weights_dir(tmp_path), clients=16, requests=400, warmup=20,
                          workdir=tmp_path / "run", log=lambda m: print(m, flush=True))
    print(report.table())
    assert report.client == "http" and report.to_dict()["client"] == "http"  # the lean client is the default
    print(f"load test wall time, all included: {time.perf_counter() - t0:.1f} s")
    assert report.distinct_expected == 400  # otherwise a mixed-up answer could pass unnoticed
    assert report.failures == 0 and report.warmup_failures == 0, report.errors
    assert report.mismatches == 0, report.errors
    assert report.ok == 400
    assert report.rss_delta_mb is not None and report.rss_delta_mb <= 100, report.table()
    assert report.passed


@pytest.mark.slow
def test_http_client_answers_as_gradio_client_does(tmp_path, app_servers):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    wdir = app_servers.weights
    paths = make_images(4, tmp_path / "images", seed=3)
    expected = expected_results(paths, wdir)
    assert len({e.signature() for e in expected}) == 4
    not_an_image = tmp_path / "not-an-image.png"
    not_an_image.write_bytes(b"plain text, not a PNG")
    url = app_servers.get(weights=wdir).url
    endpoint = HttpEndpoint.from_config(url)
    assert endpoint.state_inputs.count(False) == len(SETTINGS) + 1  # the image and the settings; State is hidden
    sessions = [HttpSession(endpoint), HttpSession(endpoint, download=True)]
    assert sessions[0].session_hash != sessions[1].session_hash
    client = Client(url, verbose=False, download_files=False)
    try:
        for i, (path, want) in enumerate(zip(paths, expected)):
            mine = sessions[i % 2].predict(path, *SETTINGS)
            theirs = client.predict(handle_file(str(path)), *SETTINGS, api_name="/analyze_photo")
            assert isinstance(mine, tuple) and len(mine) == len(theirs)
            assert mine[0] == theirs[0] and mine[0]["confidences"]  # label and top-k probabilities, exactly
            assert mine[5] == theirs[5] and "changes its input most" in mine[5]  # the summary
            # Every output, the images included (inline, so equal bytes); the block choosers get their
            # choices with a session's first answer and only their values afterwards: compare what they hold.
            assert mine[:7] == theirs[:7] and len(mine) == 9
            held = [[o.get("value") if isinstance(o, dict) else o for o in (m[7], m[8])] for m in (mine, theirs)]
            assert held == [["res9", []], ["res9", []]]
            assert check_answer(mine, want) is None
        # The page's three images come inside the answer (data URLs): a browser has no file to fetch.
        assert all(mine[i]["url"].startswith("data:image/png;base64,") for i in (1, 2, 6))
        assert sessions[0].downloaded_bytes == sessions[1].downloaded_bytes == 0
        # an error answer is an exception carrying the page's message, as gradio_client's is
        with pytest.raises(AppError) as theirs_error:
            client.predict(handle_file(str(not_an_image)), *SETTINGS, api_name="/analyze_photo")
        with pytest.raises(RemoteError) as my_error:
            sessions[0].predict(not_an_image, *SETTINGS)
        assert str(my_error.value) == str(theirs_error.value) and str(my_error.value)
        assert check_answer(sessions[0].predict(paths[0], *SETTINGS), expected[0]) is None  # the session goes on
    finally:
        client.close()
        for session in sessions:
            session.close()
