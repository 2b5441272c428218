"""Hostile and malformed inputs: every one gets its documented clear error (or a correct result), nothing runs.

The corpus is generated here, in ``tmp_path``; no binary file is committed. The library is checked
first (exact error class and message), then a subset goes through the real server with gradio_client,
as a remote user would send it, and the server must keep answering afterwards.

Documented limits: ``resnet_demo.preprocess.MAX_PIXELS`` (50 MP unless ``RESNET_DEMO_MAX_PIXELS``) is
the largest image decoded; ``app.MAX_UPLOAD`` ("10mb") is the largest upload the server accepts.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from appserver import weights_dir
from conftest import ROOT, TINY, free_port, randomise_bn
from hostile import hostile
from PIL import Image

from resnet_demo.core.explorer import Explorer
from resnet_demo.core.model import ResNetConfig, build_model
from resnet_demo.core.preprocess import MAX_PIXELS, InputError, load_image, prepare
from resnet_demo.core.weights.cards import MNIST, ModelCard, WeightsError, tutorial_card
from resnet_demo.core.weights.files import save_weights
from resnet_demo.core.weights.load import load_model

LIMIT = f"the limit is {MAX_PIXELS / 1e6:.0f} MP"
# Text that means a Python error leaked to the user instead of a sentence written for them.
LEAKS = ("Traceback", "NoneType", "cannot identify image file", "object has no attribute", "Errno",
         "decompression bomb DOS attack", "weights_only", "KeyError", "TypeError", "AttributeError")
MNIST_CARD = ModelCard(name="mnist", classes=[str(i) for i in range(10)], mean=list(MNIST.mean) * 3,
                       std=list(MNIST.std) * 3, colour_mode="gray", input_kind="drawing")


def assert_clear(message: str, fragment: str) -> None:
    assert fragment in message, message
    leaked = [s for s in LEAKS if s in message]
    assert not leaked, f"Python internals {leaked} in the message: {message}"
    assert len(message) < 600, message


# --- the corpus -------------------------------------------------------------------------------------


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(seed: int = 0, w: int = 48, h: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, rows: int | None = 4) -> bytes:
    """A 1-bit grey PNG that declares ``width``×``height``; its pixels are zeros.

    ``rows=None``: every row is there (a complete, valid image: a decompression bomb, a few KB that
    decode to ``width*height`` pixels); otherwise only the first ``rows`` (a header that lies).
    """
    row = b"\0" + bytes((width + 7) // 8)
    z = zlib.compressobj(9)
    n = height if rows is None else rows
    data = b"".join(z.compress(row * min(1000, n - i)) for i in range(0, n, 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


def animated_gif() -> tuple[bytes, list[np.ndarray]]:
    rng = np.random.default_rng(3)
    frames = []
    for level in (200, 100, 50):  # few colours: the GIF palette holds them exactly
        pattern = np.kron(rng.integers(0, 2, (5, 6, 1)), np.ones((8, 8, 1))).astype(np.uint8)
        frames.append(np.repeat(pattern * level, 3, axis=2))
    buf = io.BytesIO()
    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=100, loop=0)
    return buf.getvalue(), frames


def la_image() -> tuple[bytes, np.ndarray]:
    """Grey + alpha: the left half opaque, the right half transparent; and its RGB over white."""
    grey = noise(4)[:, :, 0]
    alpha = np.zeros_like(grey)
    alpha[:, : grey.shape[1] // 2] = 255
    over_white = np.where(alpha[..., None] == 255, np.repeat(grey[..., None], 3, axis=2), 255).astype(np.uint8)
    return encoded(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"), over_white


def nan_float_tiff() -> bytes:
    arr = np.full((40, 48), np.nan, np.float32)
    arr[:20] = np.inf
    arr[5:10] = -np.inf
    arr[30:] = 1e38
    arr[35:, :10] = 0.25
    return encoded(Image.fromarray(arr, "F"), "TIFF")


# Each bad file, the error the library documents for it, and a fragment of its message.
BAD_FILES = {
    "truncated.png": (lambda: truncated(encoded(Image.fromarray(noise()), "PNG")), "truncated or corrupt"),
    "truncated.jpg": (lambda: truncated(encoded(Image.fromarray(noise()), "JPEG", quality=90)),
                      "truncated or corrupt"),
    "header-only.jpg": (lambda: truncated(encoded(Image.fromarray(noise()), "JPEG", quality=90), 0.1),
                        "runcated"),
    "empty.png": (lambda: b"", "is empty (0 bytes), not an image"),
    "notes.png": (lambda: b"Dear diary, this is not a picture.\n" * 3, "is not an image in a format we can read"),
    "huge-20000x20000.png": (lambda: png_declaring(20000, 20000), LIMIT),
    "bomb-81mp.png": (lambda: png_declaring(9000, 9000, rows=None), LIMIT),
    "bomb-256mp.png": (lambda: png_declaring(16000, 16000, rows=None), LIMIT),
}


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- the library --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wdir(tmp_path_factory):
    return weights_dir(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def photo(wdir):
    return Explorer.from_weights(wdir / "cifar10_resnet.safetensors", "cpu")


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_gets_its_documented_error(name, tmp_path, photo):
    make, fragment = BAD_FILES[name]
    path = write(tmp_path, name, make())
    with pytest.raises(InputError) as info:
        photo.analyze(str(path))
    assert_clear(str(info.value), fragment)
    if fragment != LIMIT:
        assert name in str(info.value)  # the message names the file
    with pytest.raises(InputError):  # the same bytes without a name are refused alike
        load_image(path.read_bytes())


@pytest.mark.parametrize(("name", "size"), [("huge-20000x20000.png", "400 MP"), ("bomb-256mp.png", "256 MP")])
def test_an_image_over_the_limit_is_refused_with_its_size_and_the_documented_limit(name, size, tmp_path):
    """Above PIL's own bomb limit (2 × 89 MP) too, the user learns the project's limit, not PIL's."""
    path = write(tmp_path, name, BAD_FILES[name][0]())
    with pytest.raises(InputError) as info:
        load_image(str(path))
    assert_clear(str(info.value), LIMIT)
    assert size in str(info.value)


