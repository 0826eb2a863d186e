"""Streaming translate against an in-memory tiled baseline: same model, scene, tile size and overlap.

    pip install tiler   # benchmark-only dependency
    python benchmarks/baseline.py [--size 8192] [--weights W] [--batch-size 8] [--precision auto]

The baseline is what a notebook would do with the `tiler` package: read the whole scene into
memory, cut it into overlapping 256-pixel tiles (reflect padding), run the generator in batches,
merge with tiler's Hann window, and write the same GeoTIFF (tiled, ZSTD level 1, predictor 2,
overviews). Both sides run the generator with PyTorch at the same precision (--precision: auto is
bf16 where the CPU multiplies it, as translate's) and both have glibc keep freed memory as the
CLI's translate does (geosat2map.allocator). Each side runs in its own child process, which
reports wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from translate import make_scene  # noqa: E402  (the sample-based scene of benchmarks/translate.py)

STREAMING = """
import json, resource, sys, time
from geosat2map import load_generator, translate
from geosat2map.allocator import retain_freed_memory
src, dst, weights, batch, overlap, precision = sys.argv[1:7]
batch, overlap = int(batch), int(overlap)
retain_freed_memory()
model = load_generator(None if weights == "default" else weights)
t = time.perf_counter()
r = translate(src, dst, model=model, resolution="native", batch_size=batch, overlap=overlap, device="cpu",
              overwrite=True, backend="torch", precision=precision)  # the baseline's engine too
print(json.dumps({"seconds": time.perf_counter() - t, "tiles": r.tiles_computed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

IN_MEMORY = """
import json, resource, sys, time
import numpy as np, rasterio, torch
from rasterio.enums import Resampling
from tiler import Merger, Tiler
from geosat2map import load_generator
from geosat2map.allocator import retain_freed_memory
from geosat2map.devices import use_bf16
from geosat2map.engine import InferenceEngine
from geosat2map.writer import overview_factors
src, dst, weights, batch, overlap, precision = sys.argv[1:7]
batch, overlap = int(batch), int(overlap)
retain_freed_memory()
model, _ = load_generator(None if weights == "default" else weights)
engine = InferenceEngine(model, torch.device("cpu"), use_bf16(precision, torch.device("cpu")))
t = time.perf_counter()
with rasterio.open(src) as ds:
    image = ds.read()
    profile = ds.profile
tiler = Tiler(data_shape=image.shape, tile_shape=(3, 256, 256), overlap=overlap, channel_dimension=0, mode="reflect")
new_shape, padding = tiler.calculate_padding()  # pad so tiles cover the scene with the overlap asked for
tiler.recalculate(data_shape=new_shape)
padded = np.pad(image, padding, mode="reflect")
merger = Merger(tiler=tiler, window="hann")
tiles = 0
for batch_id, tiles_batch in tiler(padded, batch_size=batch):
    merger.add_batch(batch_id, batch, engine(tiles_batch.astype(np.float32)))
    tiles += len(tiles_batch)
out = merger.merge(extra_padding=padding, dtype=np.float32)
out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
profile.update(driver="GTiff", count=3, dtype="uint8", tiled=True, blockxsize=256, blockysize=256, compress="zstd",
               zstd_level=1, predictor=2, photometric="RGB", interleave="pixel")
with rasterio.open(dst, "w", **profile) as o:
    o.write(out)
    o.build_overviews(overview_factors(o.width, o.height), Resampling.average)
print(json.dumps({"seconds": time.perf_counter() - t, "tiles": tiles,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--weights", default=None, help="default: the shipped model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "scene.tif"
        make_scene(src, args.size)
        for name, code in (("streaming (geosat2map)", STREAMING), ("in-memory (tiler)", IN_MEMORY)):
            cmd = [sys.executable, "-c", code, str(src), str(Path(tmp) / "out.tif"), args.weights or "default",
                   str(args.batch_size), str(args.overlap), args.precision]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed: {proc.stderr[-2000:]}")
            rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{args.size} x {args.size}, overlap {args.overlap}, batch {args.batch_size}, CPU, "
          f"precision {args.precision}")
    print(f"{'':>24} {'tiles':>6} {'seconds':>8} {'tiles/s':>8} {'peak RSS MB':>12}")
    for name, r in rows.items():
        rate = r['tiles'] / r['seconds']
        print(f"{name:>24} {r['tiles']:>6} {r['seconds']:>8.1f} {rate:>8.1f} {r['peak_rss_mb']:>12.0f}")
    ours, base = rows["streaming (geosat2map)"], rows["in-memory (tiler)"]
    print(f"speed (time ratio baseline/streaming): {base['seconds'] / ours['seconds']:.2f}x; "
          f"peak memory streaming/baseline: {ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
