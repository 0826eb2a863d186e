"""The tile grid covers every pixel and its blending weights sum to one everywhere."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geosat2map.grid import RowBlender, TileGrid, axis_positions, ramp


def weight_sum(grid: TileGrid) -> np.ndarray:
    total = np.zeros((grid.height, grid.width))
    for r, y in enumerate(grid.ys):
        for c, x in enumerate(grid.xs):
            h, w = grid.tile_shape(r, c)
            total[y : y + h, x : x + w] += grid.weight(r, c)
    return total


def test_ramps_are_complementary():
    for n in (1, 2, 7, 64):
        assert np.allclose(ramp(n) + ramp(n)[::-1], 1.0)
        assert (ramp(n) > 0).all()


@pytest.mark.parametrize("length,tile,overlap", [(256, 256, 64), (257, 256, 64), (1000, 256, 64), (100, 256, 32)])
def test_positions_cover_the_axis(length, tile, overlap):
    pos = axis_positions(length, tile, overlap)
    assert pos[0] == 0
    assert pos[-1] + tile >= length
    assert all(b - a <= tile - overlap for a, b in zip(pos, pos[1:]))


@pytest.mark.parametrize("shape", [(1000, 700), (256, 256), (300, 1300), (5, 9)])
def test_weights_sum_to_one_edges_and_corners_included(shape):
    grid = TileGrid(shape[1], shape[0], 256, 64)
    total = weight_sum(grid)
    assert np.allclose(total, 1.0, atol=1e-6)
    assert np.allclose(total[0, 0], 1.0) and np.allclose(total[-1, -1], 1.0)


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 1500),
    height=st.integers(1, 900),
    tile=st.sampled_from([256, 512]),
    overlap_share=st.floats(0, 0.5),
)
def test_property_weights_sum_to_one_for_any_grid(width, height, tile, overlap_share):
    grid = TileGrid(width, height, tile, int(overlap_share * tile))
    total = weight_sum(grid)
    # Three tiles meet along an axis in tightly spaced grids: the weights still sum to one there.
    assert np.allclose(total, 1.0, atol=1e-6)


class Canvas:
    """A blend sink that paints an in-memory image and records what the blender promised when."""

    def __init__(self, grid: TileGrid) -> None:
        self.image = np.full((3, grid.height, grid.width), -1.0, np.float32)
        self.covered = np.zeros((grid.height, grid.width), int)
        self.valid = np.zeros((grid.height, grid.width), bool)
        self.ends: list[int] = []

    def put(self, top, left, pixels, valid):
        h, w = pixels.shape[1:]
        assert not self.ends or top >= self.ends[-1]  # nothing above a row already declared whole
        self.image[:, top : top + h, left : left + w] = pixels.astype(np.uint8)  # as the writer casts
        self.covered[top : top + h, left : left + w] += 1
        self.valid[top : top + h, left : left + w] = True if valid is None else valid

    def advance(self, end):
        assert (self.covered[:end] == 1).all()  # every row declared whole was painted exactly once
        self.ends.append(end)


def _blend(grid: TileGrid, value: float, track_valid: bool = True) -> Canvas:
    canvas = Canvas(grid)
    blender = RowBlender(grid, canvas, track_valid=track_valid)
    for r in range(len(grid.ys)):
        for c in range(len(grid.xs)):
            h, w = grid.tile_shape(r, c)
            blender.add(r, c, np.full((3, grid.tile, grid.tile), value, np.float32), np.ones((h, w), bool))
    return canvas


@pytest.mark.parametrize("track_valid", [True, False])
def test_blender_reassembles_a_constant_image_exactly(track_valid):
    grid = TileGrid(700, 600, 256, 64)
    canvas = _blend(grid, 77.0, track_valid)
    assert canvas.ends == grid.ys[1:] + [600]  # each tile row's band is whole once its last tile is in
    assert (canvas.covered == 1).all()
    assert (canvas.image == 77).all()
    assert canvas.valid.all()


def test_blender_refuses_tiles_out_of_raster_order():
    grid = TileGrid(700, 600, 256, 64)
    blender = RowBlender(grid, Canvas(grid))
    blender.add(0, 0, np.zeros((3, 256, 256), np.float32), np.ones((256, 256), bool))
    with pytest.raises(ValueError, match="raster order"):
        blender.add(0, 2, np.zeros((3, 256, 256), np.float32), np.ones((256, 256), bool))


def test_blender_skipped_tiles_come_out_masked():
    grid = TileGrid(700, 600, 256, 64)
    canvas = Canvas(grid)
    blender = RowBlender(grid, canvas)
    hole = np.zeros((600, 700), bool)  # nodata under tile (1, 1), so every tile there sees it
    hole[grid.ys[1] : grid.ys[1] + 256, grid.xs[1] : grid.xs[1] + 256] = True
    for r, y in enumerate(grid.ys):
        for c, x in enumerate(grid.xs):
            h, w = grid.tile_shape(r, c)
            if (r, c) == (1, 1):
                blender.mark_empty(r, c)
            else:
                blender.add(r, c, np.full((3, 256, 256), 90.0, np.float32), ~hole[y : y + h, x : x + w])
    assert (canvas.valid == ~hole).all()
    assert (canvas.image[:, hole] == 0).all() and (canvas.image[:, ~hole] == 90).all()


def test_blender_holds_only_the_overlap_rows_across_the_width():
    grid = TileGrid(20000, 5000, 256, 64)
    blender = RowBlender(grid, Canvas(TileGrid(1, 1)))
    assert blender.carry.shape == (3, grid.carried_rows, 20000)
    assert grid.carried_rows <= grid.overlap + 8  # evenly spread tiles overlap a little more than asked
    assert blender.window.shape[1:] == (256, 2048)  # the current tile row: a window, not the width


def test_overlap_beyond_half_a_tile_is_refused():
    with pytest.raises(ValueError):
        TileGrid(1000, 1000, 256, 200)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 1300),
    height=st.integers(1, 1300),
    tile=st.sampled_from([256, 512]),
    overlap_share=st.floats(0, 0.5),
    value=st.integers(0, 255),
)
def test_property_blended_weights_sum_to_one_for_any_grid(width, height, tile, overlap_share, value):
    """Constant tiles blend back to that constant at every pixel, three-tile overlaps included: no
    weight lost or counted twice, and the rounding offset applied once."""
    grid = TileGrid(width, height, tile, int(overlap_share * tile))
    canvas = _blend(grid, value)
    assert canvas.ends[-1] == height
    assert (canvas.covered == 1).all() and canvas.valid.all()
    assert np.array_equal(canvas.image, np.full_like(canvas.image, value))


def test_row_buffers_are_exactly_the_shape_asked_with_rows_off_power_of_two_strides():
    from geosat2map.buffers import row_buffer

    for dtype in (np.float32, np.uint8, bool):
        buf = row_buffer((3, 256, 16384), dtype)
        assert buf.shape == (3, 256, 16384) and buf.dtype == dtype and not buf.any()
        assert buf.strides[-2] % 4096 != 0  # rows do not all land on the same cache sets
