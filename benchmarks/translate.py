"""End-to-end translate throughput against model-only throughput, and peak memory by scene size.

    python benchmarks/translate.py [--sizes 2048,8192,16384] [--weights W] [--batch-size 8]

For each size a synthetic uint8 RGB GeoTIFF (tiled, ZSTD) is written to a temporary folder and
translated at native resolution in a child process, which reports its wall time and peak RSS.
Model-only throughput runs the same generator on the same number of random tiles (capped by
--model-tiles) with the same batch size, with no reading, blending or writing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from geosat2map.engine import InferenceEngine
from geosat2map.grid import TileGrid
from geosat2map.weights import load_generator

CHILD = """
import json, resource, sys, time
from geosat2map import translate
src, dst, weights, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t = time.perf_counter()
r = translate(src, dst, weights=None if weights == "default" else weights, resolution="native",
              batch_size=batch, device="cpu", overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t, "tiles": r.tiles_computed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_scene(path: Path, size: int) -> None:
    """A textured scene written block row by block row (the benchmark itself must not hold it all)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (3, 256, 256), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4500000, 0.5, 0.5), tiled=True,
                       blockxsize=256, blockysize=256, compress="zstd", photometric="RGB") as dst:
        row = np.tile(base, (1, 1, size // 256))
        for y in range(0, size, 256):
            dst.write(np.roll(row, y // 256 * 7, axis=2), window=Window(0, y, size, 256))


def model_only(weights: str | None, tiles: int, batch: int) -> float:
    """Tiles per second of the generator alone on random float32 tiles."""
    model, _ = load_generator(weights)
    engine = InferenceEngine(model, torch.device("cpu"))
    x = np.random.default_rng(0).uniform(0, 255, (batch, 3, 256, 256)).astype(np.float32)
    engine(x)  # warm-up
    done, start = 0, time.perf_counter()
    while done < tiles:
        engine(x[: min(batch, tiles - done)])
        done += min(batch, tiles - done)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,8192,16384")
    parser.add_argument("--weights", default=None, help="default: the shipped model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model-tiles", type=int, default=512)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for size in sizes:
            src = Path(tmp) / f"scene{size}.tif"
            make_scene(src, size)
            tiles = len(TileGrid(size, size))
            mo = model_only(args.weights, min(tiles, args.model_tiles), args.batch_size)
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(src), str(Path(tmp) / "out.tif"), args.weights or "default",
                 str(args.batch_size)], capture_output=True, text=True, check=True)
            e2e = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((size, tiles, mo, e2e["tiles"] / e2e["seconds"], e2e["seconds"], e2e["peak_rss_mb"]))
            src.unlink()
    print(f"{'scene':>12} {'tiles':>6} {'model-only t/s':>15} {'end-to-end t/s':>15} {'ratio':>6} {'wall s':>7} "
          f"{'peak RSS MB':>12}")
    for size, tiles, mo, e2e, secs, rss in rows:
        print(f"{size:>5} x {size:<5} {tiles:>6} {mo:>15.1f} {e2e:>15.1f} {e2e / mo:>6.2f} {secs:>7.1f} {rss:>12.0f}")
    if len(rows) > 1:
        print(f"peak RSS {rows[-1][0]} vs {rows[0][0]}: {rows[-1][5] / rows[0][5]:.2f}x")


if __name__ == "__main__":
    main()