@pytest.mark.parametrize("name", ["huge-20000x20000.png", "bomb-81mp.png", "bomb-256mp.png"])
def test_oversized_images_are_refused_without_decoding(name, tmp_path):
    data = BAD_FILES[name][0]()
    assert len(data) < 100_000  # a small file...
    path = write(tmp_path, name, data)
    proc = psutil.Process()
    rss = proc.memory_info().rss
    t0 = time.perf_counter()
    with pytest.raises(InputError):
        load_image(str(path))
    assert time.perf_counter() - t0 < 1.0  # decoding 81-400 MP would take seconds...
    assert proc.memory_info().rss - rss < 50 * 2**20  # ...and 81-1200 MB


def test_the_size_check_runs_before_decoding_at_any_declared_size(tmp_path):
    path = write(tmp_path, "wide.png", png_declaring(2**31 - 1, 1, rows=0))  # the widest PNG there can be
    with pytest.raises(InputError, match="MP"):
        load_image(str(path))


def test_1x1_image_gives_a_valid_prediction(tmp_path, photo):
    colour = (10, 200, 30)
    path = write(tmp_path, "dot.png", encoded(Image.new("RGB", (1, 1), colour), "PNG"))
    analysis = photo.analyze(str(path))
    assert torch.isfinite(analysis.logits).all()
    assert float(analysis.probs.sum()) == pytest.approx(1.0, abs=1e-5)
    assert len(analysis.predictions) == 5 and analysis.input.shape == (1, 3, 32, 32)
    # upscaling one pixel gives a flat image of its colour
    torch.testing.assert_close(analysis.logits, photo.analyze(Image.new("RGB", (32, 32), colour)).logits)


def equivalent_modes():
    """(file name, file bytes, the 8-bit RGB/L image it must be analysed as)."""
    rgb = noise(1)
    grey = noise(2)[:, :, 0]
    palette = Image.fromarray(rgb).quantize(64)
    gif, frames = animated_gif()
    la, la_rgb = la_image()
    cmyk_jpeg = encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    return {
        "grey-16bit.png": (encoded(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), Image.fromarray(grey, "L")),
        "cmyk.tif": (encoded(Image.fromarray(rgb).convert("CMYK"), "TIFF"), Image.fromarray(rgb)),
        "cmyk.jpg": (cmyk_jpeg, Image.open(io.BytesIO(cmyk_jpeg)).convert("RGB")),
        "palette.png": (encoded(palette, "PNG"), palette.convert("RGB")),
        "grey-alpha.png": (la, Image.fromarray(la_rgb)),
        "animated.gif": (gif, Image.fromarray(frames[0])),  # the first frame
    }


