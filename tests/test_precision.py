"""bf16: where it is used, and that its maps stay close to fp32's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

import geosat2map.engine as engine
from geosat2map import translate
from geosat2map.devices import native_bf16, use_bf16
from geosat2map.engine import AUTO_MIN_TILES, make_engine, onnx_available
from geosat2map.errors import Geosat2mapError, Interrupted
from geosat2map.weights import load_generator

from .conftest import SAMPLE_SCENE, random_generator, stop_after, write_scene

CPU = torch.device("cpu")


def test_precision_auto_follows_the_hardware_and_the_others_are_what_they_say():
    assert use_bf16("auto", CPU) is native_bf16(CPU)
    assert use_bf16("bf16", CPU) and not use_bf16("fp32", CPU)
    assert not native_bf16(torch.device("meta"))
    with pytest.raises(Geosat2mapError, match="unknown precision"):
        use_bf16("fp8", CPU)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_asked_for_where_the_cpu_emulates_it_warns(monkeypatch, native):
    """Without AMX or AVX512-BF16 bf16 is many times slower than fp32 (26x on session 59's AVX2
    cores): done as asked, but said; auto and fp32 say nothing."""
    import geosat2map.devices as devices

    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert devices.use_bf16("bf16", CPU) and devices.use_bf16("auto", CPU) is native
        assert not devices.use_bf16("fp32", CPU)
    said = [str(w.message) for w in caught]
    assert len(said) == (0 if native else 1) and all("bf16 is emulated" in text for text in said)


def test_bf16_maps_of_the_default_model_stay_close_to_fp32():
    model, _ = load_generator()
    with rasterio.open(SAMPLE_SCENE) as src:
        tiles = np.stack([src.read([1, 2, 3], window=Window(x, 0, 256, 256)) for x in (0, 256)]).astype(np.float32)
    fp32 = make_engine(model, CPU, "torch", "fp32")
    bf16 = make_engine(model, CPU, "torch", "bf16")
    assert (fp32.name, bf16.name) == ("torch", "torch-bf16")
    diff = np.abs(np.rint(bf16(tiles)) - np.rint(fp32(tiles)))
    # Measured here (session 56's d48P+d48T mean, int4 file, AMX): mean 0.23, 99.78 % <= 2, 99.9th
    # percentile 3.0, max 4 (session 54's d48M: 0.26, 99.61 %, 3.0, 5;
    # session 51's w48_v2: 0.22, all <= 2; w48_t2: 0.22, 99.93 % <= 2,
    # max 3; w48_m4: 0.34,
    # 99.53 %, 4; w48_q37: 0.15, all <= 2; w48_r6: 0.25, <= 3, 5, and on the NAIP sample's whole
    # map 0.16, 99.87 % <= 2, 99.94 % <= 3, max 10).
    # The 99.9th percentile's bound is 4, not 3: the model sits at 3 here, and another CPU's bf16
    # kernels round otherwise (a level is 1/255 of the colour range).
    assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 4 and diff.max() <= 16


@pytest.mark.parametrize("native", [True, False])
def test_auto_times_bf16_only_where_the_hardware_has_it(monkeypatch, native):
    monkeypatch.setattr(engine, "use_bf16", lambda precision, device: native if precision == "auto" else
                        precision == "bf16")
    timed: list[str] = []
    real = engine._seconds_per_batch
    monkeypatch.setattr(engine, "_seconds_per_batch", lambda e, b: (timed.append(e.name), real(e, b))[1])
    model = random_generator(seed=11)  # one export for both cases: their candidates make their timings' keys
    picked = make_engine(model, CPU, "auto", tiles=AUTO_MIN_TILES, batch_size=2).name
    candidates = {"torch-bf16", "torch"} if native else {"torch"}
    if onnx_available():
        candidates.add("onnxruntime")
    assert set(timed) == (candidates if len(candidates) > 1 else set())  # one candidate: nothing to time
    assert picked in candidates
    # A small scene is not timed: PyTorch at the precision auto resolves to.
    assert make_engine(model, CPU, "auto", tiles=1).name == ("torch-bf16" if native else "torch")


def test_resume_keeps_the_interrupted_runs_precision(tiny_weights, tmp_path):
    scene = write_scene(tmp_path / "scene.tif", width=600, height=1200)
    whole = translate(scene, tmp_path / "whole.tif", weights=tiny_weights, backend="torch", precision="bf16")
    assert whole.backend == "torch-bf16"
    out = tmp_path / "map.tif"
    with pytest.raises(Interrupted):
        translate(scene, out, weights=tiny_weights, backend="torch", precision="bf16", progress=stop_after(12))
    resumed = translate(scene, out, weights=tiny_weights, precision="fp32", resume=True)
    assert resumed.backend == "torch-bf16"
    with rasterio.open(whole.dst) as a, rasterio.open(out) as b:
        assert np.array_equal(a.read(), b.read())
