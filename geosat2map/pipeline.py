"""Scene in, map out: read -> tile -> infer -> blend -> write, streaming.

Only the tiles of one batch and the rows still being blended are in memory, so peak memory
depends on the scene's width and the batch size, not on its height.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from .devices import resolve_device
from .engine import InferenceEngine
from .errors import InputError, WeightsError
from .grid import RowBlender, TileGrid
from .reader import Scene, open_scene
from .weights import ModelSpec, load_generator
from .writer import GeoTIFFWriter, check_destination

#: Default overlap between 256-pixel tiles (see benchmarks/overlap.py for the measurement).
DEFAULT_OVERLAP = 64
#: GDAL block cache, MB: a block row of a 16384-pixel-wide scene in and out is about 25 MB, so
#: this holds what streaming needs without the cache growing with the scene.
GDAL_CACHE_MB = 32


@dataclass
class TranslateResult:
    """What a translate run did, for the caller to report."""

    dst: Path
    width: int
    height: int
    tiles: int
    tiles_computed: int
    seconds: float
    gsd_m: float | None
    device: str
    notes: list[str] = field(default_factory=list)


def _pad(tile: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad a tile clipped by a scene smaller than the tile back to ``size``."""
    _, h, w = tile.shape
    if h == size and w == size:
        return tile
    mode = "reflect" if h > 1 and w > 1 else "edge"
    while tile.shape[1] < size or tile.shape[2] < size:  # reflect can at most double per pass
        ph = min(size - tile.shape[1], tile.shape[1] - 1) if mode == "reflect" else size - tile.shape[1]
        pw = min(size - tile.shape[2], tile.shape[2] - 1) if mode == "reflect" else size - tile.shape[2]
        tile = np.pad(tile, ((0, 0), (0, ph), (0, pw)), mode=mode)
    return tile


def _tiles(scene: Scene, grid: TileGrid) -> Iterator[tuple[int, int, np.ndarray | None, np.ndarray]]:
    """(row, col, pixels or None when all-nodata, valid mask) in row-major order."""
    for r, y in enumerate(grid.ys):
        for c, x in enumerate(grid.xs):
            h, w = grid.tile_shape(r, c)
            data, valid = scene.read(Window(x, y, w, h))
            yield r, c, (_pad(data, grid.tile) if valid.any() else None), valid


def _process(pending, engine: InferenceEngine, blender: RowBlender, tile_done: Callable[[int], None]) -> int:
    """Run the model on the pending tiles that have data, blend all of them in order; returns tiles run."""
    tiles = [t for _, _, t, _ in pending if t is not None]
    outputs = iter(engine(np.stack(tiles))) if tiles else iter(())
    for r, c, tile, valid in pending:
        if tile is None:
            blender.mark_empty(r, c)
        else:
            blender.add(r, c, next(outputs), valid)
        tile_done(r)
    return len(tiles)


def translate(
    src: str | Path,
    dst: str | Path,
    *,
    weights: str | Path | None = None,
    resolution: str | float = "model",
    tile_size: int = 256,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 8,
    device: str = "auto",
    bands: list[int] | None = None,
    cog: bool = False,
    overwrite: bool = False,
    allow_ungeoreferenced: bool = False,
    progress: Callable[[int, int], None] | None = None,
    model: tuple[torch.nn.Module, ModelSpec] | None = None,
) -> TranslateResult:
    """Translate the GeoTIFF ``src`` into a map GeoTIFF at ``dst``; see ``geosat2map translate --help``.

    ``model`` passes an already loaded (generator, spec) pair, to translate many scenes without
    reloading. ``progress(advance, total)`` is called as tiles finish.
    """
    src, dst = Path(src), Path(dst)
    if tile_size % 256 or tile_size <= 0:
        raise InputError(f"tile size must be a multiple of 256 (the U-Net halves it 8 times), not {tile_size}")
    if not 0 <= overlap <= tile_size // 2:
        raise InputError(f"overlap must be between 0 and {tile_size // 2} pixels, not {overlap}")
    if batch_size < 1:
        raise InputError("batch size must be at least 1")
    check_destination(dst, src, overwrite)
    net, spec = model if model is not None else load_generator(weights)
    torch_device = resolve_device(device)
    started = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        return _run(src, dst, net, spec, torch_device, started, bands=bands, resolution=resolution,
                    tile_size=tile_size, overlap=overlap, batch_size=batch_size, cog=cog,
                    allow_ungeoreferenced=allow_ungeoreferenced, progress=progress)


def _run(src, dst, net, spec, torch_device, started, *, bands, resolution, tile_size, overlap, batch_size, cog,
         allow_ungeoreferenced, progress) -> TranslateResult:
    scene = open_scene(src, bands, resolution, spec.gsd_m, allow_ungeoreferenced)
    try:
        if len(scene.bands) != spec.in_channels:
            raise WeightsError(
                f"the model takes {spec.in_channels} bands but {len(scene.bands)} were selected (--bands)"
            )
        engine = InferenceEngine(net, torch_device)
        grid = TileGrid(scene.width, scene.height, tile_size, overlap)
        blender = RowBlender(grid)
        done_rows = 0
        row_left = [len(grid.xs)] * len(grid.ys)

        def tile_done(row: int) -> None:
            nonlocal done_rows
            row_left[row] -= 1
            while done_rows < len(grid.ys) and row_left[done_rows] == 0:
                blender.flush(done_rows, writer.write_rows)
                done_rows += 1
            if progress:
                progress(1, len(grid))

        computed = 0
        with GeoTIFFWriter(dst, scene.width, scene.height, scene.crs, scene.transform, cog=cog) as writer:
            pending: list[tuple[int, int, np.ndarray | None, np.ndarray]] = []
            real = 0  # pending tiles with data
            for item in _tiles(scene, grid):
                pending.append(item)
                real += item[2] is not None
                # Run when the batch is full; also when nothing real waits or the pending tiles
                # span three tile rows, so all-nodata stretches never hold rows in memory.
                if real >= batch_size or real == 0 or pending[-1][0] - pending[0][0] >= 2:
                    computed += _process(pending, engine, blender, tile_done)
                    pending, real = [], 0
            computed += _process(pending, engine, blender, tile_done)
            if computed == 0:
                raise InputError(f"{src} has no valid pixels: everything is nodata")
            blender.release()  # the overviews are built next: no blending buffers held meanwhile
            writer.commit()
    finally:
        scene.close()
    return TranslateResult(dst, scene.width, scene.height, len(grid), computed,
                           time.perf_counter() - started, scene.gsd_m, str(torch_device), scene.notes)
