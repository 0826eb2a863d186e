"""The overlapping tile grid and the blending that hides its seams.

Tiles are spread evenly along each axis so every overlap is at least ``overlap`` pixels and
the last tile ends exactly at the scene edge. Each tile carries a separable weight window: a
raised-cosine ramp across the stretch it shares with each neighbour and flat 1 elsewhere,
including the sides that touch the scene edge (so edges and corners are never faded out).
Neighbouring ramps are complementary, so the weights already sum to one; each axis's weights are
still divided by their sum, which keeps it exactly one where three tiles meet (tightly spaced
grids), so the blender only adds.

:class:`RowBlender` takes the tiles in raster order and hands each pixel on as soon as no later
tile can touch it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from .buffers import row_buffer

#: Columns of the window holding the current tile row: sliding it moves at most one tile's
#: columns, once every few tiles.
WINDOW_PIXELS = 2048


def axis_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``; one tile at 0 when the axis is shorter than a tile."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def ramp(n: int) -> np.ndarray:
    """Raised cosine rising over ``n`` pixels, sampled at pixel centres: ``ramp(n) + ramp(n)[::-1] == 1``."""
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    return 0.5 - 0.5 * np.cos(np.pi * t)


def axis_weights(length: int, tile: int, positions: list[int]) -> list[np.ndarray]:
    """1-D weights of each tile along one axis, clipped to the scene (``length`` may be < ``tile``),
    summing to one at every pixel."""
    weights = []
    for i, p in enumerate(positions):
        size = min(tile, length - p)
        w = np.ones(size, dtype=np.float64)
        if i > 0:  # ramp up across the overlap with the previous tile
            shared = positions[i - 1] + tile - p
            w[:shared] *= ramp(shared)
        if i < len(positions) - 1:  # ramp down across the overlap with the next tile
            shared = p + tile - positions[i + 1]
            w[size - shared :] *= ramp(shared)[::-1]
        weights.append(w)
    total = np.zeros(length)
    for p, w in zip(positions, weights):
        total[p : p + len(w)] += w
    return [(w / total[p : p + len(w)]).astype(np.float32) for p, w in zip(positions, weights)]


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``tile`` pixels overlapping by at least ``overlap`` over a ``width`` x ``height`` scene."""

    width: int
    height: int
    tile: int = 256
    overlap: int = 64

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError("the grid needs at least one pixel")
        if not 0 <= self.overlap <= self.tile // 2:
            raise ValueError(f"overlap must be between 0 and half the tile size ({self.tile // 2})")

    @cached_property
    def xs(self) -> list[int]:
        return axis_positions(self.width, self.tile, self.overlap)

    @cached_property
    def ys(self) -> list[int]:
        return axis_positions(self.height, self.tile, self.overlap)

    @cached_property
    def x_weights(self) -> list[np.ndarray]:
        return axis_weights(self.width, self.tile, self.xs)

    @cached_property
    def y_weights(self) -> list[np.ndarray]:
        return axis_weights(self.height, self.tile, self.ys)

    def __len__(self) -> int:
        return len(self.xs) * len(self.ys)

    def tile_shape(self, row: int, col: int) -> tuple[int, int]:
        """(height, width) of a tile clipped to the scene."""
        return len(self.y_weights[row]), len(self.x_weights[col])

    def weight(self, row: int, col: int) -> np.ndarray:
        return self.y_weights[row][:, None] * self.x_weights[col][None, :]

    @cached_property
    def carried_rows(self) -> int:
        """Most rows a tile row shares with the next one (what blending carries between rows).
        (Every tile row but the last is a whole tile high; the column weights are not needed, so
        a scene too wide to stream is refused at once, not after computing them.)"""
        return max((self.ys[r] + self.tile - self.ys[r + 1] for r in range(len(self.ys) - 1)), default=0)

    def row_end(self, row: int) -> int:
        """First output row that tiles after ``row`` still write to (the scene height for the last)."""
        return self.ys[row + 1] if row + 1 < len(self.ys) else self.height


