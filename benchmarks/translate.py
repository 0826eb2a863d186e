"""End-to-end translate throughput against model-only throughput, and peak memory by scene size.

    python benchmarks/translate.py [--sizes 2048,8192,16384] [--scene sample|noise]
                                   [--resolution native|model] [--backend auto|torch|compiled|onnxruntime]
                                   [--precision auto|fp32|bf16|int8] [--malloc retain|default]
                                   [--device cpu|cuda|mps|auto] [--repeat 3] [--tta none|flip|median]

For each size a uint8 RGB GeoTIFF (tiled, ZSTD, 0.5 m pixels) is written to a temporary folder.
``--scene sample`` (default) mirrors the real aerial scene in sample_data/ to the size, so it
compresses and translates like imagery; ``noise`` is random texture, the worst case for
compression. ``--resolution native`` translates every pixel; ``model`` resamples to the model's
ground sampling distance, as translate does by default (fewer tiles, each read from about 18
times as many source pixels).

A child process loads the model once, picks the engine (--backend and --precision; auto: the
fastest of PyTorch fp32, ONNX Runtime and, where the CPU multiplies bf16, PyTorch bf16), and then
alternates: the model alone on random tiles (same engine, batch size and number of tiles, capped
by --model-tiles), translate into a new file (its own clock: open, read, infer, blend, write,
overviews, rename), the model alone, ... ``--repeat`` translate runs (default 3). Each
side's best is reported with its range; the ratio is the median over translate runs of each run
against the mean of the model-only runs on either side of it, because these machines' speed
drifts by 10-20 % over minutes (a best-against-best ratio moved by as much between runs). The
in-run ratio is the time of the model's own calls inside each translate over the translate's
time (median over runs; CPU engines only): the share of the run the model had, which the drift
between runs does not move. Peak RSS is the child's. ``--tta`` runs translate's test-time
augmentation on both sides (flip: 2 passes a tile, median: 18 and their per-pixel median, whose
time counts as the model's); GFLOP/s counts the passes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window


def gflop_per_tile(weights: str | None) -> float:
    """FLOPs of one 256 x 256 forward pass (counted here, not in the child whose memory is measured)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from geosat2map.weights import load_generator

    model, _ = load_generator(weights)
    with torch.inference_mode(), FlopCounterMode(display=False) as flops:
        model(torch.zeros(1, 3, 256, 256))
    return flops.get_total_flops() / 1e9

def export_first(weights: str | None, backend: str, precision: str) -> None:
    """Make the ONNX export translate would make on its first run, here in the parent, so that no
    child's peak RSS includes exporting (about 200 MB more for the first scene otherwise). For
    int8 that is the rewritten model quantization starts from; calibrating and quantizing, done
    for each new scene, stay in the child."""
    from geosat2map.engine import cache_dir, engine_onnx, onnx_available
    from geosat2map.quantize import FP32_LEVELS, _prepared_onnx
    from geosat2map.weights import load_generator

    if backend != "torch" and onnx_available():
        model, spec = load_generator(weights)
        if precision == "int8":
            _prepared_onnx(model, (spec.in_channels, 256, 256), cache_dir(), FP32_LEVELS)
        else:
            engine_onnx(model, spec.in_channels, 256)


