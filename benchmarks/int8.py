"""int8 inference through ONNX Runtime: its speed against translate's fp32 engine, and its cost.

    python benchmarks/int8.py [--weights W] [--calibration DATA_OR_SCENE] [--tiles 8]
        [--method percentile|minmax] [--fp32-levels 2] [--score ../shared/data/maps_train]

Measured in session 26 and not adopted (docs/performance.md): ranges calibrated on imagery unlike
the scene clip it, so translate would have to calibrate on each scene. This keeps the measurement
repeatable. ONNX Runtime has no int8 kernel for transposed convolutions, so each decoder level's
4x4 stride-2 transposed convolution (with its BatchNorm folded in) is first rewritten as the
2x2 convolution with four times the output channels that computes the same four output phases,
a pixel shuffle and a one-pixel crop; then every layer quantizes (static, QDQ, per-channel int8
weights, uint8 activations) except the first and the last ``--fp32-levels`` decoder levels with
their inputs. Calibration tiles: the training split of a pix2pix aligned folder (resized to 256)
or windows spread over a GeoTIFF scene. ``--score``: paired differences on that folder's held-out
pairs (every 10th), int8 against fp32. Needs the onnx extra.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import rasterio
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from rasterio.windows import Window
from torch import nn

from geosat2map import datasets, metrics
from geosat2map.engine import OnnxRuntimeEngine, _Scaled, engine_onnx
from geosat2map.onnx_export import export_proto
from geosat2map.weights import load_generator

ROOT = Path(__file__).resolve().parents[1]


class SubPixelUp(nn.Module):
    """``ConvTranspose2d(4, stride 2, padding 1)`` and the BatchNorm after it (eval mode) as one
    2x2 convolution: output pixel (2i + a, 2j + b) takes input rows and columns {i - 1, i} with
    kernel taps (3, 1) where a (b) is 0, and {i, i + 1} with taps (2, 0) where it is 1. With padding 1
    the convolution gives (H + 1) x (W + 1) positions; shuffled with phase 1 before phase 0, the
    result is the output shifted by one pixel, hence the crop."""

    def __init__(self, up: nn.ConvTranspose2d, bn: nn.BatchNorm2d | None) -> None:
        super().__init__()
        w = up.weight.detach()  # (in, out, 4, 4)
        bias = up.bias.detach() if up.bias is not None else torch.zeros(w.shape[1])
        if bn is not None:
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            w = w * scale[None, :, None, None]
            bias = bn.bias.detach() + (bias - bn.running_mean) * scale
        taps = ((2, 0), (3, 1))
        phases = [w[:, :, list(taps[a])][:, :, :, list(taps[b])].transpose(0, 1) for a in (0, 1) for b in (0, 1)]
        self.conv = nn.Conv2d(w.shape[0], 4 * w.shape[1], 2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.stack(phases, 1).flatten(0, 1))  # channel c * 4 + phase
            self.conv.bias.copy_(bias.repeat_interleave(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return F.pixel_shuffle(self.conv(x), 2)[:, :, 1 : 2 * h + 1, 1 : 2 * w + 1]


def subpixel(generator: nn.Module) -> nn.Module:
    """A copy of the U-Net generator with every decoder level's transposed convolution rewritten."""
    g = copy.deepcopy(generator).eval()
    for k, block in enumerate(g.decoder):
        layers, i = [], 0
        while i < len(block):
            if isinstance(block[i], nn.ConvTranspose2d):
                bn = block[i + 1] if i + 1 < len(block) and isinstance(block[i + 1], nn.BatchNorm2d) else None
                layers.append(SubPixelUp(block[i], bn))
                i += 2 if bn is not None else 1
            else:
                layers.append(block[i])
                i += 1
        g.decoder[k] = nn.Sequential(*layers)
    return g


def calibration_tiles(source: str, count: int) -> list[np.ndarray]:
    """``count`` (1, 3, 256, 256) float32 tiles, 0..255: training inputs of an aligned folder, or
    windows spread over a scene's first three bands."""
    if Path(source).is_dir():
        pairs, _ = datasets.load_pairs(source, "train")
        picks = np.random.default_rng(0).choice(len(pairs), count, replace=False)
        return [datasets._resize(torch.from_numpy(pairs[i][0]), 256)[None].float().numpy() for i in picks]
    with rasterio.open(source) as src:
        cols, rows = max(1, (src.width - 256) // 256 + 1), max(1, (src.height - 256) // 256 + 1)
        spots = [(c * 256, r * 256) for r in range(rows) for c in range(cols)]
        spots = [spots[i] for i in np.linspace(0, len(spots) - 1, min(count, len(spots))).astype(int)]
        return [src.read([1, 2, 3], window=Window(x, y, 256, 256), boundless=True)[None].astype(np.float32)
                for x, y in spots]


def quantize(model: nn.Module, tiles: list[np.ndarray], method: str, fp32_levels: int, folder: Path) -> Path:
    fp32, pre, out = folder / "subpixel.onnx", folder / "pre.onnx", folder / "int8.onnx"
    onnx.save_model(export_proto(_Scaled(subpixel(model)), torch.zeros(2, 3, 256, 256), "tiles", "maps",
                                 dynamic_batch=True), str(fp32))
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    nodes = onnx.load(str(pre), load_external_data=False).graph.node  # topologically sorted
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    keep = [nodes[convs[0]].name] + [n.name for n in nodes[convs[-fp32_levels - 1] + 1 :]]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter([{"tiles": t} for t in tiles])

        def get_next(self):
            return next(self.left, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                    calibrate_method={"percentile": CalibrationMethod.Percentile,
                                      "minmax": CalibrationMethod.MinMax}[method])
    return out


def scores(engine: OnnxRuntimeEngine, data: str) -> list[dict[str, float]]:
    pairs, names = datasets.load_pairs(data, "val")
    dataset = datasets.PairDataset(pairs, names, 256, 256, augment=False)
    per = []
    for i in range(len(dataset)):
        a, b = dataset[i]
        out = engine(datasets.from_model_range(a)[None].numpy())[0]
        per.append(metrics.image_metrics(torch.from_numpy(out).round(), datasets.from_model_range(b)))
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="default: the shipped model")
    parser.add_argument("--calibration", default=str(ROOT.parent / "shared/data/maps_train"))
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--method", choices=["percentile", "minmax"], default="percentile")
    parser.add_argument("--fp32-levels", type=int, default=2, help="last decoder levels kept in fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--score", default=None, help="aligned folder whose held-out pairs to score")
    args = parser.parse_args()
    model, _ = load_generator(args.weights)
    tiles = calibration_tiles(args.calibration, args.tiles)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        int8_path = quantize(model, tiles, args.method, args.fp32_levels, Path(tmp))
        print(f"export, calibration ({len(tiles)} tiles, {args.method}) and quantization: "
              f"{time.perf_counter() - start:.1f} s")
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
            diff = metrics.paired_differences(scores(engines["int8"], args.score), scores(engines["fp32"], args.score))
            print("held-out, int8 minus fp32: " + "  ".join(
                f"{k} {v['mean']:+.4f} +- {v['se']:.4f}" for k, v in diff.items()))


if __name__ == "__main__":
    main()
