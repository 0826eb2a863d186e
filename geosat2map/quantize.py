"""int8 inference: the generator quantized for ONNX Runtime, calibrated on the scene it translates.

Static quantization (QDQ: int8 weights per output channel, uint8 activations) needs each
activation's range, taken from calibration tiles. Ranges from imagery unlike the scene clip it:
on the maps pairs, min/max ranges from a NAIP scene's windows cost RMSE +0.03, from a Paris scene
+0.10, from a drone scene +0.15 (benchmarks/int8.py, docs/performance.md). So translate takes them
from ``CALIBRATION_TILES`` tiles of the scene itself, spread over it, as the 0.001-99.999
percentiles of each activation (``RANGES``): on the maps pairs calibrated on 4-16 of their own
tiles, RMSE +0.00 to +0.04 and acc@5 -0.0009 to -0.0013 against fp32; min/max ranges +0.04 to
+0.08 and -0.0018 to -0.0021.

ONNX Runtime has no int8 kernel for transposed convolutions; the decoder's are rewritten as
convolutions first (:func:`~geosat2map.model.subpixel_generator`), else half the model's work
stays fp32. The first encoder level and the last ``FP32_LEVELS`` decoder levels stay fp32: they
carry the image's own colours in and out, and quantized they cost the most accuracy for the least
work (every layer int8: 1.7x fp32's speed at RMSE +0.16; these kept: 1.2-1.5x at +0.02).

The quantized model is kept in the engine cache by the weights' digest and the calibration tiles'
digest: the same scene and options (a ``--resume``, the ranks of a torchrun) load the same file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cache import prune
from .model import PixelScaled, subpixel_generator
from .weights import model_digest

#: Scene tiles the activation ranges are taken from: fewer may miss a kind of ground the scene
#: has; the held-out pairs scored about alike with 4 to 16 (module docstring). The calibrator holds
#: every tile's activations at once: 8 tiles at width 48 raised a NAIP crop's peak memory by 600 MB.
CALIBRATION_TILES = 8
#: Decoder levels kept in fp32, counted from the output.
FP32_LEVELS = 2
#: How activation ranges are taken from the calibration tiles: "percentile" or "minmax".
RANGES = "percentile"


def calibration_picks(rows: int, cols: int, count: int = CALIBRATION_TILES) -> list[tuple[int, int]]:
    """``count`` (row, col) tile positions spread evenly over a ``rows`` x ``cols`` grid, in
    row-major order (fewer when the grid has fewer tiles)."""
    n = rows * cols
    picks = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    return [(int(i // cols), int(i % cols)) for i in picks]


def quantized_onnx(net: nn.Module, tiles: np.ndarray, cache: Path, *, fp32_levels: int = FP32_LEVELS,
                   method: str = RANGES) -> Path:
    """``net`` (a generator, or one inside :class:`~geosat2map.model.FlipAveraged`) as an int8 ONNX
    model taking and giving 0..255 pixels (:class:`~geosat2map.model.PixelScaled`), calibrated on
    ``tiles`` (N, C, T, T float32 0..255) by ``method``'s ranges (``percentile`` or ``minmax``); made
    once per weights, tiles and options, kept in ``cache`` (the ``KEPT_MODELS`` most recent)."""
    tiles = np.ascontiguousarray(tiles, np.float32)
    key = hashlib.sha256(tiles.tobytes() + repr((tiles.shape, fp32_levels, method)).encode()).hexdigest()[:16]
    path = cache / f"int8-{model_digest(net)[:32]}-{key}.onnx"
    if path.exists():
        path.touch()  # recently used: kept by the pruning
        return path
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    prepared, fp32_nodes = _prepared_onnx(net, tiles.shape[1:], cache, fp32_levels)

    class Tiles(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter([{"tiles": tile[None]} for tile in tiles])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.left, None)

    with tempfile.TemporaryDirectory(dir=cache) as tmp, contextlib.redirect_stdout(io.StringIO()):
        out = Path(tmp) / "int8.onnx"  # (the percentile calibrator prints its progress: kept from the user)
        quantize_static(str(prepared), str(out), Tiles(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=fp32_nodes, calibrate_method={
                            "minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method])
        os.replace(out, path)
    prune(cache, "int8-*.onnx", KEPT_MODELS)
    return path


#: int8 models kept in the cache (each about the size of the fp32 model): one per scene translated.
KEPT_MODELS = 4


def _prepared_onnx(net: nn.Module, shape: tuple[int, ...], cache: Path, fp32_levels: int) -> tuple[Path, list[str]]:
    """The rewritten model exported to ONNX and prepared for quantization (shape inference,
    fusions), made once per weights (the export takes most of the time: about 9 s of 13 here),
    and the names of its nodes that stay fp32: everything up to the first convolution and after
    the last int8 decoder level's (the last ``fp32_levels`` levels are fp32)."""
    import onnx  # about a second to import: only when quantizing

    path = cache / f"subpixel-{model_digest(net)[:32]}-{'x'.join(map(str, shape))}.onnx"
    nodes = None  # the model's, topologically sorted
    if path.exists():
        try:
            nodes = onnx.load(str(path)).graph.node
        except Exception:  # damaged (protobuf's DecodeError, onnx's own errors): made again
            path.unlink()
    if nodes is None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from .onnx_export import export_proto

        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            fp32, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
            module = PixelScaled(subpixel_generator(net)).cpu()
            onnx.save_model(export_proto(module, torch.zeros(2, *shape), "tiles", "maps", dynamic_batch=True), fp32)
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            os.replace(prepared, path)
        nodes = onnx.load(str(path)).graph.node
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    return path, [node.name for node in nodes[: convs[0] + 1] + nodes[convs[-fp32_levels - 1] + 1 :]]
