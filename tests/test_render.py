import numpy as np
import torch

from resnet_demo.core.metrics import BlockMetrics
from resnet_demo.core.weights.cards import tutorial_card
from resnet_demo.view.render import feature_grid, input_image, png_data_url, rank_channels, residual_chart


def test_channels_ranked_by_mean_absolute_value():
    fmap = torch.zeros(4, 2, 2)
    fmap[2] = -3.0
    fmap[0] = 1.0
    fmap[3] = 2.0
    assert rank_channels(fmap).tolist()[:3] == [2, 3, 0]


def test_signed_grid_colours_positive_red_negative_blue_zero_white():
    fmap = torch.zeros(3, 4, 4)
    fmap[0] = 5.0
    fmap[1] = -4.0
    img = np.asarray(feature_grid(fmap, signed=True, cell=8, pad=0).convert("RGB"))
    assert img.shape == (16, 16, 3)  # 3 tiles -> a 2x2 grid of 8-px tiles
    red, blue, white = img[0, 0], img[0, 8], img[8, 0]
    assert int(red[0]) - int(red[2]) > 60
    assert int(blue[2]) - int(blue[0]) > 60
    assert white.min() > 230


def test_shared_scale_keeps_weak_channels_dark():
    fmap = torch.stack([torch.full((2, 2), 10.0), torch.full((2, 2), 1.0)])
    shared = np.asarray(feature_grid(fmap, cell=2, pad=0).convert("RGB")).astype(int)
    own = np.asarray(feature_grid(fmap, cell=2, pad=0, per_channel_scale=True).convert("RGB")).astype(int)
    assert shared[0, 2].sum() < shared[0, 0].sum()  # channel 1 is dimmer on the shared scale
    assert (own[0, 2] == own[0, 0]).all()  # ...and as bright as channel 0 on its own scale


def test_input_image_undoes_normalisation():
    card = tutorial_card()
    pixel = torch.tensor([0.2, 0.5, 0.8])
    x = ((pixel - torch.tensor(card.mean)) / torch.tensor(card.std)).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    img = np.asarray(input_image(x, card, size=64))
    assert img.shape == (64, 64, 3)
    assert np.abs(img[5, 5].astype(int) - [51, 128, 204]).max() <= 1


def test_residual_chart_bar_heights_follow_the_ratio():
    metrics = [BlockMetrics(f"res{i}", 1 + (i - 1) // 3, ratio, 0.0, 1, 1, 1, 0.5, np.zeros(1))
               for i, ratio in enumerate([0.2, 0.8, 0.4], start=1)]
    img = np.asarray(residual_chart(metrics, width=640, height=300)).astype(int)
    blue = np.array([0x4C, 0x72, 0xB0])
    heights = []
    for col in (62 + (640 - 124) * f for f in (1 / 6, 3 / 6, 5 / 6)):
        column = img[:, int(col)]
        heights.append(int((np.abs(column - blue).sum(axis=1) < 30).sum()))
    assert heights[1] > heights[2] > heights[0] > 0
    assert abs(heights[1] / heights[0] - 4) < 0.3


def test_tile_at_finds_the_tile_under_every_pixel_of_a_grid():
    from resnet_demo.view.render import WHITE, grid_codes, tile_at

    n, h, w, cell, pad = 7, 4, 4, 16, 1
    # Each channel constant at its own value, so a tile's colour code says which channel it shows.
    fmap = torch.arange(1, n + 1, dtype=torch.float32)[:, None, None].expand(n, h, w).contiguous()
    channels = list(range(n))
    codes = grid_codes(fmap, channels=channels, cell=cell, pad=pad)
    level_of = {int(codes[pad + 2, pad + 2 + i * (cell + pad)]) if i < 3 else None: i for i in range(3)}
    hits = 0
    for y in range(codes.shape[0]):
        for x in range(codes.shape[1]):
            tile = tile_at(n, h, w, cell, pad, x + 0.5, y + 0.5)
            if codes[y, x] == WHITE:
                assert tile is None, (x, y)
            else:
                assert tile is not None
                hits += 1
                if tile < 3:
                    assert level_of[int(codes[y, x])] == tile
    assert hits == n * cell * cell  # every pixel of every tile, and only those
    assert tile_at(n, h, w, cell, pad, -1, 5) is None and tile_at(n, h, w, cell, pad, 10_000, 5) is None


def test_png_data_url_carries_the_palette_image_exactly():
    import base64
    import io

    from PIL import Image

    fmap = torch.linspace(-1, 1, 4 * 6 * 6).reshape(4, 6, 6)
    grid = feature_grid(fmap, signed=True, cell=12, pad=2)
    url = png_data_url(grid)
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64"
    back = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    assert back.mode == "P" and back.size == grid.size
    assert np.array_equal(np.asarray(back), np.asarray(grid))  # the same palette indices ...
    assert back.getpalette() == grid.getpalette()  # ... and colours
    fast, small = png_data_url(grid, compress_level=1), png_data_url(grid, compress_level=9)
    assert len(small) <= len(fast)  # level 1 trades a little size for encoding time
