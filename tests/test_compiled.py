"""The compiled backend: torch.compile with frozen weights, kept across scenes, clean when it fails."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio
import torch

import geosat2map.engine as engine
from geosat2map import translate
from geosat2map.engine import make_engine
from geosat2map.errors import WeightsError
from geosat2map.weights import model_digest

from .conftest import random_generator, write_scene

CPU = torch.device("cpu")
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                                    reason="torch.compile (inductor) needs a C++ compiler")


@needs_compiler
def test_compiled_engine_matches_eager_pads_a_short_batch_and_is_kept():
    model = random_generator(seed=21)
    tiles = np.random.default_rng(2).uniform(0, 255, (3, 3, 256, 256)).astype(np.float32)
    eager = make_engine(model, CPU, "torch", "fp32")(tiles)
    compiled = make_engine(model, CPU, "compiled", "fp32", batch_size=4)
    assert compiled.name == "compiled"
    got = compiled(tiles)  # 3 tiles on a graph compiled for 4: padded, not compiled again
    assert got.shape == eager.shape and np.abs(got - eager).max() < 0.05
    assert make_engine(model, CPU, "compiled", "fp32", batch_size=4) is compiled  # the next scene's


@needs_compiler
def test_translate_on_the_compiled_backend_says_so_and_matches_eager(tiny_weights, tmp_path):
    scene = write_scene(tmp_path / "scene.tif", width=500, height=400)
    maps = {}
    for backend in ("torch", "compiled"):
        result = translate(scene, tmp_path / f"{backend}.tif", weights=tiny_weights, backend=backend,
                           precision="fp32", batch_size=4)
        assert result.backend == backend
        with rasterio.open(result.dst) as dst:
            maps[backend] = dst.read().astype(int)
    assert np.abs(maps["torch"] - maps["compiled"]).max() <= 1


def test_a_failed_compile_is_one_clear_error(monkeypatch):
    def broken(module, **kwargs):
        def call(x):
            raise RuntimeError("CppCompileError: no C++ compiler found\nlong log ...")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    model = random_generator(seed=22)
    with pytest.raises(WeightsError, match=r"^torch.compile failed \(CppCompileError: no C\+\+ compiler found\)"):
        make_engine(model, CPU, "compiled", "fp32", batch_size=2)
    assert not [key for key in engine._compiled if key[0] == model_digest(model)]  # nothing broken kept
    with pytest.raises(WeightsError, match="CPU only"):
        make_engine(random_generator(seed=22), torch.device("meta"), "compiled", "fp32")
