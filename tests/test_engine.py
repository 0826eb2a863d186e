"""Inference backends: PyTorch and ONNX Runtime agree; auto picks one and translate reports it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from geosat2map import translate
from geosat2map.engine import AUTO_MIN_TILES, cache_dir, make_engine
from geosat2map.errors import Interrupted, WeightsError
from geosat2map.weights import model_digest

from .conftest import random_generator, stop_after, write_scene

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


def test_onnxruntime_engine_agrees_with_torch_and_is_exported_once(engine_cache):
    model = random_generator()
    tiles = np.random.default_rng(1).uniform(0, 255, (3, 3, 256, 256)).astype(np.float32)
    reference = make_engine(model, torch.device("cpu"), "torch", "fp32")(tiles)
    ort = make_engine(model, torch.device("cpu"), "onnxruntime")
    assert ort.name == "onnxruntime"
    got = ort(tiles)
    assert got.shape == reference.shape and got.dtype == np.float32
    assert np.abs(got - reference).max() < 0.05  # on the 0..255 scale
    assert np.abs(ort(tiles[:1]) - got[:1]).max() < 1e-3  # batch mates do not matter
    exports = sorted(cache_dir().glob("engine-*.onnx"))
    assert exports and cache_dir() == engine_cache
    before = [p.stat().st_mtime_ns for p in exports]
    make_engine(model, torch.device("cpu"), "onnxruntime")
    assert [p.stat().st_mtime_ns for p in sorted(cache_dir().glob("engine-*.onnx"))] == before


def test_the_median_of_views_runs_on_any_engine_as_the_module_does(engine_cache):
    """On the CPU --tta-median wraps whichever engine maps the views: in PyTorch fp32 it is the
    ViewMedian module's map exactly (the median is an order statistic: the engines' scaling and
    clamping commute with it), through ONNX Runtime within its rounding; a map's record names the
    engine that made the views."""
    from geosat2map.engine import InferenceEngine, MedianOfViewsEngine
    from geosat2map.model import ViewMedian

    median = ViewMedian(random_generator())
    tiles = np.random.default_rng(2).uniform(0, 255, (2, 3, 256, 256)).astype(np.float32)
    module = InferenceEngine(median, torch.device("cpu"))(tiles)
    for backend, close in (("torch", 0.0), ("onnxruntime", 0.05)):
        engine = make_engine(median, torch.device("cpu"), backend, "fp32")
        assert isinstance(engine, MedianOfViewsEngine) and engine.name == backend
        assert np.abs(engine(tiles) - module).max() <= close
    assert np.abs(module - InferenceEngine(median.generator, torch.device("cpu"))(tiles)).mean() > 0.1


def test_a_damaged_cached_export_is_made_again_and_one_never_loadable_is_one_line(engine_cache, monkeypatch):
    """The ONNX export is kept in the cache across runs: one ONNX Runtime cannot load (damaged, or
    written by an onnx newer than this ONNX Runtime reads) is exported again, not a traceback; a
    fresh export that still fails is a WeightsError naming it, and auto times PyTorch alone."""
    from geosat2map import engine

    model = random_generator()
    make_engine(model, torch.device("cpu"), "onnxruntime")
    export = next(engine_cache.glob("engine-*.onnx"))
    whole = export.read_bytes()
    export.write_bytes(whole[:1000])
    engine._sessions.clear()  # as in a new process
    tiles = np.random.default_rng(1).uniform(0, 255, (1, 3, 256, 256)).astype(np.float32)
    assert make_engine(model, torch.device("cpu"), "onnxruntime")(tiles).shape == (1, 3, 256, 256)
    assert export.read_bytes() == whole  # exported again (the export is deterministic)

    def unloadable(*args) -> Path:
        (engine_cache / "bad.onnx").write_bytes(b"not a model")
        return engine_cache / "bad.onnx"

    monkeypatch.setattr(engine, "engine_onnx", unloadable)
    engine._sessions.clear()
    with pytest.raises(WeightsError, match=r"ONNX Runtime cannot load the model exported to .*bad.onnx: "):
        make_engine(model, torch.device("cpu"), "onnxruntime")
    # auto, for a batch size no run has timed: ONNX Runtime left out, PyTorch picked
    assert make_engine(model, torch.device("cpu"), "auto", "fp32", batch_size=3, tiles=AUTO_MIN_TILES).name == "torch"


def test_an_export_that_fills_the_disk_is_one_line_and_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    import onnx

    from geosat2map import engine

    def full_disk(proto, path) -> None:
        Path(path).write_bytes(b"part of an export")
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("GEOSAT2MAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine, "export_proto", lambda *args, **kwargs: onnx.ModelProto())  # no 5 s export
    monkeypatch.setattr(onnx, "save_model", full_disk)
    with pytest.raises(WeightsError, match=r"cannot keep the ONNX export in .*cache: .*No space left on device"):
        make_engine(random_generator(seed=9), torch.device("cpu"), "onnxruntime")
    assert list((tmp_path / "cache").iterdir()) == []


def test_auto_uses_torch_for_small_scenes_and_times_both_for_big_ones():
    model = random_generator()
    assert make_engine(model, torch.device("cpu"), "auto", "fp32", tiles=AUTO_MIN_TILES - 1).name == "torch"
    big = random_generator(seed=5)  # weights not exported yet: auto must export them to time ONNX Runtime
    assert make_engine(big, torch.device("cpu"), "auto", "fp32", tiles=AUTO_MIN_TILES, batch_size=2).name in (
        "torch", "onnxruntime")
    assert list(cache_dir().glob(f"engine-{model_digest(big)[:32]}-*.onnx"))


def test_auto_times_one_candidate_at_a_time_and_keeps_no_session_it_did_not_pick(monkeypatch):
    """The first run on a machine exports the model and opens ONNX Runtime only to time them: each
    candidate's memory goes back before the next is made, and a session not picked is closed."""
    from geosat2map import engine

    events: list[str] = []
    open_session = engine._ort_engine
    monkeypatch.setattr(engine, "_ort_engine", lambda path, *a: (events.append("open"), open_session(path, *a))[1])
    monkeypatch.setattr(engine, "_seconds_per_batch",
                        lambda e, batch: (events.append(f"time {e.name}"), 0.0 if e.name == "torch" else 1.0)[1])
    monkeypatch.setattr(engine, "release_freed_memory", lambda: events.append("release"))
    model = random_generator(seed=23)  # not exported yet
    assert make_engine(model, torch.device("cpu"), "auto", "fp32", tiles=AUTO_MIN_TILES, batch_size=2).name == "torch"
    # PyTorch timed and its memory handed back; the export's handed back; then ONNX Runtime opened,
    # timed, closed (not picked) and its memory handed back.
    assert events == ["time torch", "release", "release", "open", "time onnxruntime", "release", "release"]
    assert not engine._sessions


