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
def test_property_every_pixel_covered_and_weights_sum_to_one(width, height, tile, overlap_share):
    grid = TileGrid(width, height, tile, int(overlap_share * tile))
    total = weight_sum(grid)
    assert (total > 0).all()  # every pixel covered with a usable weight
    # Where at most two tiles meet along each axis the ramps alone sum to one; where three
    # meet (tight spacing) the blender's division by the sum keeps the normalised weights exact.
    def pairwise_only(pos):
        return all(c - a >= tile for a, c in zip(pos, pos[2:]))

    if pairwise_only(grid.xs) and pairwise_only(grid.ys):
        assert np.allclose(total, 1.0, atol=1e-6)


def test_blender_reassembles_a_constant_image_exactly():
    grid = TileGrid(700, 600, 256, 64)
    blender = RowBlender(grid)
    rows = []
    for r in range(len(grid.ys)):
        for c in range(len(grid.xs)):
            h, w = grid.tile_shape(r, c)
            blender.add(r, c, np.full((3, 256, 256), 77.0, np.float32), np.ones((h, w), bool))
        blender.flush(r, lambda top, pixels, valid: rows.append((top, pixels.copy(), valid.copy())))
    tops = [t for t, _, _ in rows]
    assert set(grid.ys) <= set(tops)  # each tile row's band starts where that row starts
    assert tops == [0] + [t + p.shape[1] for t, p, _ in rows[:-1]]  # in order, no gap, no overlap
    image = np.concatenate([p for _, p, _ in rows], axis=1)
    assert image.shape == (3, 600, 700)
    assert (image == 77).all()
    assert all(v.all() for _, _, v in rows)


def test_blender_buffer_holds_at_most_a_few_tile_rows():
    grid = TileGrid(300, 5000, 256, 64)
    blender = RowBlender(grid)
    biggest = 0
    for r in range(len(grid.ys)):
        for c in range(len(grid.xs)):
            blender.add(r, c, np.zeros((3, 256, 256), np.float32), np.ones((256, 256), bool))
        biggest = max(biggest, blender.used)
        blender.flush(r, lambda *band: None)
    assert biggest <= 256 and blender.acc.shape[1] <= 512


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
    """What the blender applies (each tile's weight over the accumulated sum) sums to one at every
    pixel, three-tile overlaps included: constant tiles come back as that constant, everywhere."""
    grid = TileGrid(width, height, tile, int(overlap_share * tile))
    blender = RowBlender(grid)
    image = np.full((3, height, width), -1.0, np.float32)
    covered = np.zeros((height, width), bool)

    def sink(top, pixels, valid):
        image[:, top : top + pixels.shape[1]] = pixels
        covered[top : top + pixels.shape[1]] |= valid

    for r in range(len(grid.ys)):
        for c in range(len(grid.xs)):
            h, w = grid.tile_shape(r, c)
            blender.add(r, c, np.full((3, tile, tile), value, np.float32), np.ones((h, w), bool))
        blender.flush(r, sink)
    assert covered.all()
    assert np.array_equal(image, np.full_like(image, value))


def test_row_buffers_are_exactly_the_shape_asked_with_rows_off_power_of_two_strides():
    from geosat2map.buffers import row_buffer

    for dtype in (np.float32, np.uint8, bool):
        buf = row_buffer((3, 256, 16384), dtype)
        assert buf.shape == (3, 256, 16384) and buf.dtype == dtype and not buf.any()
        assert buf.strides[-2] % 4096 != 0  # rows do not all land on the same cache sets
