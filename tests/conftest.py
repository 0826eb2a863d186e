"""Shared fixtures: tiny generators and synthetic georeferenced scenes made on the fly."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from rasterio.rpc import RPC
from rasterio.transform import from_origin

from geosat2map.model import UNetGenerator, init_weights
from geosat2map.weights import ModelSpec, save_generator
from geosat2map_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SCENE = ROOT / "sample_data" / "vegas_spacenet_rgb.tif"
#: 5 m NAIP with a near-infrared band: water is known from the imagery itself.
NAIP_SCENE = ROOT / "sample_data" / "naip_4band_5m.tif"
SHARED = ROOT.parent / "shared" / "data"


def random_generator(ngf: int = 8, seed: int = 0) -> UNetGenerator:
    torch.manual_seed(seed)
    g = UNetGenerator(ngf=ngf)
    init_weights(g)
    # Running statistics that are not the identity, so eval mode is really exercised.
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return g.eval()


def run(*args: str):
    """A geosat2map command run in this process, as click's test runner reports it."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def cli_json(args: list[str]) -> dict:
    """The JSON a geosat2map command prints, once it has exited 0: where it has not, the failure
    names its output and traceback (a bare ``json.loads`` of an empty output said only that it
    was not JSON)."""
    result = run(*args)
    crashed = result.exc_info is not None and not isinstance(result.exception, SystemExit)
    cause = "".join(traceback.format_exception(*result.exc_info)) if crashed else ""
    assert result.exit_code == 0, f"{args[0]} exited {result.exit_code}: {result.output}{cause}"
    return json.loads(result.stdout)


@pytest.fixture(autouse=True, scope="session")
def engine_cache(tmp_path_factory) -> Path:
    """ONNX exports made by translate's auto backend go to a temporary cache, not the user's."""
    path = tmp_path_factory.mktemp("engine-cache")
    os.environ["GEOSAT2MAP_CACHE"] = str(path)
    return path


def engines_as_if_on_a_gpu(monkeypatch, asynchronous: bool = True) -> None:
    """translate's engines behave as on a GPU (submit first, blend later; parallel compression)
    while still computing on the CPU."""
    import geosat2map.pipeline as pipeline

    make_engine = pipeline.make_engine

    def make(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        engine.asynchronous = asynchronous
        return engine

    monkeypatch.setattr(pipeline, "make_engine", make)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A random width-8 generator with no recorded GSD (translate then keeps native resolution)."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_generator(random_generator(), ModelSpec(ngf=8), path)
    return path


@pytest.fixture(scope="session")
def tiny_weights_gsd(tmp_path_factory) -> Path:
    """The same generator, declaring it was trained at 2 m/pixel."""
    path = tmp_path_factory.mktemp("weights") / "tiny_gsd2.safetensors"
    save_generator(random_generator(), ModelSpec(ngf=8, gsd_m=2.0), path)
    return path


def synthetic_image(height: int, width: int, count: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth fields plus rectangles: enough structure for seams and blending to show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = []
    for _ in range(count):
        fx, fy, ph = rng.uniform(0.005, 0.05), rng.uniform(0.005, 0.05), rng.uniform(0, 6)
        bands.append(127 + 80 * np.sin(fx * xx + ph) * np.cos(fy * yy))
    img = np.stack(bands)
    for _ in range(max(1, height * width // 4000)):
        y, x = rng.integers(0, height), rng.integers(0, width)
        img[:, y : y + 12, x : x + 20] = rng.uniform(0, 255, size=(count, 1, 1))
    return np.clip(img, 0, 255)


def write_scene(
    path: Path,
    width: int = 600,
    height: int = 500,
    count: int = 3,
    dtype: str = "uint8",
    crs: str | None = "EPSG:32633",
    res: float = 1.0,
    nodata: float | None = None,
    data: np.ndarray | None = None,
    **profile,
) -> Path:
    """Write a georeferenced test GeoTIFF (UTM by default, origin at a plausible easting/northing)."""
    if data is None:
        data = synthetic_image(height, width, count)
        if dtype == "uint16":
            data = data * 40 + 500
        elif dtype.startswith("float"):
            data = data / 255.0
    transform = from_origin(500000.0, 4500000.0, res, res) if crs else None
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=count, dtype=dtype,
        crs=crs, transform=transform, nodata=nodata, **profile,
    ) as dst:
        dst.write(data.astype(dtype))
    return path


@pytest.fixture
def scene(tmp_path) -> Path:
    return write_scene(tmp_path / "scene.tif")


def stop_after(tiles: int):
    """A progress callback that presses Ctrl-C once ``tiles`` tiles are done."""
    seen = [0]

    def progress(advance: int, total: int) -> None:
        seen[0] += advance
        if seen[0] >= tiles:
            raise KeyboardInterrupt

    return progress


def torchrun_translate(scene: Path, dst: Path, weights: Path, **options) -> list[dict]:
    """``translate(scene, dst, weights=weights, **options)`` under ``torchrun --nproc_per_node 2``
    (CPU processes, gloo, one thread each); each rank's tiles computed and engine name, by rank."""
    import json
    import subprocess
    import sys

    folder = dst.parent
    script = folder / "torchrun_translate.py"
    script.write_text(
        "import json, os\n"
        "from geosat2map import translate\n"
        f"r = translate({str(scene)!r}, {str(dst)!r}, weights={str(weights)!r}, **{options!r})\n"
        f"open({str(folder)!r} + '/rank' + os.environ['RANK'] + '.json', 'w').write(\n"
        "    json.dumps({'computed': r.tiles_computed, 'backend': r.backend}))\n"
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


def oblique_rpcs(size: int, lon0: float, lat0: float, deg: float) -> RPC:
    """RPCs of a ``size`` x ``size`` oblique view centred on (``lon0``, ``lat0``), ``deg`` degrees a
    pixel: the column follows the longitude and the row the latitude, and ground 500 m below the
    mean height (HEIGHT_OFF, 500 m) lands 0.1 * ``size`` columns east (20 pixels at 200)."""
    terms = [0.0] * 20
    samp_num, line_num, den = terms.copy(), terms.copy(), terms.copy()
    samp_num[1], line_num[2], den[0] = 1.0, -1.0, 1.0
    samp_num[3] = 0.2  # the height term
    half = size / 2
    return RPC(height_off=500, height_scale=500, lat_off=lat0, lat_scale=half * deg, line_den_coeff=den,
               line_num_coeff=line_num, line_off=half, line_scale=half, long_off=lon0, long_scale=half * deg,
               samp_den_coeff=den, samp_num_coeff=samp_num, samp_off=half, samp_scale=half, err_bias=0, err_rand=0)
