"""The overlapping tile grid and the blending that hides its seams.

Tiles are spread evenly along each axis so every overlap is at least ``overlap`` pixels and
the last tile ends exactly at the scene edge. Each tile carries a separable weight window: a
raised-cosine ramp across the stretch it shares with each neighbour and flat 1 elsewhere,
including the sides that touch the scene edge (so edges and corners are never faded out).
Neighbouring ramps are complementary, so the weights already sum to one; the blender still
divides by the accumulated weight, which keeps the sum exact where three tiles meet or where a
neighbour was skipped as all-nodata.

:class:`RowBlender` accumulates only the output rows that tiles still write to and hands back
each band of rows as soon as no later tile can touch it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .buffers import row_buffer


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
    """1-D weights of each tile along one axis, clipped to the scene (``length`` may be < ``tile``)."""
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
        weights.append(w.astype(np.float32))
    return weights


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


def _axis_sum(length: int, positions: list[int], weights: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(length, np.float32)
    for p, w in zip(positions, weights):
        total[p : p + len(w)] += w
    return total


class RowBlender:
    """Weighted accumulation over a rolling band of rows: memory grows with width, never height.

    Every pixel covered by a skipped (all-nodata) tile is nodata itself, so at every valid pixel
    all covering tiles were blended and the weight sum is the full grid's, which factorises into
    a row sum times a column sum: no per-pixel weight buffer is needed.
    """

    def __init__(self, grid: TileGrid, first_row: int = 0, channels: int = 3) -> None:
        """``first_row``: the tile row blending starts at (a resumed run starts past row 0)."""
        self.grid = grid
        self.channels = channels
        self.top = grid.ys[first_row] if first_row < len(grid.ys) else grid.height  # scene row at buffer row 0
        self.used = 0  # buffer rows in use
        self.col_inv = 1.0 / _axis_sum(grid.width, grid.xs, grid.x_weights)
        self.row_inv = 1.0 / _axis_sum(grid.height, grid.ys, grid.y_weights)
        rows = min(grid.height, grid.tile)
        self.acc = row_buffer((channels, rows, grid.width), np.float32)
        self.valid = row_buffer((rows, grid.width), bool)

    def _ensure(self, bottom: int) -> None:
        """Make buffer rows available down to scene row ``bottom`` (grows only in rare layouts)."""
        need = bottom - self.top
        if need > self.acc.shape[1]:
            grow = need - self.acc.shape[1]
            self.acc = np.concatenate([self.acc, np.zeros((self.channels, grow, self.grid.width), np.float32)], 1)
            self.valid = np.concatenate([self.valid, np.zeros((grow, self.grid.width), bool)], 0)
        self.used = max(self.used, need)

    def add(self, row: int, col: int, pixels: np.ndarray, valid: np.ndarray) -> None:
        """Blend one tile's output (channels, h, w), clipped to the scene, with its validity mask."""
        y, x = self.grid.ys[row], self.grid.xs[col]
        h, w = self.grid.tile_shape(row, col)
        self._ensure(y + h)
        r0 = y - self.top
        pixels = pixels[:, :h, :w]
        pixels *= self.grid.weight(row, col)
        self.acc[:, r0 : r0 + h, x : x + w] += pixels
        self.valid[r0 : r0 + h, x : x + w] |= valid[:h, :w]

    def mark_empty(self, row: int, col: int) -> None:
        """A tile skipped as all-nodata: its rows still have to exist in the buffer."""
        h, _ = self.grid.tile_shape(row, col)
        self._ensure(self.grid.ys[row] + h)

    def release(self) -> None:
        """Free the buffers once every row has been flushed."""
        self.acc = np.zeros((self.channels, 0, self.grid.width), np.float32)
        self.valid = np.zeros((0, self.grid.width), bool)

    def flush(self, row: int, sink: Callable[[int, np.ndarray, np.ndarray], None]) -> None:
        """After every tile of ``row`` is in, hand its finished band of rows to ``sink``, in order, a
        few rows per call.

        ``sink(first scene row, pixels, mask)`` gets float32 pixels already rounded to 0..255 (0 where
        the mask is False) as views of the buffer, valid only during the call: the writer casts them
        into its own block buffer, so no uint8 copy of the band is made here.

        Each pixel is a weighted mean of tile outputs in 0..255, so it stays in 0..255 (to float
        rounding, which rint absorbs): normalising and masking are one multiplication, no clip.
        """
        end = self.grid.row_end(row)
        n = end - self.top
        band = self.acc[:, :n]
        valid = self.valid[:n]
        for r in range(0, n, 16):  # a few rows at a time, handed on while they are still in cache
            rows = band[:, r : r + 16]
            factor = self.row_inv[self.top + r : min(self.top + r + 16, end), None] * self.col_inv[None, :]
            factor *= valid[r : r + 16]
            rows *= factor[None]
            np.rint(rows, out=rows)
            sink(self.top + r, rows, valid[r : r + 16])
        # Shift the rows still being blended to the top and clear the rest.
        keep = self.used - n
        self.acc[:, :keep] = self.acc[:, n : self.used]
        self.acc[:, keep : self.used] = 0
        self.valid[:keep] = self.valid[n : self.used]
        self.valid[keep : self.used] = False
        self.top, self.used = end, keep
