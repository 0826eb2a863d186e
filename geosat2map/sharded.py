"""translate under torchrun: tile rows shared among ranks, one GeoTIFF written by rank 0.

Tile row ``i`` belongs to rank ``i % world_size``, so every rank computes a disjoint share and no
tile is computed twice. Each rank reads and infers its own rows; the other ranks send each finished
row (which tiles had data, their validity masks and outputs) to rank 0, which receives the rows in
order, computing its own in between, and blends and writes them exactly as a single process does:
same blending order, and per-tile outputs that do not depend on batch mates, so the file is the
same as a one-process run's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress

import numpy as np
import torch
import torch.distributed as dist
from .distributed import DistContext
from .errors import Geosat2mapError
from .grid import RowBlender, TileGrid

#: A tile row's (row, col, padded pixels or None, valid mask) items: the pipeline's reader
#: (the pixels are views, valid until it reads the next tile row).
ReadRow = Callable[[int], Iterable[tuple[int, int, np.ndarray | None, np.ndarray]]]

#: Header sent before each row: number of tiles with data, then 0 (a row follows) or 1 (the
#: sender failed, and says so in its own process; rank 0 stops with a one-line error).
_ROW, _FAILED = 0, 1


class RowPayload:
    """One tile row's results: which tiles had data, every tile's validity mask, their outputs."""

    def __init__(self, has_data: np.ndarray, valid: np.ndarray, outputs: np.ndarray) -> None:
        self.has_data = has_data  # (cols,) uint8
        self.valid = valid  # (cols, tile, tile) uint8, zero-padded at clipped edges
        self.outputs = outputs  # (tiles with data, 3, tile, tile) float32


def compute_row(read_row: ReadRow, grid: TileGrid, row: int, engine, batch_size: int) -> RowPayload:
    """Read (``read_row``: the pipeline's tile reader, whose pixels are borrowed) and infer one
    tile row, in batches."""
    cols, t = len(grid.xs), grid.tile
    has_data = np.zeros(cols, np.uint8)
    valid = np.zeros((cols, t, t), np.uint8)
    tiles, n = None, 0
    for _, c, tile, mask in read_row(row):
        h, w = mask.shape
        valid[c, :h, :w] = mask
        if tile is not None:
            if tiles is None:
                tiles = np.empty((cols, *tile.shape), np.float32)
            has_data[c] = 1
            tiles[n] = tile
            n += 1
    outputs = [engine(tiles[i : min(i + batch_size, n)]) for i in range(0, n, batch_size)]
    out = np.concatenate(outputs) if outputs else np.zeros((0, 3, t, t), np.float32)
    return RowPayload(has_data, valid, np.ascontiguousarray(out, np.float32))  # gloo sends contiguous only


def send_rows(ctx: DistContext, grid: TileGrid, read_row: ReadRow, engine, batch_size: int) -> int:
    """A rank other than 0: compute this rank's rows and send each to rank 0; returns tiles computed."""
    computed = 0
    for row in range(ctx.rank, len(grid.ys), ctx.world_size):
        try:
            payload = compute_row(read_row, grid, row, engine, batch_size)
        except BaseException:  # tell rank 0, which would otherwise wait for this row forever
            with suppress(RuntimeError):  # unless it is gone (a Ctrl-C reaches every rank): this error, not gloo's
                dist.send(torch.tensor([0, _FAILED]), 0)
            raise
        n = len(payload.outputs)
        dist.send(torch.tensor([n, _ROW]), 0)
        dist.send(torch.from_numpy(payload.has_data), 0)
        dist.send(torch.from_numpy(payload.valid), 0)
        if n:
            dist.send(torch.from_numpy(payload.outputs), 0)
        computed += n
    return computed


def _receive(grid: TileGrid, source: int) -> RowPayload:
    header = torch.zeros(2, dtype=torch.int64)
    dist.recv(header, source)
    n, status = (int(v) for v in header)
    if status == _FAILED:
        raise Geosat2mapError(f"rank {source} failed (its own error is above); nothing was written")
    cols, t = len(grid.xs), grid.tile
    has_data = torch.zeros(cols, dtype=torch.uint8)
    valid = torch.zeros((cols, t, t), dtype=torch.uint8)
    dist.recv(has_data, source)
    dist.recv(valid, source)
    outputs = torch.zeros((n, 3, t, t), dtype=torch.float32)
    if n:
        dist.recv(outputs, source)
    return RowPayload(has_data.numpy(), valid.numpy(), outputs.numpy())


def gather_rows(ctx: DistContext, grid: TileGrid, read_row: ReadRow, engine,
                batch_size: int) -> Iterator[tuple[int, RowPayload]]:
    """Rank 0: every tile row in order, its own computed here and the others' received."""
    for row in range(len(grid.ys)):
        owner = row % ctx.world_size
        if owner == 0:
            yield row, compute_row(read_row, grid, row, engine, batch_size)
        else:
            yield row, _receive(grid, owner)


def blend_row(grid: TileGrid, row: int, payload: RowPayload, blender: RowBlender,
              tile_done: Callable[[], None]) -> int:
    """Blend one received row in column order, as the single-process stream does; returns tiles run."""
    k = 0
    for c in range(len(grid.xs)):
        h, w = grid.tile_shape(row, c)
        if payload.has_data[c]:
            blender.add(row, c, payload.outputs[k], payload.valid[c, :h, :w].astype(bool))  # ours to scale
            k += 1
        else:
            blender.mark_empty(row, c)
        tile_done()
    return k
