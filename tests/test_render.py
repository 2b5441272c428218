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


# --- the strip of feature grids and the residual chart, for few and for many blocks ----------------


def _codes(sizes):
    """Grids as the page draws them (16 channels, 32-px cells, 1-px lines) of (C, s, s) maps, one per size."""
    from resnet_demo.view.render import grid_codes

    gen = torch.Generator().manual_seed(0)
    return [grid_codes(torch.randn(16, s, s, generator=gen), signed=True, cell=32, pad=1) for s in sizes]


def _one_row_as_drawn_before(grids, captions, gap=8, font_px=12):
    """The strip's single row, written out independently: slots of the largest grid's side side by side."""
    from resnet_demo.view.render import WHITE, _text_codes

    slot = max(max(g.shape) for g in grids)
    pitch, text_h = slot + gap, font_px + 8
    canvas = np.full((slot + text_h, pitch * len(grids) - gap), WHITE, dtype=np.uint8)
    for i, (grid, caption) in enumerate(zip(grids, captions)):
        x0, y0 = i * pitch + (slot - grid.shape[1]) // 2, (slot - grid.shape[0]) // 2
        canvas[y0 : y0 + grid.shape[0], x0 : x0 + grid.shape[1]] = grid
        text = _text_codes(caption, font_px)[: text_h - 4, :slot]
        tx = i * pitch + max(0, (slot - text.shape[1]) // 2)
        canvas[slot + 4 : slot + 4 + text.shape[0], tx : tx + text.shape[1]] = text
    return canvas, pitch, slot


def test_strip_of_nine_blocks_stays_one_row_pixel_for_pixel():
    from resnet_demo.view.render import feature_strip

    grids = _codes([32] * 3 + [16] * 3 + [8] * 3)  # the shipped models' blocks: 32, 16, 8 pixels a side
    captions = [f"res{i} · 0.{i}0" for i in range(1, 10)]
    strip = feature_strip(grids, captions, "RdBu_r", stages=[1, 1, 1, 2, 2, 2, 3, 3, 3])
    want, pitch, slot = _one_row_as_drawn_before(grids, captions)
    assert strip.image.size == (1261, 153) == (want.shape[1], want.shape[0])
    assert np.array_equal(np.asarray(strip.image), want)
    assert (strip.pitch, strip.slot) == (pitch, slot) == (141, 133)
    assert np.array_equal(np.asarray(feature_strip(grids, captions, "RdBu_r").image), want)  # stages or not
    for y in (0, 70, 140, 152):  # grid and caption alike: the slot's column, as clicks were found before
        for x in range(-3, 1265):
            before = x // pitch if x >= 0 and x % pitch < slot and x < 1261 else None
            assert strip.index_at(x, y) == before, (x, y)
    assert strip.index_at(70, -1) is None and strip.index_at(70, 153) is None


def test_strip_of_fifty_blocks_is_laid_out_in_rows_by_stage():
    from resnet_demo.view.render import WHITE, feature_strip, slot_at, strip_rows

    stages = [1] * 3 + [2] * 8 + [3] * 36 + [4] * 3  # a ResNet-152
    assert strip_rows(stages) == [(0, 3), (3, 8), (11, 12), (23, 12), (35, 12), (47, 3)]
    assert strip_rows([1] * 13) == [(0, 7), (7, 6)] and strip_rows([1] * 12) == [(0, 12)]
    grids = _codes([56] * 3 + [28] * 8 + [14] * 36 + [7] * 3)  # at 224 x 224: 229-px grids, then 117-px ones
    strip = feature_strip(grids, [f"b{i}" for i in range(50)], "RdBu_r", stages=stages)
    layout, codes = strip.layout, np.asarray(strip.image)
    assert [row[1:] for row in layout.rows] == [(0, 3, 229), (3, 8, 117), (11, 12, 117), (23, 12, 117),
                                                (35, 12, 117), (47, 3, 117)]
    assert strip.image.size == (layout.left + 12 * 125 - 8, layout.rows[-1][0] + 117 + 20)
    assert 1450 < strip.image.size[0] < 1650 and strip.image.size[1] < 1100  # was 11842 x 249
    seen = []
    for top, first, count, slot in layout.rows:
        for j in range(count):
            x = layout.left + j * (slot + 8)
            for cx, cy in ((x + slot // 2, top + slot // 2), (x + 1, top + slot + 10), (x + slot - 1, top)):
                assert strip.index_at(cx, cy) == first + j == slot_at(cx, cy, tuple(layout))
            assert strip.index_at(x + slot + 4, top + slot // 2) is None  # the gap after the slot
            grid = grids[first + j]  # centred in its slot
            dy, dx = (slot - grid.shape[0]) // 2, (slot - grid.shape[1]) // 2
            assert np.array_equal(codes[top + dy : top + dy + grid.shape[0], x + dx : x + dx + grid.shape[1]], grid)
            seen.append(first + j)
        assert strip.index_at(layout.left // 2, top + slot // 2) is None  # the stage's label
        label = codes[top : top + slot, : layout.left - 8]
        assert (label != WHITE).sum() > 20  # ... is drawn there
        assert strip.index_at(layout.left + count * (slot + 8) + 5, top + 5) is None  # right of a short row
        assert strip.index_at(layout.left + 5, top + slot + 20) is None  # between rows
    assert seen == list(range(50))
    assert slot_at(10, 10, ()) is None  # a session without a strip yet


def test_block_at_maps_a_click_in_either_coordinate_to_the_block():
    from resnet_demo.view.pages import Pages
    from resnet_demo.view.render import feature_strip
    from resnet_demo.view.results import PageState

    stages = [1] * 3 + [2] * 4 + [3] * 13
    strip = feature_strip(_codes([8] * 20), [str(i) for i in range(20)], "RdBu_r", stages=stages)
    names = tuple(f"block{i}" for i in range(20))
    state = PageState(None, "photo", "m", 5, (names, ()), strip.layout)
    for top, first, count, slot in strip.layout.rows:
        for j in range(count):
            x = strip.layout.left + j * (slot + 8) + slot // 2
            assert Pages.block_at(state, x, top + slot // 2) == names[first + j]
    assert Pages.block_at(state, 2, 2) is None
    assert Pages.block_at(PageState(None, "photo", choices=(names, ())), 5, 5) is None  # no strip yet


def _metrics(stages, names=None):
    names = names or [f"layer{s}.{i}" for s, n in _runs(stages) for i in range(n)]
    return [BlockMetrics(name, stage, 0.5 + 0.01 * i, 0.0, 1, 1, 1, 0.5, np.zeros(1))
            for i, (name, stage) in enumerate(zip(names, stages))]


def _runs(stages):
    from resnet_demo.view.render import stage_runs

    return [(stages[first], count) for first, count in stage_runs(stages)]


def test_residual_chart_of_many_blocks_is_narrow_with_short_names():
    from resnet_demo.view.render import comparison_chart, short_names

    nine = _metrics([1, 1, 1, 2, 2, 2, 3, 3, 3], [f"res{i}" for i in range(1, 10)])
    assert residual_chart(nine).size == (9 * 64 + 130, 300) == (706, 300)  # as before
    assert comparison_chart(nine, nine, "A", "B").size == (9 * 72 + 130, 320)
    stages = [1] * 3 + [2] * 8 + [3] * 36 + [4] * 3
    fifty = _metrics(stages)
    assert residual_chart(fifty).size == (50 * 26 + 130, 300)  # was 3330 wide
    assert comparison_chart(fifty, fifty[:16], "A", "B").size == (50 * 26 + 130, 320)
    assert short_names([m.name for m in fifty], stages)[:5] == ["0", "1", "2", "0", "1"]
    assert short_names([m.name for m in fifty], stages)[11 + 35] == "35"
    assert short_names(["res12", "res13", "res14", "layer4.0"], [3, 3, 3, 4]) == ["12", "13", "14", "0"]
    img = np.asarray(residual_chart(fifty).convert("L")).astype(int)
    x0, slot, y1 = 62, (1430 - 124) / 50, 300 - 44
    for i in range(50):  # a number under every bar, in its own column
        cx = int(x0 + slot * (i + 0.5))
        assert (img[y1 + 6 : y1 + 16, cx - 6 : cx + 7] < 128).sum() > 3, i
    assert (img[y1 + 23 : y1 + 33, int(x0 + slot * 29) - 20 : int(x0 + slot * 29) + 20] < 128).sum() > 20  # "stage 3"
