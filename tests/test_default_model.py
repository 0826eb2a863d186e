"""The shipped default model: real, small, self-describing, and usable with no --weights."""

from __future__ import annotations

import pytest
import rasterio
from safetensors import safe_open

from geosat2map import translate
from geosat2map.weights import default_weights_path, load_generator, read_spec

from .conftest import SAMPLE_SCENE

try:
    DEFAULT = default_weights_path()
except Exception:  # noqa: BLE001 - absence is what the skip reports
    DEFAULT = None

pytestmark = pytest.mark.skipif(DEFAULT is None, reason="no default model shipped in geosat2map/weights/")


def test_default_weights_are_fp16_small_and_describe_themselves():
    assert DEFAULT.stat().st_size <= 32 * 2**20
    spec = read_spec(DEFAULT)
    assert spec.gsd_m == pytest.approx(2.12)
    assert spec.provenance.get("recipe") == "pix2pix" and spec.provenance.get("val")
    with safe_open(str(DEFAULT), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if "num_batches" not in k}
    assert {str(d) for d in dtypes} == {"torch.float16"}
    model, _ = load_generator()
    assert not model.training and next(model.parameters()).dtype.is_floating_point


def test_translate_without_weights_uses_the_default_model(tmp_path):
    out = tmp_path / "map.tif"
    result = translate(SAMPLE_SCENE, out)
    assert result.gsd_m == pytest.approx(2.12, rel=0.02)
    with rasterio.open(out) as dst:
        pixels = dst.read(masked=True)
    # A map, not noise: mostly the light map palette.
    assert pixels.mean() > 150