def seam_ratio(image: np.ndarray, positions: list[int], tile: int, axis: int) -> float:
    """How much a (channels, h, w) mosaic changes across tile borders, relative to inside tiles.

    Mean absolute gradient on the lines where neighbours meet (where the next tile starts, where
    the previous one ends, and mid-overlap, where a hard cut would fall) over the mean gradient
    on lines inside single tiles, along ``axis`` (2: columns, 1: rows). About 1 or below: no seam.
    """
    grad = np.abs(np.diff(image.astype(np.float64), axis=axis)).mean(axis=(0, 1 if axis == 2 else 2))
    lines: set[int] = set()
    inside = np.ones(grad.shape[0], bool)
    for a, b in zip(positions, positions[1:]):
        shared = a + tile - b
        lines |= {b - 1, b + shared // 2 - 1, a + tile - 1}
        inside[max(b - 1, 0) : a + tile] = False
    if not lines or not inside.any():
        return float("nan")
    return float(grad[sorted(lines)].mean() / grad[inside].mean())


class BlendSink(Protocol):
    """Where finished pixels go (the writer): rectangles, then word that every row above ``end`` is whole."""

    def put(self, top: int, left: int, pixels: np.ndarray, valid: np.ndarray | None) -> None:
        """``pixels``: float32 (channels, h, w) in [0, 256), of which the sink keeps the integer part
        (a cast to uint8); ``valid``: bool (h, w), None when every pixel is valid."""

    def advance(self, end: int) -> None: ...


class RowBlender:
    """Weighted accumulation of tiles arriving in raster order, each pixel handed on as soon as no
    later tile can touch it; memory grows with the scene's width, never its height.

    After tile ``c`` of a row, every column left of tile ``c + 1`` is final for the rows the next
    tile row does not reach: those pixels are given to the sink at once, while they are still in
    cache. Only the rows the next tile row overlaps (``overlap`` of them) are carried
    across the whole width in float32; the current tile row lives in a window a few tiles wide.
    (Accumulating whole tile rows cost 50 MB of float32 at 16384 pixels wide, against 13 MB here.)

    The grid's weights sum to one at every pixel, and every pixel covered by a skipped (all-nodata)
    tile is nodata itself, so at every valid pixel the sum of weighted tiles is already the blend:
    no weight buffer, no division. Each pixel's sum starts at 0.5, so the sink's cast to uint8
    rounds it to the nearest integer; a weighted mean of 0..255 stays in 0..255 (to float
    rounding), so there is nothing to clip. Masked pixels are multiplied by 0.
    """

    def __init__(self, grid: TileGrid, sink: BlendSink, first_row: int = 0, channels: int = 3,
                 track_valid: bool = True) -> None:
        """``first_row``: the tile row blending starts at (a resumed run starts past row 0).
        ``track_valid=False``: the scene is valid everywhere, so no validity masks are kept."""
        self.grid = grid
        self.sink = sink
        rows = min(grid.height, grid.tile)
        carried = grid.carried_rows
        window = min(grid.width, max(WINDOW_PIXELS, grid.tile))
        self.carry = row_buffer((channels, carried, grid.width), np.float32)
        self.window = row_buffer((channels, rows, window), np.float32)
        self.carry_valid = row_buffer((carried, grid.width), bool) if track_valid else None
        self.window_valid = row_buffer((rows, window), bool) if track_valid else None
        self.row, self.next_col = first_row, 0  # the tile expected next
        self.carried = 0  # rows at the top of this tile row that the carry holds
        self.base = self.lo = self.hi = 0  # window's first column; columns not yet final; columns entered

    def add(self, row: int, col: int, pixels: np.ndarray, valid: np.ndarray) -> None:
        """Blend one tile's output (channels, tile, tile; scaled in place), clipped to the scene,
        with its validity mask."""
        x, (h, w) = self._begin(row, col)
        a = x - self.base
        pixels = pixels[:, :h, :w]
        pixels *= self.grid.weight(row, col)
        self.window[:, :h, a : a + w] += pixels
        if self.window_valid is not None:
            self.window_valid[:h, a : a + w] |= valid[:h, :w]
        self._finish_columns()

    def mark_empty(self, row: int, col: int) -> None:
        """A tile skipped as all-nodata: its columns still become final."""
        self._begin(row, col)
        self._finish_columns()

    def _begin(self, row: int, col: int) -> tuple[int, tuple[int, int]]:
        """Check the raster order and bring the tile's columns into the window."""
        if (row, col) != (self.row, self.next_col):
            expected = (self.row, self.next_col)
            raise ValueError(f"tiles must arrive in raster order: got {(row, col)}, expected {expected}")
        x, (h, w) = self.grid.xs[col], self.grid.tile_shape(row, col)
        end = x + w
        if end - self.base > self.window.shape[2]:  # slide: only columns from lo on are still open
            n = self.hi - self.lo
            self.window[:, :, :n] = self.window[:, :, self.lo - self.base : self.hi - self.base]
            if self.window_valid is not None:
                self.window_valid[:, :n] = self.window_valid[:, self.lo - self.base : self.hi - self.base]
            self.base = self.lo
        if end > self.hi:  # new columns start from what the previous tile row left in them
            new, k = slice(self.hi - self.base, end - self.base), self.carried
            self.window[:, :k, new] = self.carry[:, :k, self.hi : end]
            self.window[:, k:, new] = 0.5  # the rounding offset, once per pixel (see the class)
            if self.window_valid is not None:
                self.window_valid[:k, new] = self.carry_valid[:k, self.hi : end]
                self.window_valid[k:, new] = False
            self.hi = end
        return x, (h, w)

    def _finish_columns(self) -> None:
        """Hand on the columns no later tile of this row touches; carry their overlap rows down."""
        grid, row, col = self.grid, self.row, self.next_col
        last = col == len(grid.xs) - 1
        stop = grid.width if last else grid.xs[col + 1]
        y, h = grid.ys[row], grid.tile_shape(row, col)[0]
        n = grid.row_end(row) - y  # rows final after this tile row
        a, b = self.lo - self.base, stop - self.base
        keep = h - n
        self.carry[:, :keep, self.lo : stop] = self.window[:, n:h, a:b]
        done, valid = self.window[:, :n, a:b], None
        if self.window_valid is not None:
            self.carry_valid[:keep, self.lo : stop] = self.window_valid[n:h, a:b]
            valid = self.window_valid[:n, a:b]
            done *= valid
        self.sink.put(y, self.lo, done, valid)
        self.lo, self.next_col = stop, col + 1
        if last:
            self.sink.advance(y + n)
            self.row, self.next_col, self.carried = row + 1, 0, keep
            self.base = self.lo = self.hi = 0

    def release(self) -> None:
        """Free the buffers once every row has been handed on."""
        self.carry = self.window = self.carry_valid = self.window_valid = None