@pytest.mark.parametrize("name", list(equivalent_modes()))
def test_unusual_modes_give_the_result_of_their_8bit_equivalent(name, tmp_path, photo):
    data, reference = equivalent_modes()[name]
    path = write(tmp_path, name, data)
    got = photo.analyze(str(path))
    assert torch.isfinite(got.logits).all()
    torch.testing.assert_close(got.logits, photo.analyze(reference).logits, rtol=0, atol=1e-5)


def test_the_animated_gif_is_its_first_frame_not_another(tmp_path, photo):
    data, frames = animated_gif()
    assert Image.open(io.BytesIO(data)).n_frames == 3
    got = photo.analyze(str(write(tmp_path, "a.gif", data))).logits
    assert not torch.allclose(got, photo.analyze(Image.fromarray(frames[1])).logits, atol=1e-5)


def test_nan_and_infinite_pixels_give_finite_logits(tmp_path, photo):
    path = write(tmp_path, "nan.tif", nan_float_tiff())
    assert Image.open(path).mode == "F"
    for source in (str(path), np.full((8, 8, 3), np.nan, np.float32), np.full((8, 8), np.inf)):
        analysis = photo.analyze(source)
        assert torch.isfinite(analysis.logits).all() and torch.isfinite(analysis.input).all()
        assert all(math.isfinite(m.ratio) and math.isfinite(m.cosine) for m in analysis.metrics)


@pytest.mark.parametrize(
    "value",
    [{}, {"background": None, "composite": None, "id": None}, {"background": None, "layers": None, "composite": None},
     {"layers": []}, {"layers": [None]}],
    ids=["no-keys", "no-layers-key", "layers-none", "layers-empty", "layers-of-none"],
)
def test_sketch_without_any_image_is_the_empty_drawing_error(value):
    with pytest.raises(InputError, match="The drawing is empty"):
        prepare(value, MNIST_CARD)


def ink_layer() -> np.ndarray:
    layer = np.zeros((280, 280, 4), np.uint8)  # transparent, with a black stroke: a "1"
    layer[60:220, 130:150, 3] = 255
    return layer


def test_sketch_with_layers_but_no_background_or_composite_is_drawn_on_white():
    white = np.full((280, 280, 4), 255, np.uint8)
    white[60:220, 130:150, :3] = 0
    got = prepare({"layers": [ink_layer()]}, MNIST_CARD).tensor
    torch.testing.assert_close(got, prepare(white, MNIST_CARD, kind="drawing").tensor)


def test_sketch_with_missing_layers_uses_the_composite():
    composite = np.full((280, 280, 4), 255, np.uint8)
    composite[60:220, 130:150, :3] = 0
    got = prepare({"composite": composite}, MNIST_CARD).tensor
    torch.testing.assert_close(got, prepare(composite, MNIST_CARD, kind="drawing").tensor)


# --- weights files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    model = build_model()
    save_weights(model, tutorial_card("good", trained=False), folder / "good.safetensors")
    torch.save(model.state_dict(), folder / "good.pth")
    return folder


def test_truncated_safetensors_with_its_card_fails_the_checksum(good_weights, tmp_path):
    data = (good_weights / "good.safetensors").read_bytes()
    write(tmp_path, "net.safetensors", truncated(data))
    (tmp_path / "net.json").write_text((good_weights / "good.json").read_text())
    with pytest.raises(WeightsError) as info:
        load_model(tmp_path / "net.safetensors")
    assert_clear(str(info.value), "does not match the sha256 in its card")


@pytest.mark.parametrize("fraction", [0.5, 0.001])
def test_truncated_safetensors_without_a_card(good_weights, tmp_path, fraction):
    write(tmp_path, "net.safetensors", truncated((good_weights / "good.safetensors").read_bytes(), fraction))
    with pytest.raises(WeightsError) as info:
        load_model(tmp_path / "net.safetensors")
    assert_clear(str(info.value), "truncated")
    assert re.fullmatch(rf"checkpoint {re.escape(str(tmp_path / 'net.safetensors'))}(: tensor '[\w.]+' lies at bytes "
                        r"\[\d+, \d+\) of the data but the file holds only [\d,]+ bytes of data, so it is truncated or "
                        r"its header is wrong| declares a safetensors header of [\d,]+ bytes but holds only [\d,]+ after "
                        r"the length, so it is truncated or not a safetensors file)", str(info.value)), str(info.value)


def test_truncated_torch_checkpoint(good_weights, tmp_path):
    write(tmp_path, "net.pth", truncated((good_weights / "good.pth").read_bytes()))
    with pytest.raises(WeightsError) as info:
        load_model(tmp_path / "net.pth")
    assert_clear(str(info.value), "is a truncated or damaged zip archive, so it is not a complete torch.save checkpoint")


