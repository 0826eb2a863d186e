"""Translate's GPU path: each tile row cut, run, weighted and summed on the device.

On the CPU, blending tiles and handing rows to the writer cost more than reading and cutting
them (0.94 against 0.6 ms a tile in the README's profile), all on the main thread: that capped
what a GPU could be fed at about 600 tiles a second on 2 cores (benchmarks/pipeline.py). Here
the CPU only reads each tile row's band (on every core: GDAL decoding, or strip readers when
resampling) and copies it to the device as read (uint8 for 8-bit scenes, a quarter of float32's
bytes); the device cuts the tiles, runs the model, weights the outputs and sums them into the
row; only the finished rows come back, as uint8, for the writer (GDAL compressing on every core).

The arithmetic is :class:`~geosat2map.grid.RowBlender`'s: the same float32 weights, tiles summed in
the same order onto the same 0.5 rounding offset, masked pixels multiplied by 0, a truncating cast.
The device holds a whole tile row instead of the blender's sliding window (CPU caches are the
window's reason; the GPU has memory to spare). One row is in flight: row ``r + 1`` is read and
sent while the device works on row ``r``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .engine import InferenceEngine
from .grid import TileGrid
from .reader import RowBand, Scene

#: What a submitted row gives back once finished: its first output row, the uint8 pixels
#: (3, n, width) and the validity mask (n, width; None when every pixel is valid).
FinishedRows = tuple[int, np.ndarray, np.ndarray | None]


def fits(grid: TileGrid) -> bool:
    """Whether the device path applies: every tile whole (scenes smaller than a tile are padded
    tile by tile on the CPU path)."""
    return grid.width >= grid.tile and grid.height >= grid.tile


class DeviceRowBlender:
    """Tile rows in order in, finished output rows out; the sums live on the engine's device."""

    def __init__(self, grid: TileGrid, engine: InferenceEngine, batch_size: int, channels: int,
                 band_dtype: type, track_valid: bool) -> None:
        if not fits(grid):
            raise ValueError("the device path needs a scene at least one tile wide and high")
        self.grid, self.engine, self.batch_size = grid, engine, batch_size
        self.device = engine.device
        self.pinned = self.device.type == "cuda"
        self.y_weights = [torch.from_numpy(w).to(self.device) for w in grid.y_weights]
        self.x_weights = [torch.from_numpy(w).to(self.device) for w in grid.x_weights]
        t, width = grid.tile, grid.width
        dtype = torch.from_numpy(np.empty(0, band_dtype)).dtype
        # Two host buffers each way, one per row in flight: a row's input is not overwritten before
        # the device has copied it, nor its output before the writer has taken it.
        self._bands = [self._host((channels, t, width), dtype) for _ in range(2)]
        self._masks = [self._host((t, width), torch.bool) for _ in range(2)] if track_valid else None
        self._rows = [self._host((3, t, width), torch.uint8) for _ in range(2)]
        self._slot = 0
        self.carry: torch.Tensor | None = None  # the sums of the rows the next tile row shares

    def _host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host buffer, page-locked on CUDA so copies both ways run asynchronously."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.pinned)

    def _send(self, host: torch.Tensor, array: np.ndarray) -> torch.Tensor:
        staged = host[..., : array.shape[-2], :]
        staged.numpy()[...] = array
        return staged.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def submit(self, row: int, pixels: np.ndarray, valid: np.ndarray,
               has_data: list[bool]) -> Callable[[], FinishedRows]:
        """Start tile row ``row`` (``pixels``: its band (bands, h, width) as read; ``valid``: its
        mask; ``has_data``: which tiles have valid pixels) and return a function that waits for
        its finished rows. Rows come in order, and each row's function is called before the row
        two after it is submitted (its host buffers are reused then)."""
        grid, i = self.grid, self._slot
        self._slot ^= 1
        y = grid.ys[row]
        n = grid.row_end(row) - y  # rows no later tile row touches
        band = self._send(self._bands[i], pixels)
        mask, kept_valid = None, None
        if self._masks is not None:
            mask = self._send(self._masks[i], valid[:n])
            kept_valid = valid[:n].copy()  # the band's buffer moves on before the row is written
        out = self._rows[i][:, :n]
        out.copy_(self._blend(row, band, mask, has_data, n), non_blocking=True)
        finished = torch.cuda.Event() if self.pinned else None
        if finished is not None:
            finished.record()

        def result() -> FinishedRows:
            if finished is not None:
                finished.synchronize()
            return y, out.numpy(), kept_valid

        return result

    def _blend(self, row: int, band: torch.Tensor, mask: torch.Tensor | None, has_data: list[bool],
               n: int) -> torch.Tensor:
        """The device's share of a tile row: cut the tiles with data from ``band``, run them, sum
        them weighted onto the rows carried from the previous tile row; keep the rows the next tile
        row shares and return the ``n`` finished ones as uint8, masked pixels 0.

        Every output pixel is covered by some tile of each tile row it lies in, so the union of
        the tiles' masks that RowBlender keeps is the band's own mask: no mask sums here."""
        grid = self.grid
        h = band.shape[1]
        sums = torch.empty((3, h, grid.width), dtype=torch.float32, device=self.device)
        k = 0 if self.carry is None else self.carry.shape[1]
        if k:
            sums[:, :k] = self.carry
        sums[:, k:] = 0.5  # the rounding offset, once per pixel (see RowBlender)
        cols = [c for c, data in enumerate(has_data) if data]
        for start in range(0, len(cols), self.batch_size):
            chunk = cols[start : start + self.batch_size]
            maps = self.engine.run(torch.stack([band[:, :, grid.xs[c] : grid.xs[c] + grid.tile] for c in chunk]))
            for tile, c in zip(maps, chunk):
                x = grid.xs[c]
                sums[:, :, x : x + grid.tile] += tile * (self.y_weights[row][:, None] * self.x_weights[c][None, :])
        self.carry = sums[:, n:h].clone() if n < h else None
        done = sums[:, :n] if mask is None else sums[:, :n] * mask
        return done.to(torch.uint8)


def stream_rows(scene: Scene, grid: TileGrid, first_row: int, blender: DeviceRowBlender,
                write_rows: Callable[[int, np.ndarray, np.ndarray | None], None],
                row_done: Callable[[int, int], None]) -> None:
    """Read each tile row from ``first_row`` on, run it on the device and hand its finished rows to
    ``write_rows(top, pixels, valid)``, one row in flight; ``row_done(row, tiles run)`` after each."""
    band = RowBand(scene, grid.tile)
    in_flight: list[tuple[int, int, Callable[[], FinishedRows]]] = []
    for row in range(first_row, len(grid.ys)):
        y = grid.ys[row]
        pixels, valid = band.rows(y, y + grid.tile)
        has_data = [True] * len(grid.xs) if scene.always_valid else \
            [bool(valid[:, x : x + grid.tile].any()) for x in grid.xs]
        in_flight.append((row, sum(has_data), blender.submit(row, pixels, valid, has_data)))
        if len(in_flight) > 1:
            _drain(in_flight.pop(0), write_rows, row_done)
    while in_flight:
        _drain(in_flight.pop(0), write_rows, row_done)


def _drain(item, write_rows, row_done) -> None:
    row, tiles, result = item
    top, pixels, valid = result()
    write_rows(top, pixels, valid)
    row_done(row, tiles)
