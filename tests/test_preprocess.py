import io

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_demo.core.preprocess import InputError, drawing_array, load_image, photo_array, prepare, sketch_image
from resnet_demo.core.weights.cards import MNIST, ModelCard, tutorial_card

CIFAR = tutorial_card()
MNIST = ModelCard(
    name="mnist", classes=[str(i) for i in range(10)], mean=list(MNIST.mean) * 3, std=list(MNIST.std) * 3,
    colour_mode="gray", input_kind="drawing",
)


def png_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def transparent_palette():
    img = Image.new("P", (20, 20), 0)  # index 0 is black in the default palette...
    img.info["transparency"] = 0  # ...but fully transparent, so it composites to white
    return img


def test_photo_is_normalised_with_the_cards_mean_and_std():
    img = Image.new("RGB", (64, 48), (255, 0, 128))
    t = prepare(img, CIFAR).tensor
    assert t.shape == (1, 3, 32, 32)
    want = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(CIFAR.mean)) / torch.tensor(CIFAR.std)
    torch.testing.assert_close(t[0, :, 10, 10], want, rtol=0, atol=1e-5)


def test_photo_short_side_resize_and_centre_crop():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # the centre 40 columns are white; a centre crop of the 40x40 square keeps only them
    out = photo_array(Image.fromarray(arr), CIFAR)
    assert out.shape == (32, 32, 3)
    assert out[:, 2:30].min() > 200


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGBA", (20, 20), (255, 0, 0, 0)),  # fully transparent -> white
        lambda: Image.new("LA", (20, 20), (0, 0)),
        lambda: Image.new("RGB", (20, 20), "white").convert("P"),
        lambda: transparent_palette(),
        lambda: Image.new("CMYK", (20, 20), (0, 0, 0, 0)),
        lambda: Image.new("I;16", (20, 20), 65535),
        lambda: Image.new("I", (20, 20), 65535),
        lambda: Image.new("F", (20, 20), 1.0),
        lambda: Image.new("1", (20, 20), 1),
    ],
)
def test_every_mode_becomes_white_when_it_is_white(make):
    src = make()
    img = load_image(png_bytes(src, format="PNG" if src.mode == "P" else "TIFF"))
    assert img.mode in ("RGB", "L")
    assert np.asarray(img).min() >= 254


def test_sixteen_bit_values_are_scaled_not_clipped():
    arr = np.full((8, 8), 32768, np.uint16)
    img = load_image(png_bytes(Image.fromarray(arr)))
    assert np.asarray(img).mean() == pytest.approx(128, abs=1)


def test_nan_float_image_gives_finite_input():
    arr = np.full((8, 8), np.nan, np.float32)
    arr[0, 0] = 0.5
    t = prepare(Image.fromarray(arr, "F"), CIFAR).tensor
    assert torch.isfinite(t).all()


def test_exif_orientation_is_honoured():
    arr = np.zeros((10, 30, 3), np.uint8)  # landscape, stored
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees: displayed as portrait
    out = load_image(png_bytes(img, format="JPEG", exif=exif.tobytes()))
    assert out.size == (10, 30)


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("L", (16, 16), v) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    assert np.asarray(img.convert("L")).max() == 0


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, I am text", "not an image"),
        (png_bytes(Image.new("RGB", (64, 64)))[:60], "truncated or corrupt|could not be read"),
    ],
)
def test_bad_bytes_raise_input_error(data, message):
    with pytest.raises(InputError, match=message):
        load_image(data)


def test_huge_image_is_refused_before_decoding(monkeypatch):
    import resnet_demo.core.preprocess as pre

    monkeypatch.setattr(pre, "MAX_PIXELS", 100 * 100)
    with pytest.raises(InputError, match=r"101×100 pixels .* the limit is"):
        load_image(png_bytes(Image.new("L", (101, 100))))


def test_zero_size_array_is_a_value_error():
    with pytest.raises(ValueError, match="zero size"):
        prepare(np.zeros((0, 5, 3), np.uint8), CIFAR)


def draw_stroke(size=(200, 140), box=(120, 30, 140, 110), bg=255, ink=0):
    img = Image.new("L", size, bg)
    img.paste(ink, box)
    return img


def test_drawing_is_inverted_cropped_scaled_and_centred_by_mass():
    out = drawing_array(draw_stroke(), MNIST)
    assert out.shape == (32, 32)
    rows, cols = np.nonzero(out > 25)
    assert rows.max() - rows.min() + 1 in (20, 21)  # the longer side becomes 20 px of the 28-px box
    ys, xs = np.indices(out.shape)
    w = out.astype(float)
    assert (ys * w).sum() / w.sum() == pytest.approx(16, abs=0.75)
    assert (xs * w).sum() / w.sum() == pytest.approx(16, abs=0.75)
    assert out[0].max() == 0 and out[:, 0].max() == 0  # black background


def test_drawing_already_light_on_dark_is_not_inverted():
    a = drawing_array(draw_stroke(), MNIST)
    b = drawing_array(draw_stroke(bg=0, ink=255), MNIST)
    np.testing.assert_array_equal(a, b)


def test_drawing_replicated_to_three_channels_with_mnist_normalisation():
    t = prepare(draw_stroke(), MNIST).tensor
    assert t.shape == (1, 3, 32, 32)
    assert torch.equal(t[0, 0], t[0, 1]) and torch.equal(t[0, 1], t[0, 2])
    assert t[0, 0, 0, 0].item() == pytest.approx(-MNIST.mean[0] / MNIST.std[0], abs=1e-6)


def test_sketch_dict_with_transparent_stroke_layer():
    layer = np.zeros((100, 100, 4), np.uint8)
    layer[20:80, 45:55] = (0, 0, 0, 255)
    value = {"background": np.full((100, 100, 3), 255, np.uint8), "layers": [layer], "composite": None}
    img = sketch_image(value)
    assert np.asarray(img.convert("L"))[50, 50] == 0 and np.asarray(img.convert("L"))[5, 5] == 255
    assert prepare(value, MNIST).tensor.shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "value",
    [
        {"background": np.full((50, 50, 3), 255, np.uint8), "layers": [], "composite": np.full((50, 50, 4), 255, np.uint8)},
        {"background": None, "layers": None, "composite": None},
        {},
    ],
)
def test_empty_drawing_is_a_clear_value_error(value):
    with pytest.raises(ValueError, match="drawing is empty"):
        prepare(value, MNIST)