CHILD = """
import json, resource, sys, time
from pathlib import Path
import numpy as np, torch
from geosat2map import load_generator, translate
from geosat2map.devices import resolve_device
from geosat2map.engine import auto_batch_size, engine_choice, make_engine
from geosat2map.model import tta_name, with_tta
from geosat2map.grid import TileGrid
from geosat2map.pipeline import _calibration_tiles
from geosat2map.reader import open_scene
src, dst, weights, batch, cap, backend, precision, resolution, repeat, device, malloc, tta = sys.argv[1:13]
tta = None if tta == "none" else tta_name(tta)
if malloc == "retain":  # as the CLI's translate does
    from geosat2map.allocator import retain_freed_memory
    retain_freed_memory()
cap, repeat = int(cap), int(repeat)
model = load_generator(None if weights == "default" else weights)
model = (with_tta(model[0], tta), model[1])  # translate wraps it no further
scene = open_scene(src, None, resolution, model[1].gsd_m)
grid = TileGrid(scene.width, scene.height)
tiles = min(cap, len(grid))
# int8: the model translate will quantize for this scene, calibrated on the same tiles (then cached)
calibration = _calibration_tiles(scene, grid) if precision == "int8" else None
scene.close()
batch = int(batch) or auto_batch_size(model[0], resolve_device(device),  # 0: translate's
                                      precision="fp32" if precision == "int8" else precision)
start = time.perf_counter()
engine = make_engine(model[0], resolve_device(device), backend, precision, batch_size=batch, calibration=calibration)
made = time.perf_counter() - start
backend, precision = engine_choice(engine.name)  # translate runs the engine auto picked here
x = np.random.default_rng(0).uniform(0, 255, (batch, 3, 256, 256)).astype(np.float32)
engine(x)  # warm-up
# The model's calls inside each translate, timed there: a CPU engine's submit returns once the
# batch is computed (a GPU's returns at once: no figure there).
calls = [0.0]
def timed(submit):
    def wrapper(self, tiles):
        start = time.perf_counter()
        try:
            return submit(self, tiles)
        finally:
            calls[0] += time.perf_counter() - start
    return wrapper
# The outermost engine's class only: the median's engine calls its inner engine's submit itself.
type(engine).submit = timed(type(engine).submit)

def model_only():
    done, start = 0, time.perf_counter()
    while done < tiles:
        engine(x[: min(batch, tiles - done)])
        done += min(batch, tiles - done)
    return done / (time.perf_counter() - start)

model_rates, seconds, in_model = [model_only()], [], []
for _ in range(repeat):  # interleaved, so a slow spell of the machine shows in both
    # A fresh output, as for a user's new map: replacing the last run's file made the kernel free
    # it inside translate's clock (0.28 s of a 2 s host-side profile at 8192 x 8192).
    Path(dst).unlink(missing_ok=True)
    calls[0] = 0.0
    r = translate(src, dst, model=model, resolution=resolution, batch_size=batch, device=device, overwrite=True,
                  backend=backend, precision=precision, tta=tta)
    seconds.append(r.seconds)
    in_model.append(None if engine.asynchronous else calls[0])
    model_rates.append(model_only())
print(json.dumps({"seconds": seconds, "in_model": in_model, "width": r.width, "all_tiles": r.tiles,
                  "tiles": r.tiles_computed, "model": model_rates, "backend": r.backend, "batch": batch, "made_s": made,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "vegas_spacenet_rgb.tif"


def _mirrored(n: int, period: int) -> np.ndarray:
    """Indices 0..n-1 folded back and forth over ``period`` (an image mirrored at its edges, no seams)."""
    i = np.arange(n) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def make_scene(path: Path, size: int, kind: str = "sample") -> None:
    """A ``size`` x ``size`` scene written block row by block row (the benchmark must not hold it all)."""
    if kind == "sample":
        with rasterio.open(SAMPLE) as s:
            image = s.read([1, 2, 3])
    else:
        image = np.random.default_rng(0).integers(0, 255, (3, 256, 256), dtype=np.uint8)
    cols = _mirrored(size, image.shape[2])
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4500000, 0.5, 0.5), tiled=True,
                       blockxsize=256, blockysize=256, compress="zstd", photometric="RGB") as dst:
        for y in range(0, size, 256):
            height = min(256, size - y)  # the last block row of a size that is no multiple of 256
            rows = _mirrored(y + height, image.shape[1])[y:]
            band = image[:, rows][:, :, cols]
            if kind == "noise":  # shift each block row so the texture does not repeat vertically
                band = np.roll(band, y // 256 * 7, axis=2)
            dst.write(band, window=Window(0, y, size, height))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,8192,16384")
    parser.add_argument("--weights", default=None, help="default: the shipped model")
    parser.add_argument("--batch-size", type=int, default=0, help="default: translate's (8 on the CPU, 16 in bf16)")
    parser.add_argument("--model-tiles", type=int, default=512)
    parser.add_argument("--backend", default="auto",
                        help="auto, torch, compiled or onnxruntime (both sides use the same)")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or int8 (as translate --precision)")
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="retain: glibc keeps freed memory, as the CLI's translate sets it "
                             "(geosat2map.allocator); default: glibc's own thresholds")
    parser.add_argument("--scene", choices=["sample", "noise"], default="sample")
    parser.add_argument("--resolution", choices=["native", "model"], default="native")
    parser.add_argument("--repeat", type=int, default=3, help="translate runs per scene")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (as translate --device)")
    parser.add_argument("--tta", choices=["none", "flip", "median"], default="none",
                        help="translate's test-time augmentation, on both sides (--tta, --tta-median)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"batch {args.batch_size or 'as translate'}, device {args.device}, {args.scene} scene, "
          f"{args.resolution} resolution, "
          f"{args.malloc} malloc, test-time augmentation {args.tta}")
    export_first(args.weights, args.backend, args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for size in sizes:
            src = Path(tmp) / f"scene{size}.tif"
            make_scene(src, size, args.scene)
            cmd = [sys.executable, "-c", CHILD, str(src), str(Path(tmp) / "out.tif"), args.weights or "default",
                   str(args.batch_size), str(args.model_tiles), args.backend, args.precision, args.resolution,
                   str(args.repeat), args.device, args.malloc, args.tta]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((size, result["all_tiles"], result))
            src.unlink()
    gflop = gflop_per_tile(args.weights) * {"none": 1, "flip": 2, "median": 18}[args.tta]
    print(f"generator: {gflop:.2f} GFLOP per 256 x 256 tile, all its passes (2 FLOP per multiply-add, whatever the "
          f"precision); engine "
          f"{', '.join(sorted({r['backend'] for _, _, r in rows}))}, batch "
          f"{', '.join(sorted({str(r['batch']) for _, _, r in rows}))}")
    print(f"{'scene':>13} {'output':>6} {'tiles':>6} {'model-only t/s (range)':>24} {'GFLOP/s':>8} "
          f"{'end-to-end t/s (range)':>24} {'ratio (range)':>18} {'in-run (range)':>16} {'wall s':>7} "
          f"{'peak RSS MB':>12}")
    for size, tiles, r in rows:
        mo, e2e = max(r["model"]), r["tiles"] / min(r["seconds"])
        mo_range = f"{mo:.1f} ({min(r['model']):.1f}-{mo:.1f})"
        e2e_range = f"{e2e:.1f} ({r['tiles'] / max(r['seconds']):.1f}-{e2e:.1f})"
        # Each translate run against the model-only runs just before and after it: a slow or fast
        # spell of the machine then shows on both sides of the ratio.
        ratios = [r["tiles"] / s / ((a + b) / 2) for s, a, b in zip(r["seconds"], r["model"], r["model"][1:])]
        ratio = f"{np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        # The model's own calls inside each run against the run: the same ratio, free of the
        # machine's drift between runs (host work alone separates the two).
        inside = [m / s for m, s in zip(r["in_model"], r["seconds"]) if m is not None]
        in_run = f"{np.median(inside):.3f} ({min(inside):.3f}-{max(inside):.3f})" if inside else "n/a"
        print(f"{size:>5} x {size:<5} {r['width']:>6} {tiles:>6} {mo_range:>24} {mo * gflop:>8.0f} {e2e_range:>24} "
              f"{ratio:>18} {in_run:>16} {min(r['seconds']):>7.1f} {r['peak_rss_mb']:>12.0f}")
    if args.precision == "int8":
        print("int8 engine made (calibration on the scene's tiles and quantization) in "
              + ", ".join(f"{r['made_s']:.1f} s" for _, _, r in rows))
    if len(rows) > 1:
        ratio = rows[-1][2]["peak_rss_mb"] / rows[0][2]["peak_rss_mb"]
        print(f"peak RSS {rows[-1][0]} vs {rows[0][0]}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
