"""int8 inference through ONNX Runtime: its speed against translate's fp32 engine, and its cost.

    python benchmarks/int8.py [--weights W] [--calibration held-out|DATA_OR_SCENE] [--tiles 8]
        [--method percentile|minmax] [--fp32-levels 2] [--score ../shared/data/maps_train]

Quantizes as ``translate --precision int8`` does (geosat2map.quantize: the sub-pixel rewrite of
the transposed convolutions, static QDQ quantization, the first level and the last
``--fp32-levels`` decoder levels in fp32), with the calibration tiles, range method and fp32
levels open to measurement. Calibration tiles: ``held-out``, ``--tiles`` of the pairs scored,
spread over them (what translate does with a scene's own tiles); the training split of a pix2pix
aligned folder (resized to 256); or windows spread over a GeoTIFF scene. Times the fp32 and int8
engines alternately on one batch; ``--score``: paired differences on that folder's held-out pairs
(every 10th), int8 against fp32. Needs the onnx extra.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from geosat2map import datasets, metrics
from geosat2map.engine import OnnxRuntimeEngine, engine_onnx
from geosat2map.evaluate import engine_metrics
from geosat2map.quantize import CALIBRATION_TILES, FP32_LEVELS, RANGES, calibration_picks, quantized_onnx
from geosat2map.weights import load_generator

ROOT = Path(__file__).resolve().parents[1]


def held_out(data: str) -> datasets.PairDataset:
    """An aligned folder's held-out pairs at 256 x 256, as evaluate scores them."""
    pairs, names = datasets.load_pairs(data, "val")
    return datasets.PairDataset(pairs, names, 256, 256, augment=False)


def calibration_tiles(source: str, count: int, score: str | None) -> np.ndarray:
    """``count`` (N, 3, 256, 256) float32 tiles, 0..255, from ``source`` (see the module's help)."""
    if source == "held-out":
        if not score:
            raise SystemExit("--calibration held-out takes its tiles from the --score folder")
        pairs = held_out(score)  # spread over them as translate spreads its picks over a scene
        return np.stack([datasets.from_model_range(pairs[i][0]).numpy()
                         for _, i in calibration_picks(1, len(pairs), count)])
    if Path(source).is_dir():
        pairs, _ = datasets.load_pairs(source, "train")
        picks = np.random.default_rng(0).choice(len(pairs), count, replace=False)
        return np.stack([datasets._resize(torch.from_numpy(pairs[i][0]), 256).float().numpy() for i in picks])
    with rasterio.open(source) as src:
        cols, rows = max(1, (src.width - 256) // 256 + 1), max(1, (src.height - 256) // 256 + 1)
        spots = [(c * 256, r * 256) for r in range(rows) for c in range(cols)]
        spots = [spots[i] for i in np.linspace(0, len(spots) - 1, min(count, len(spots))).astype(int)]
        return np.stack([src.read([1, 2, 3], window=Window(x, y, 256, 256), boundless=True).astype(np.float32)
                         for x, y in spots])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="default: the shipped model")
    parser.add_argument("--calibration", default="held-out")
    parser.add_argument("--tiles", type=int, default=CALIBRATION_TILES)
    parser.add_argument("--method", choices=["minmax", "percentile"], default=RANGES)
    parser.add_argument("--fp32-levels", type=int, default=FP32_LEVELS, help="last decoder levels kept in fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--score", default=None, help="aligned folder whose held-out pairs to score")
    args = parser.parse_args()
    model, _ = load_generator(args.weights)
    tiles = calibration_tiles(args.calibration, args.tiles, args.score)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        quantized_onnx(model, tiles[:1], Path(tmp), fp32_levels=args.fp32_levels)  # once per weights in translate
        prepared = time.perf_counter()
        int8_path = quantized_onnx(model, tiles, Path(tmp), fp32_levels=args.fp32_levels, method=args.method)
        done = time.perf_counter()
        print(f"export and preparation {prepared - start:.1f} s (once per weights), calibration ({len(tiles)} "
              f"tiles, {args.method}) and quantization {done - prepared:.1f} s")
        # translate's ONNX Runtime engine (its session options) for both
        engines = {"fp32": OnnxRuntimeEngine(engine_onnx(model, 3, 256)), "int8": OnnxRuntimeEngine(int8_path)}
        batch = np.random.default_rng(0).uniform(0, 255, (args.batch_size, 3, 256, 256)).astype(np.float32)
        best = dict.fromkeys(engines, float("inf"))
        for engine in engines.values():
            engine(batch)  # warm-up
        for _ in range(args.repeat):  # alternating, so both see the same drift of the machine
            for name, engine in engines.items():
                t = time.perf_counter()
                engine(batch)
                best[name] = min(best[name], time.perf_counter() - t)
        rates = {name: args.batch_size / seconds for name, seconds in best.items()}
        print(f"model only, batch {args.batch_size} (best of {args.repeat}): fp32 {rates['fp32']:.1f} tiles/s, "
              f"int8 {rates['int8']:.1f} tiles/s ({rates['int8'] / rates['fp32']:.2f}x)")
        if args.score:
            pairs = held_out(args.score)
            diff = metrics.paired_differences(engine_metrics(engines["int8"], pairs),
                                              engine_metrics(engines["fp32"], pairs))
            print("held-out, int8 minus fp32: " + "  ".join(
                f"{k} {v['mean']:+.4f} +- {v['se']:.4f}" for k, v in diff.items()))


if __name__ == "__main__":
    main()