def test_empty_weights_file(tmp_path):
    with pytest.raises(WeightsError, match=r"is empty \(0 bytes\)"):
        load_model(write(tmp_path, "net.pth", b""))


def test_weights_of_another_architecture(tmp_path):
    import torchvision

    # Without a card a file is recognised from its keys and shapes, as an upload is: another config, or a
    # torchvision ResNet, loads as what it is, with the logits of the network it was saved from.
    x = torch.randn(2, 3, 32, 32)
    for name, source in (("tiny.pth", build_model(TINY)), ("resnet18.pth", torchvision.models.resnet18())):
        source = randomise_bn(source)
        torch.save(source.state_dict(), tmp_path / name)
        model, _ = load_model(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-5)
    # What fits no architecture is refused, naming the first key that does not fit.
    sd = build_model(ResNetConfig(widths=(8, 16), blocks=(2, 1))).state_dict()
    sd["stages.1.transition.conv.weight"] = torch.zeros(16, 8, 5, 5)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(WeightsError) as info:
        load_model(tmp_path / "odd.pth")
    assert_clear(str(info.value), "fits no supported architecture: closest is this project's ResNet (transitions), but "
                                  "key 'stages.1.transition.conv.weight' has shape [16, 8, 5, 5]")


# The hostile pickle itself, refused alike by --weights and by the upload, is tests/test_checkpoints.py's.


@pytest.mark.slow
def test_the_app_refuses_a_hostile_checkpoint_at_start(tmp_path, wdir):
    marker = tmp_path / "PWNED"
    evil = hostile(tmp_path, marker, "zip.pth")
    result = subprocess.run(
        [sys.executable, "app.py", "--weights", str(evil), "--weights-dir", str(wdir), "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"),
    )
    assert result.returncode != 0
    assert "unsafe pickles are refused" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not marker.exists()


# --- limits ------------------------------------------------------------------------------------------------


def test_the_pixel_limit_can_be_set_for_a_deployment(tmp_path):
    # RESNET_DEMO_MAX_PIXELS is read when the package is imported: a fresh process with a 2 MP limit refuses an
    # image of 2.25 MP and reads one of 1.96 MP (the default 50 MP limit would take both).
    import subprocess
    import sys

    for side in (1500, 1400):
        Image.new("RGB", (side, side), (90, 120, 200)).save(tmp_path / f"{side}.png")
    code = ("from resnet_demo.core.preprocess import load_image, InputError\n"
            "for side in (1500, 1400):\n"
            "    try:\n"
            "        print(side, load_image(f'{side}.png').size)\n"
            "    except InputError as exc:\n"
            "        print(side, 'refused:', exc)\n")
    env = {**os.environ, "RESNET_DEMO_MAX_PIXELS": "2000000", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.splitlines()
    assert out == ["1500 refused: The image is 1500×1500 pixels (2 MP); the limit is 2 MP. Please use a smaller image.",
                   "1400 (1400, 1400)"]


@pytest.mark.slow
def test_the_largest_allowed_image_is_analysed_in_bounded_time(tmp_path, photo):
    side = math.isqrt(MAX_PIXELS) - 1  # just under the limit: the worst case a user may send
    gradient = Image.linear_gradient("L").resize((side, side))
    channels = (gradient, gradient.transpose(Image.Transpose.ROTATE_90), gradient.point(lambda v: 255 - v))
    img = Image.merge("RGB", channels)
    path = tmp_path / "largest.png"
    img.save(path, compress_level=1)
    del img, gradient
    t0 = time.perf_counter()
    analysis = photo.analyze(str(path))
    elapsed = time.perf_counter() - t0
    assert torch.isfinite(analysis.logits).all()
    assert elapsed < 20, f"{side}×{side} took {elapsed:.1f} s"


# --- through the server ------------------------------------------------------------------------------------

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

SETTINGS = ("auto", 5, "f", "", [])
SERVER_BAD = ["truncated.png", "truncated.jpg", "empty.png", "notes.png", "huge-20000x20000.png", "bomb-81mp.png",
              "bomb-256mp.png"]


@pytest.fixture(scope="module")
def server(app_servers, wdir):
    """The shared server (conftest) on this module's weights, with a session of this module's own."""
    s = app_servers.get(weights=wdir)
    return s.client(), s.registry


def assert_serving(client, registry, tmp_path):
    path = write(tmp_path, "fine.png", encoded(Image.fromarray(noise(9)), "PNG"))
    preds, *_ = client.predict(handle_file(str(path)), *SETTINGS, api_name="/analyze_photo")
    assert preds["label"] == registry.get("cifar10").analyze(str(path)).predictions[0].label


@pytest.mark.parametrize("name", SERVER_BAD)
def test_bad_upload_through_the_server_is_a_clear_message(name, server, tmp_path):
    client, registry = server
    make, fragment = BAD_FILES[name]
    path = write(tmp_path, name, make())
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(path)), *SETTINGS, api_name="/analyze_photo")
    assert_clear(str(info.value), fragment)
    assert_serving(client, registry, tmp_path)


