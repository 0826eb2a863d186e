"""Exporting the generator to ONNX for the Deepness QGIS plugin (and any ONNX Runtime user).

Deepness feeds a model tiles of ``tile_size`` pixels scaled to 0..1 and standardised with the
``standardization_mean``/``standardization_std`` it reads from the model's metadata, at the
``resolution`` (cm/pixel) the metadata names; its "Superresolution" model type (the one that
returns an image, with ``scale_factor`` 1 here) takes the output as 0..1 and multiplies it by
``output_scaling``. So the exported graph is the generator plus one affine step: mean and std
0.5 turn 0..1 input into the -1..1 the generator was trained on, and its tanh output is mapped
to 0..1. Batch size is fixed at 1, as Deepness requires for image outputs.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import OutputError, WeightsError
from .weights import ModelSpec, load_generator
from .writer import ONNX, check_destination


class _ZeroOneOutput(nn.Module):
    """The generator with its tanh output mapped to 0..1 (Deepness' image convention)."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.generator(x) + 1.0) * 0.5


def export_proto(module: nn.Module, example: torch.Tensor, input_name: str, output_name: str,
                 dynamic_batch: bool = False):
    """``module`` as an ONNX ModelProto: torch's dynamo exporter, opset 18, its log notes (e.g. the
    torchvision ops it skips) and deprecation warnings kept from the user."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=[output_name],
                                        opset_version=18, dynamo=True, verbose=False, dynamic_shapes=shapes)
    finally:
        exporter_log.setLevel(level)
    return program.model_proto


def deepness_metadata(spec: ModelSpec, tile_size: int, overlap: int) -> dict[str, object]:
    """The metadata keys Deepness reads (values JSON-encoded, as it parses them)."""
    meta: dict[str, object] = {
        "model_type": "Superresolution",
        "tile_size": tile_size,
        "tiles_overlap": round(100 * overlap / tile_size),  # percent of the tile
        "standardization_mean": [0.5] * spec.in_channels,
        "standardization_std": [0.5] * spec.in_channels,
        "scale_factor": 1,
        "output_scaling": 255.0,
        "geosat2map": {"ngf": spec.ngf, "gsd_m": spec.gsd_m, "in_channels": spec.in_channels,
                       "provenance": spec.provenance},
    }
    if spec.gsd_m:
        meta["resolution"] = round(spec.gsd_m * 100, 3)  # cm per pixel
    return meta


def export_onnx(
    weights: str | Path | None,
    dst: str | Path,
    *,
    tile_size: int = 256,
    overlap: int = 64,
    overwrite: bool = False,
) -> dict[str, object]:
    """Write ``weights`` (None: the default model) as an ONNX model at ``dst``; returns its metadata."""
    try:
        import onnx
    except ImportError:
        raise WeightsError("ONNX export needs the onnx extra: pip install 'geosat2map[onnx]'") from None
    dst = Path(dst)
    check_destination(dst, None, overwrite, ONNX)
    if tile_size % 256 or tile_size <= 0:
        raise WeightsError(f"tile size must be a multiple of 256, not {tile_size}")
    if not 0 <= overlap <= tile_size // 2:  # as translate: beyond half a tile, tiles overlap thrice
        raise WeightsError(f"overlap must be between 0 and {tile_size // 2} pixels, not {overlap}")
    model, spec = load_generator(weights)
    example = torch.zeros(1, spec.in_channels, tile_size, tile_size)
    proto = export_proto(_ZeroOneOutput(model.float().eval()), example, "image", "map")
    meta = deepness_metadata(spec, tile_size, overlap)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    tmp = dst.with_name(f".{dst.name}.part")
    try:
        onnx.save_model(proto, str(tmp))
        tmp.replace(dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {dst}: {exc}") from None
    return meta


def onnx_matches_torch(weights: str | Path | None, onnx_path: str | Path, tiles: int = 2, seed: int = 0) -> float:
    """Largest absolute difference (0..1 output scale) between ONNX Runtime and torch on random tiles."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise WeightsError("checking the export needs onnxruntime: pip install 'geosat2map[onnx]'") from None
    model, spec = load_generator(weights)
    wrapped = _ZeroOneOutput(model.float().eval())
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[-1]
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(tiles):
        x = rng.uniform(-1, 1, (1, spec.in_channels, size, size)).astype(np.float32)
        (got,) = session.run(None, {"image": x})
        with torch.inference_mode():
            want = wrapped(torch.from_numpy(x)).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    return worst