def test_a_small_scene_on_auto_does_not_even_import_onnx(tiny_weights, tmp_path):
    """Importing onnx takes about a second, more than a small scene's whole translate."""
    import subprocess
    import sys

    scene = write_scene(tmp_path / "small.tif", width=300, height=300)
    code = ("import sys; from geosat2map import translate; "
            f"r = translate({str(scene)!r}, {str(tmp_path / 'map.tif')!r}, weights={str(tiny_weights)!r}, "
            "precision='fp32'); "
            "print(r.backend, 'onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["torch", "False"]


def test_translate_on_either_backend_gives_the_same_map_within_one_level(tiny_weights, tmp_path):
    scene = write_scene(tmp_path / "scene.tif", width=500, height=400)
    maps = {}
    for backend in ("torch", "onnxruntime"):
        result = translate(scene, tmp_path / f"{backend}.tif", weights=tiny_weights, backend=backend,
                           precision="fp32")
        assert result.backend == backend
        with rasterio.open(result.dst) as dst:
            maps[backend] = dst.read().astype(int)
    assert np.abs(maps["torch"] - maps["onnxruntime"]).max() <= 1


def test_onnxruntime_gets_the_fp32_batch_where_torch_would_run_bf16(tiny_weights, tmp_path, monkeypatch):
    """ONNX Runtime computes in fp32 whatever the CPU, so it gets fp32's default batch."""
    from geosat2map import engine

    monkeypatch.setattr(engine, "use_bf16", lambda precision, device: precision != "fp32")
    scene = write_scene(tmp_path / "scene.tif", width=300, height=300)
    ort = translate(scene, tmp_path / "ort.tif", weights=tiny_weights, backend="onnxruntime")
    assert (ort.backend, ort.batch_size) == ("onnxruntime", engine.CPU_BATCH)
    assert translate(scene, tmp_path / "torch.tif", weights=tiny_weights, backend="torch").batch_size == \
        engine.CPU_BATCH_BF16


def test_resume_keeps_the_interrupted_runs_backend(tiny_weights, tmp_path):
    scene = write_scene(tmp_path / "scene.tif", width=600, height=1200)
    whole = translate(scene, tmp_path / "whole.tif", weights=tiny_weights, backend="onnxruntime")
    out = tmp_path / "map.tif"
    with pytest.raises(Interrupted):
        translate(scene, out, weights=tiny_weights, backend="onnxruntime", progress=stop_after(12))
    resumed = translate(scene, out, weights=tiny_weights, backend="torch", resume=True)
    assert resumed.backend == "onnxruntime"
    with rasterio.open(whole.dst) as a, rasterio.open(out) as b:
        assert np.array_equal(a.read(), b.read())


def test_unknown_or_impossible_backend_is_a_clean_error():
    from geosat2map.errors import WeightsError

    with pytest.raises(WeightsError, match="unknown backend"):
        make_engine(random_generator(), torch.device("cpu"), "tensorrt")
    with pytest.raises(WeightsError, match="fp32 only"):
        make_engine(random_generator(), torch.device("cpu"), "onnxruntime", "bf16")


def test_a_second_scene_reuses_the_session_and_auto_does_not_time_again(engine_cache, monkeypatch):
    import geosat2map.engine as engine

    model = random_generator(seed=7)
    first = make_engine(model, torch.device("cpu"), "onnxruntime")
    assert make_engine(model, torch.device("cpu"), "onnxruntime").session is first.session
    timed = []
    real = engine._seconds_per_batch
    monkeypatch.setattr(engine, "_seconds_per_batch", lambda e, b: (timed.append(e.name), real(e, b))[1])
    picks = {make_engine(model, torch.device("cpu"), "auto", "fp32", tiles=AUTO_MIN_TILES, batch_size=2).name
             for _ in range(3)}
    assert sorted(timed) == ["onnxruntime", "torch"] and len(picks) == 1
    other = random_generator(seed=8)  # other weights: a session of their own
    assert make_engine(other, torch.device("cpu"), "onnxruntime").session is not first.session


def test_auto_remembers_its_pick_across_runs_on_this_machine(engine_cache, monkeypatch):
    """A later run (here: this process's in-memory picks forgotten) runs the engine the first
    run picked, even if timing again would pick the other: the same command, the same map."""
    import geosat2map.engine as engine

    model = random_generator(seed=21)
    slow = {"torch"}
    monkeypatch.setattr(engine, "_seconds_per_batch", lambda e, b: 1.0 if e.name in slow else 0.5)
    cpu = torch.device("cpu")
    assert make_engine(model, cpu, "auto", "fp32", tiles=AUTO_MIN_TILES, batch_size=2).name == "onnxruntime"
    monkeypatch.setattr(engine, "_choices", {})  # a new process
    slow = {"onnxruntime"}
    assert make_engine(model, cpu, "auto", "fp32", tiles=AUTO_MIN_TILES, batch_size=2).name == "onnxruntime"
    # Another batch size, or a cache folder that lost its record, is timed again.
    assert make_engine(model, cpu, "auto", "fp32", tiles=AUTO_MIN_TILES, batch_size=3).name == "torch"
    (engine_cache / engine.CHOICES_FILE).write_text("not json")
    monkeypatch.setattr(engine, "_choices", {})
    assert make_engine(model, cpu, "auto", "fp32", tiles=AUTO_MIN_TILES, batch_size=2).name == "torch"
    assert len(json.loads((engine_cache / engine.CHOICES_FILE).read_text())) == 1  # rewritten, valid
    # A remembered PyTorch pick neither exports nor opens ONNX Runtime (a second per run).
    monkeypatch.setattr(engine, "_choices", {})
    monkeypatch.setattr(engine, "engine_onnx", lambda *a: pytest.fail("ONNX Runtime made for a PyTorch pick"))
    assert make_engine(model, cpu, "auto", "fp32", tiles=AUTO_MIN_TILES, batch_size=2).name == "torch"

def test_model_digest_is_remembered_until_the_weights_change():
    model = random_generator(seed=9)
    first = model_digest(model)
    assert model_digest(model) == first
    with torch.no_grad():
        next(model.parameters()).mul_(2)  # in place: same tensor, new version
    assert model_digest(model) != first
    model.load_state_dict(random_generator(seed=9).state_dict())  # copied back into the same tensors
    assert model_digest(model) == first