@pytest.mark.parametrize("name", ["dot.png", *equivalent_modes(), "nan.tif"])
def test_unusual_upload_through_the_server_is_analysed(name, server, tmp_path):
    client, registry = server
    modes = equivalent_modes()
    data = {"dot.png": lambda: encoded(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
            "nan.tif": nan_float_tiff}.get(name, lambda: modes[name][0])()
    path = write(tmp_path, name, data)
    preds, *_ = client.predict(handle_file(str(path)), *SETTINGS, api_name="/analyze_photo")
    want = registry.get("cifar10").analyze(str(path))
    assert preds["label"] == want.predictions[0].label
    got = {c["label"]: c["confidence"] for c in preds["confidences"]}
    for p in want.predictions:
        assert got[p.label] == pytest.approx(p.prob, abs=1e-5)


def test_sketch_with_missing_layers_through_the_server(server, tmp_path):
    client, registry = server
    for value in ({"background": None, "composite": None, "id": None},
                  {"background": None, "layers": [], "composite": None, "id": None},
                  {"id": "no-such-blob"}):
        with pytest.raises(AppError) as info:
            client.predict(value, *SETTINGS, api_name="/analyze_drawing")
        assert_clear(str(info.value), "The drawing is empty")
    layer = write(tmp_path, "layer.png", encoded(Image.fromarray(ink_layer(), "RGBA"), "PNG"))
    value = {"background": None, "layers": [handle_file(str(layer))], "composite": None, "id": None}
    preds, *_ = client.predict(value, *SETTINGS, api_name="/analyze_drawing")
    want = registry.get("mnist").analyze({"layers": [ink_layer()]}, kind="drawing")
    assert preds["label"] == want.predictions[0].label
    assert_serving(client, registry, tmp_path)


@pytest.fixture(scope="module")
def server_without_uploads(app_servers, wdir):
    """The shared server with uploaded models off (--no-uploads), with a session of this module's own."""
    s = app_servers.get(uploads=False, weights=wdir)
    return s.client(), s.registry


def test_an_upload_over_the_size_limit_is_refused_and_the_server_keeps_serving(server_without_uploads, tmp_path):
    # With uploaded models off (--no-uploads), the server's own upload limit is the image limit.
    import httpx
    from gradio.utils import _parse_file_size

    import app

    client, registry = server_without_uploads
    limit = _parse_file_size(app.MAX_UPLOAD)
    assert client.config["max_file_size"] == limit  # the running server enforces the documented limit
    big = write(tmp_path, "big.png", encoded(Image.fromarray(noise(5)), "PNG") + os.urandom(11 * 2**20))
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {limit} bytes"):
        client.predict(handle_file(str(big)), *SETTINGS, api_name="/analyze_photo")  # gradio_client refuses it
    with big.open("rb") as f:  # a client that does not check: the server refuses it
        r = httpx.post(client.upload_url, files=[("files", ("big.png", f))], timeout=60)
    assert r.status_code == 413, r.text
    assert f"File size exceeded maximum allowed size of {limit} bytes" in r.text
    assert_serving(client, registry, tmp_path)


def test_with_uploads_on_an_image_over_its_limit_gets_a_sentence(server, tmp_path):
    # With uploaded models on, the server accepts checkpoints up to MAX_CHECKPOINT; images keep their 10 MiB.
    from gradio.utils import _parse_file_size

    import app

    client, registry = server
    assert client.config["max_file_size"] == _parse_file_size(app.MAX_CHECKPOINT)
    big = write(tmp_path, "big.png", encoded(Image.fromarray(noise(5)), "PNG") + os.urandom(11 * 2**20))
    with pytest.raises(AppError, match=r"The image file is 11\.0 MiB; the limit is 10 MiB"):
        client.predict(handle_file(str(big)), *SETTINGS, api_name="/analyze_photo")
    assert_serving(client, registry, tmp_path)
