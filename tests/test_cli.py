"""The CLI: bad input gets one line on stderr, a non-zero exit and nothing at OUT."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning

from geosat2map import preview
from geosat2map.errors import InputError
from geosat2map.weights import ModelSpec, save_generator
from geosat2map_cli.main import cli

from .conftest import SAMPLE_SCENE, random_generator, run, synthetic_image, write_scene


def assert_clean_failure(result, out: Path, phrase: str) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("geosat2map: error:") and phrase in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".part" in p.name or ".final." in p.name]


def test_translate_writes_a_map_and_reports_one_line(scene, tiny_weights, tmp_path):
    out = tmp_path / "map.tif"
    result = run("translate", scene, out, "--weights", tiny_weights, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}") and len(result.stdout.strip().splitlines()) == 1
    with rasterio.open(out) as dst:
        assert dst.count == 3
    assert "flip-averaged" not in result.stdout
    result = run("translate", scene, tmp_path / "tta.tif", "--weights", tiny_weights, "--quiet", "--tta")
    assert result.exit_code == 0, result.output
    assert "flip-averaged" in result.stdout
    result = run("translate", scene, tmp_path / "median.tif", "--weights", tiny_weights, "--quiet", "--tta-median")
    assert result.exit_code == 0 and ", median of 18 views) in " in result.stdout, result.output
    info = run("info", tmp_path / "median.tif")
    assert "median of 18 views (--tta-median)" in info.stdout and "asked with --tta-median" in info.stdout, info.output


def test_missing_input(tiny_weights, tmp_path):
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", tmp_path / "nope.tif", out, "--weights", tiny_weights), out, "not found")


def test_not_a_raster(tiny_weights, tmp_path):
    bogus = tmp_path / "notes.tif"
    bogus.write_text("hello")
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", bogus, out, "--weights", tiny_weights), out, "not a raster")


def test_no_georeferencing_unless_allowed(tiny_weights, tmp_path):
    png = tmp_path / "photo.png"
    with rasterio.open(png, "w", driver="PNG", width=300, height=200, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 200, 300), np.uint8))
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", png, out, "--weights", tiny_weights), out, "no georeferencing")
    with warnings.catch_warnings():  # the map written without georeferencing, as asked: no warning
        warnings.simplefilter("error", NotGeoreferencedWarning)
        ok = run("translate", png, out, "--weights", tiny_weights, "--allow-ungeoreferenced", "--quiet")
    assert ok.exit_code == 0 and out.exists(), ok.output
    # tiles has no such way round: it pairs the scene with the map on the ground.
    tiles = tmp_path / "tiles"
    refused = run("tiles", png, tiles, "--map", out)
    assert_clean_failure(refused, tiles, "photo.png has no georeferencing: tiles pairs it with the map")
    assert "--allow-ungeoreferenced" not in refused.stderr


def test_a_warning_said_once(tiny_weights, tmp_path):
    """A scene with a nodata value and an alpha band: rasterio warns that the nodata value wins for
    every window it reads masks of, from several of its lines; the user hears it once."""
    rgb = synthetic_image(300, 300)
    alpha = np.full((1, 300, 300), 255.0)
    alpha[:, :40] = 0
    scene = write_scene(tmp_path / "both.tif", width=300, height=300, count=4, nodata=0,
                        data=np.concatenate([rgb, alpha]), photometric="RGB", alpha="YES")
    out = tmp_path / "map.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # Python's own once-per-line registry out of the way
        result = run("translate", scene, out, "--weights", tiny_weights, "--quiet", "--overlap", "128")
    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "shadowing the alpha band" in line]
    assert len(said) == 1 and said[0].startswith("geosat2map: warning: "), result.stderr


@pytest.mark.parametrize("rank, prefix", [("0", "geosat2map: warning: "), ("1", "geosat2map: warning (rank 1): ")])
def test_a_helper_ranks_warning_names_it(monkeypatch, capsys, rank, prefix):
    """Under torchrun every rank reads the scene and meets its warnings: a helper's line says whose it is."""
    from geosat2map_cli.main import _OneLineWarnings

    monkeypatch.setenv("RANK", rank)
    show = _OneLineWarnings()
    show(UserWarning("the nodata attribute is shadowing the alpha band\nmore"), UserWarning, "x.py", 1)
    show(UserWarning("the nodata attribute is shadowing the alpha band"), UserWarning, "y.py", 2)
    assert capsys.readouterr().err == prefix + "the nodata attribute is shadowing the alpha band\n"


def test_coordinates_outside_their_crs(tiny_weights, tiny_weights_gsd, tmp_path):
    """UTM eastings of a billion metres: no place on Earth, so no ground resolution to resample to;
    at native resolution there is nothing to resample."""
    scene = write_scene(tmp_path / "far.tif")
    with rasterio.open(scene, "r+") as ds:
        ds.transform = rasterio.transform.from_origin(1e9, 4500000, 1, 1)
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", scene, out, "--weights", tiny_weights_gsd), out, "do not lie within its CRS")
    assert run("translate", scene, out, "--weights", tiny_weights_gsd, "--resolution", "native",
               "--quiet").exit_code == 0


def test_ground_control_points_are_warped_north_up(tiny_weights, tmp_path):
    """A raw product placed by GCPs (no geotransform): translated through GDAL's warper, and the
    note says so (placement itself: tests/test_placement.py)."""
    from rasterio.control import GroundControlPoint

    scene = tmp_path / "raw.tif"
    corners = [(0, 0), (0, 300), (200, 0), (200, 300)]
    gcps = [GroundControlPoint(r, c, 500000 + c, 4500000 - r) for r, c in corners]
    with rasterio.open(scene, "w", driver="GTiff", width=300, height=200, count=3, dtype="uint8") as dst:
        dst.write(np.full((3, 200, 300), 90, np.uint8))
        dst.gcps = (gcps, "EPSG:32633")
    out = tmp_path / "map.tif"
    result = run("translate", scene, out, "--weights", tiny_weights, "--quiet")
    assert result.exit_code == 0, result.output
    assert "placed north-up by GDAL's warper from 4 ground control points" in result.stderr
    with rasterio.open(out) as dst:
        assert dst.crs == "EPSG:32633"
        assert dst.bounds == pytest.approx((500000, 4499800, 500300, 4500000), abs=1)


def test_bands_that_do_not_fit_the_weights(scene, tmp_path):
    four = tmp_path / "four_band.safetensors"
    g = random_generator()
    save_generator(type(g)(in_channels=4, ngf=8), ModelSpec(ngf=8, in_channels=4), four)
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", scene, out, "--weights", four), out, "takes 4 bands")


def test_band_out_of_range(scene, tiny_weights, tmp_path):
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", scene, out, "--weights", tiny_weights, "--bands", "1,2,7"), out, "band")


def test_coarse_scene_is_not_blown_up_to_the_model_resolution(tiny_weights_gsd, tmp_path):
    # 30 m pixels against the model's 2 m: 15 times finer, 225 times the pixels of invented detail.
    coarse = write_scene(tmp_path / "landsat.tif", width=64, height=48, res=30.0)
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", coarse, out, "--weights", tiny_weights_gsd), out, "--resolution native")
    assert run("translate", coarse, out, "--weights", tiny_weights_gsd, "--resolution", "native",
               "--quiet").exit_code == 0
    with rasterio.open(out) as dst:
        assert (dst.width, dst.height) == (64, 48)
    # A scene at most 8 times coarser is still resampled to the model's pixels (here 4x).
    assert run("translate", write_scene(tmp_path / "naip.tif", width=64, height=48, res=8.0), out,
               "--weights", tiny_weights_gsd, "--overwrite", "--quiet").exit_code == 0
    with rasterio.open(out) as dst:
        assert (dst.width, dst.height) == (256, 192)


def test_a_resolution_far_finer_than_the_scene_is_refused(tiny_weights, tmp_path):
    """An explicit --resolution is taken as asked, but not 1000 times the scene's detail (0.001
    typed for 1 m): one line with the size it would make, before anything is written."""
    scene = write_scene(tmp_path / "scene.tif", width=64, height=48, res=1.0)
    out = tmp_path / "map.tif"
    result = run("translate", scene, out, "--weights", tiny_weights, "--resolution", "0.001")
    assert_clean_failure(result, out, "1000 times finer than")
    assert re.search(r"would be 64,0\d\d x 48,0\d\d pixels", result.stderr)  # ground metres, not quite 1 m
    assert run("translate", scene, out, "--weights", tiny_weights, "--resolution", "0.25", "--quiet").exit_code == 0


def test_output_equal_to_input(scene, tiny_weights):
    before = scene.read_bytes()
    result = run("translate", scene, scene, "--weights", tiny_weights, "--overwrite")
    assert result.exit_code != 0 and "is the input" in result.stderr
    assert scene.read_bytes() == before


def test_existing_output_is_kept_unless_overwrite(scene, tiny_weights, tmp_path):
    out = tmp_path / "map.tif"
    out.write_text("precious")
    result = run("translate", scene, out, "--weights", tiny_weights)
    assert result.exit_code != 0 and "--overwrite" in result.stderr
    assert out.read_text() == "precious"
    assert run("translate", scene, out, "--weights", tiny_weights, "--overwrite", "--quiet").exit_code == 0
    with rasterio.open(out) as dst:
        assert dst.count == 3


def test_missing_output_folder(scene, tiny_weights, tmp_path):
    out = tmp_path / "no" / "such" / "map.tif"
    result = run("translate", scene, out, "--weights", tiny_weights)
    assert result.exit_code != 0 and "does not exist" in result.stderr
    assert not out.exists()


def test_unwritable_output_folder(tiny_weights):
    """Run as an unprivileged user when the tests run as root (root can write anywhere)."""
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        scene = write_scene(base / "scene.tif")
        weights = base / "w.safetensors"
        shutil.copy(tiny_weights, weights)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        for p in (scene, weights):
            p.chmod(0o644)
        cmd = [sys.executable, "-m", "geosat2map_cli", "translate", str(scene), str(locked / "map.tif"),
               "--weights", str(weights)]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot drop privileges")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=base)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"geosat2map: error: the output folder {locked} is not writable"]
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base)


def test_one_scene_into_an_existing_folder_names_a_file_to_write(tiny_weights, tmp_path):
    """One SRC with a folder for DST: refused (several SRC write into a folder), with a name to give."""
    scene = write_scene(tmp_path / "scene.tif")
    folder = tmp_path / "maps"
    folder.mkdir()
    result = run("translate", scene, folder, "--weights", tiny_weights)
    assert result.exit_code == 1 and list(folder.iterdir()) == []
    assert result.stderr.strip() == (f"geosat2map: error: the output {folder} is a folder: "
                                     f"name a file in it, e.g. {folder / 'scene.tif'}")


@pytest.mark.parametrize("rank", [None, "1"])
def test_ctrl_c_midway_leaves_nothing(tmp_path, tiny_weights, monkeypatch, rank):
    """A helper rank under torchrun names itself: rank 0's "rank 1 failed (its own error is above)"
    points to its line, and beside rank 0's own report a bare "interrupted" read as a second run."""
    if rank:
        monkeypatch.setenv("RANK", rank)
    scene = write_scene(tmp_path / "scene.tif", width=900, height=900)
    calls = {"n": 0}
    from geosat2map import engine

    original = engine.InferenceEngine.submit

    def interrupted(self, tiles):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, tiles)

    monkeypatch.setattr(engine.InferenceEngine, "submit", interrupted)
    out = tmp_path / "map.tif"
    result = run("translate", scene, out, "--weights", tiny_weights, "--batch-size", "2", "--quiet")
    assert result.exit_code == 130
    assert result.stderr.strip() == "geosat2map: interrupted" + (f" (rank {rank})" if rank else "")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_corrupt_weights(scene, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", scene, out, "--weights", bad), out, "safetensors")


def test_pickle_weights_are_refused_without_running_them(scene, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state": Evil()}, f)
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", scene, out, "--weights", evil), out, "safetensors")
    assert not marker.exists()


def test_torch_checkpoint_is_not_taken_for_weights(scene, tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save(random_generator().state_dict(), ckpt)
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", scene, out, "--weights", ckpt), out, "safetensors")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_in_the_middle_of_a_run_leaves_nothing(tmp_path, tiny_weights, sig):
    import signal
    import time

    scene = write_scene(tmp_path / "scene.tif", width=4000, height=4000)
    out = tmp_path / "map.tif"
    # A shell without job control starts background jobs with SIGINT ignored, and an ignored
    # signal stays ignored across exec (Python then leaves it so, as nohup intends). A handled one
    # is reset to the default: SIGINT is handled here while the child starts, so the test asks
    # what translate does on Ctrl-C however the suite was launched.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # --backend torch: auto would first time ONNX Runtime on this 441-tile scene (some 10 s)
        proc = subprocess.Popen([sys.executable, "-m", "geosat2map_cli", "translate", str(scene), str(out),
                                 "--weights", str(tiny_weights), "--batch-size", "1", "--backend", "torch"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 120
    while not [p for p in tmp_path.iterdir() if ".part" in p.name] and time.time() < deadline:
        time.sleep(0.05)  # wait until the temporary output exists: the run is under way
    assert proc.poll() is None, ("the run ended before it could be interrupted", proc.communicate())
    assert [p for p in tmp_path.iterdir() if ".part" in p.name], "no partial output within 120 s"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err, sorted(p.name for p in tmp_path.iterdir()))
    last = err.strip().splitlines()[-1]
    if last == "geosat2map: interrupted":  # stopped before a whole block row was written: nothing kept
        assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]
    else:  # finished rows kept for --resume, and nothing else
        assert last.startswith("geosat2map: interrupted: ") and last.endswith("with --resume continues"), last
        assert sorted(p.name for p in tmp_path.iterdir()) == [".map.tif.part.json", ".map.tif.part.tif", "scene.tif"]


def test_missing_default_model_says_so_in_one_line(scene, tmp_path, monkeypatch):
    import geosat2map.weights

    monkeypatch.setattr(geosat2map.weights, "DEFAULT_WEIGHTS_NAME", "absent.safetensors")
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", scene, out), out, "no default model is shipped")


def test_empty_file(tiny_weights, tmp_path):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", empty, out, "--weights", tiny_weights), out, "not a raster")


def no_model_prepared(monkeypatch) -> None:
    """translate fails the test if it prepares a model (auto's export and timing: seconds)."""
    import geosat2map.pipeline

    monkeypatch.setattr(geosat2map.pipeline, "make_engine", lambda *a, **k: pytest.fail("a model was prepared"))


def test_truncated_geotiff(tiny_weights, tmp_path, monkeypatch):
    whole = write_scene(tmp_path / "whole.tif", width=800, height=800, tiled=True, blockxsize=256, blockysize=256)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = tmp_path / "map.tif"
    no_model_prepared(monkeypatch)  # its last blocks are gone: it fails before the model is prepared
    result = run("translate", cut, out, "--weights", tiny_weights, "--quiet")
    assert_clean_failure(result, out, "cut.tif")
    # The dry run makes the same checks first: it says the run would fail, not what it would write.
    assert_clean_failure(run("translate", cut, out, "--weights", tiny_weights, "--dry-run"), out, "cut.tif")


def test_all_nodata_scene(tiny_weights, tmp_path):
    blank = write_scene(tmp_path / "blank.tif", nodata=0, data=np.zeros((3, 500, 600)))
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", blank, out, "--weights", tiny_weights, "--quiet"), out, "no valid pixels")


def test_full_disk_is_a_clean_error(tiny_weights, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes beyond 200 kB fail.

    GDAL's libtiff also prints "_tiffWriteProc: File too large." from C; the CLI keeps that off
    the terminal, so ours is the only line.
    """
    scene = write_scene(tmp_path / "scene.tif", width=1500, height=1500)
    out = tmp_path / "map.tif"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
            "from geosat2map_cli.main import cli; cli(prog_name='geosat2map')")
    proc = subprocess.run([sys.executable, "-c", code, "translate", str(scene), str(out), "--weights",
                           str(tiny_weights), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geosat2map: error: writing") and "map.tif" in lines[0], lines
    assert "See previous exception" not in lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_a_small_map_on_a_full_disk_is_not_reported_written(tmp_path):
    """A map small enough to sit in GDAL's cache is written on close, whose failures rasterio does
    not raise: render-map said "wrote" and left a truncated file. Its block index now says so."""
    ref = write_scene(tmp_path / "ref.tif", width=1300, height=1300)
    vec = tmp_path / "roads.geojson"
    road = {"type": "LineString", "coordinates": [[500000 + i * 97.0, 4500000 - i * 89.0] for i in range(14)]}
    crs = {"type": "name", "properties": {"name": "EPSG:32633"}}
    feature = {"type": "Feature", "properties": {"highway": "primary"}, "geometry": road}
    vec.write_text(json.dumps({"type": "FeatureCollection", "crs": crs, "features": [feature]}))
    out = tmp_path / "map.tif"
    code = ("import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (4_096, 4_096)); "
            "from geosat2map_cli.main import cli; cli(prog_name='geosat2map')")
    proc = subprocess.run([sys.executable, "-c", code, "render-map", str(vec), str(out), "--like", str(ref)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"geosat2map: error: writing {out} failed (disk full?): not every block reached the disk"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.tif", "roads.geojson"]


def test_a_cog_copy_failing_on_a_full_disk_is_one_line(scene, tiny_weights, tmp_path, monkeypatch):
    """GDAL's COG copy reports a full disk as a CPLE_AppDefinedError, not a RasterioIOError: it was
    a traceback (found on a 6 MB tmpfs)."""
    from rasterio._err import CPLE_AppDefinedError

    import geosat2map.writer as writer

    def full_disk(*args, **kwargs) -> None:
        raise CPLE_AppDefinedError(1, 1, "TIFFRewriteDirectory:Error fetching directory count")

    monkeypatch.setattr(writer.rasterio.shutil, "copy", full_disk)
    out = tmp_path / "map.tif"
    result = run("translate", scene, out, "--weights", tiny_weights, "--cog", "--quiet")
    assert_clean_failure(result, out, "finishing")
    assert "TIFFRewriteDirectory:Error fetching directory count" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [scene.name]


def tiff_declaring(path: Path, width: int, height: int) -> Path:
    """A 1 x 1 GeoTIFF whose header is then edited to declare ``width`` x ``height`` pixels."""
    import struct

    write_scene(path, width=1, height=1)
    raw = bytearray(path.read_bytes())
    assert raw[:4] == b"II*\x00"  # classic little-endian TIFF
    ifd = struct.unpack_from("<I", raw, 4)[0]
    for i in range(struct.unpack_from("<H", raw, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", raw, entry)[0]
        if tag in (256, 257):  # ImageWidth, ImageLength, rewritten as LONG
            struct.pack_into("<HHII", raw, entry, tag, 4, 1, width if tag == 256 else height)
    path.write_bytes(bytes(raw))
    return path


def test_zero_by_zero_raster(tiny_weights, tmp_path):
    path = tiff_declaring(tmp_path / "zero.tif", 0, 0)
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", path, out, "--weights", tiny_weights), out, "zero.tif")


def test_one_by_one_raster(tiny_weights, tmp_path):
    path = write_scene(tmp_path / "one.tif", width=1, height=1)
    out = tmp_path / "map.tif"
    result = run("translate", path, out, "--weights", tiny_weights)
    assert_clean_failure(result, out, "only 1 x 1 pixels")
    assert "native" not in result.stderr  # it is at its own pixels already


def test_a_clip_too_small_at_the_models_resolution_is_pointed_to_native(tiny_weights_gsd, tmp_path):
    """40 x 40 pixels of 0.25 m are 5 x 5 at the model's 2 m: too few, and its own pixels would do."""
    path = write_scene(tmp_path / "clip.tif", width=40, height=40, res=0.25)
    out = tmp_path / "map.tif"
    result = run("translate", path, out, "--weights", tiny_weights_gsd)
    assert_clean_failure(result, out, "only 5 x 5 pixels at 2.00 m/pixel")
    assert "(at --resolution native it would fit)" in result.stderr
    fits = run("translate", path, out, "--weights", tiny_weights_gsd, "--resolution", "native", "--quiet")
    assert fits.exit_code == 0 and out.exists(), fits.output


def test_header_declaring_a_huge_size(tiny_weights, tmp_path, monkeypatch):
    path = tiff_declaring(tmp_path / "huge.tif", 200_000, 200_000)
    out = tmp_path / "map.tif"
    no_model_prepared(monkeypatch)
    result = run("translate", path, out, "--weights", tiny_weights, "--quiet")
    assert_clean_failure(result, out, "huge.tif")
    assert "Read failed. See previous exception" not in result.stderr  # GDAL's own reason is given


def test_a_scene_too_wide_for_memory_is_refused_up_front(scene, tiny_weights, tmp_path, monkeypatch):
    import geosat2map.pipeline

    monkeypatch.setattr(geosat2map.pipeline, "available_memory", lambda: 1_000_000)
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", scene, out, "--weights", tiny_weights), out, "GiB of row buffers")



def test_several_scenes_into_a_folder_one_model_load_and_a_bad_one_reported(tiny_weights, tmp_path, monkeypatch):
    import geosat2map.pipeline

    a = write_scene(tmp_path / "a.tif", width=300, height=280)
    b = write_scene(tmp_path / "b.tif", width=260, height=300, dtype="uint16")
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    out = tmp_path / "maps"
    out.mkdir()
    loads = []
    real_load = geosat2map.pipeline.load_generator
    monkeypatch.setattr(geosat2map.pipeline, "load_generator", lambda w: loads.append(w) or real_load(w))
    result = run("translate", a, bad, b, out, "--weights", tiny_weights, "--quiet")
    assert result.exit_code == 1
    assert len(loads) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("geosat2map:")]
    assert errors == [f"geosat2map: error: {bad} is not a raster GDAL can read"]
    assert [line.split(":")[0] for line in result.stdout.strip().splitlines()] == [f"wrote {out}/a.tif",
                                                                                  f"wrote {out}/b.tif"]
    not_a_folder = run("translate", a, b, tmp_path / "x.tif", "--weights", tiny_weights)
    assert not_a_folder.exit_code == 1 and "must be an existing folder" in not_a_folder.stderr


def test_a_quoted_pattern_translates_every_match(tiny_weights, tmp_path):
    for name in ("a.tif", "b.tif"):
        write_scene(tmp_path / name, width=260, height=260)
    out = tmp_path / "maps"
    out.mkdir()
    result = run("translate", str(tmp_path / "*.tif"), out, "--weights", tiny_weights, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif"]
    one = run("translate", str(tmp_path / "a*.tif"), out, "--weights", tiny_weights, "--quiet", "--overwrite")
    assert one.exit_code == 0, one.output  # a pattern with one match still writes into the folder
    none = run("translate", str(tmp_path / "*.jp2"), out, "--weights", tiny_weights)
    assert none.exit_code == 1 and none.stderr.strip() == f"geosat2map: error: no file matches {tmp_path / '*.jp2'}"
    # A file named with a pattern's characters is that file (one map at DST), not a pattern.
    Path(tmp_path / "a.tif").rename(tmp_path / "scene [1].tif")
    named = run("translate", tmp_path / "scene [1].tif", tmp_path / "one.tif", "--weights", tiny_weights, "--quiet")
    assert named.exit_code == 0 and (tmp_path / "one.tif").is_file(), named.output
    mosaic = run("mosaic", tmp_path / "scene [1].tif", tmp_path / "m.vrt")
    assert mosaic.exit_code == 0 and "1 sheet" in mosaic.stdout, mosaic.output


def test_help_and_version_do_not_import_torch():
    """The package imports its public names on first use: ``--help`` and ``--version`` answer
    without the second it takes to import torch, and the public names still import."""
    code = ("import sys; from click.testing import CliRunner; from geosat2map_cli.main import cli; "
            "assert CliRunner().invoke(cli, ['--help']).exit_code == 0; "
            "assert CliRunner().invoke(cli, ['--version']).exit_code == 0; "
            "print('torch' in sys.modules); "
            "from geosat2map import translate, Geosat2mapError, load_generator; import geosat2map; "
            "print(translate.__module__, Geosat2mapError.__module__, 'translate' in dir(geosat2map)); "
            "print(geosat2map.errors.Interrupted.__name__, geosat2map.train.TrainConfig.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "geosat2map.pipeline", "geosat2map.errors", "True", "Interrupted", "TrainConfig"]


def test_a_mistyped_input_or_a_taken_output_is_refused_before_the_model_loads(tmp_path):
    """The first mistakes (no such input, an output that exists) are answered before torch is
    imported: in a fraction of a second, not after the model's start-up."""
    (tmp_path / "taken.tif").write_bytes(b"")
    code = ("import sys; from click.testing import CliRunner; from geosat2map_cli.main import cli; "
            "a = CliRunner().invoke(cli, ['translate', 'nosuch.tif', 'out.tif']); "
            "b = CliRunner().invoke(cli, ['translate', sys.argv[1], 'taken.tif']); "
            "print(a.exit_code, b.exit_code, 'torch' in sys.modules); print(a.stderr.strip()); print(b.stderr.strip())")
    out = subprocess.run([sys.executable, "-c", code, str(SAMPLE_SCENE)], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout.splitlines()
    assert out == ["1 1 False", "geosat2map: error: input not found: nosuch.tif",
                   "geosat2map: error: taken.tif exists (pass --overwrite to replace it)"]


def test_preview_refuses_a_missing_or_unreadable_map_in_one_line(scene, tmp_path):
    png = tmp_path / "preview.png"
    assert_clean_failure(run("preview", scene, tmp_path / "nosuch.tif", png), png, "input not found")
    (tmp_path / "junk.tif").write_bytes(b"not a raster")
    assert_clean_failure(run("preview", scene, tmp_path / "junk.tif", png), png, "not a raster GDAL can read")
    with pytest.raises(InputError, match="at least 1 pixel on its long side, not 0"):  # the CLI's range refuses it too
        preview.side_by_side(scene, scene, png, size=0)
    assert not png.exists()


def test_preview_of_a_png_cut_short_is_one_line_and_leaves_nothing(tmp_path):
    """GDAL's fast whole-image PNG decoding read a PNG cut short, enlarged into a preview panel, as
    zeros with no error: the preview showed a black photo. Read row by row, the cut is reported."""
    whole, cut = tmp_path / "whole.png", tmp_path / "cut.png"
    noise = np.random.default_rng(0).integers(0, 256, (3, 200, 200), dtype=np.uint8)  # incompressible
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(whole, "w", driver="PNG", width=200, height=200, count=3, dtype="uint8") as dst:
            dst.write(noise)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    map_raster = write_scene(tmp_path / "map.tif", width=200, height=200, crs=None)
    png = tmp_path / "preview.png"
    assert_clean_failure(run("preview", cut, map_raster, png), png, f"reading {cut} failed")
    assert run("preview", whole, map_raster, png).exit_code == 0 and png.exists()


def test_preview_on_a_full_disk_is_one_line_and_leaves_nothing(scene, tmp_path, monkeypatch):
    def full_disk(*args) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(preview.os, "replace", full_disk)
    png = tmp_path / "preview.png"
    assert_clean_failure(run("preview", scene, scene, png), png, f"writing {png} failed (disk full?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == [scene.name]


def test_preview_of_a_map_of_part_of_a_scene_shows_that_part(tiny_weights, tmp_path):
    """A map made with --bounds (or --aoi) beside the scene under it, not the whole scene squeezed
    into the map's shape: the scene's west half is black, the map covers its east half."""
    data = np.full((3, 200, 400), 255, np.uint8)
    data[:, :, :200] = 0
    scene = write_scene(tmp_path / "scene.tif", width=400, height=200, data=data)
    out, png = tmp_path / "east.tif", tmp_path / "east.png"
    assert run("translate", scene, out, "--weights", tiny_weights, "--quiet", "--bounds", 500200, 4499800, 500400,
               4500000).exit_code == 0
    result = run("preview", scene, out, png, "--size", "100")
    assert result.exit_code == 0, result.output
    with rasterio.open(png) as p:
        photo = p.read()[:, :, :100]  # the left panel (a white gap, then the map, follow)
    # White; GDAL's bilinear shrink blends the first column with the black pixel west of the box.
    assert p.shape == (100, 208) and (photo[:, :, 1:] == 255).all() and photo.min() > 200


def test_train_on_a_missing_folder_prints_one_line_and_no_progress_bar(tmp_path):
    assert_clean_failure(run("train", tmp_path / "nosuch", "--out", tmp_path / "run"), tmp_path / "run",
                         "data folder not found")


@pytest.mark.parametrize("option, phrase", [
    (["--batch-size", "0"], "batch size must be at least 1"),
    (["--lr", "-1"], "learning rate must be a positive number"),
    (["--lr", "nan"], "learning rate must be a positive number, not nan"),  # was a traceback from Adam
    (["--lr", "inf"], "learning rate must be a positive number, not inf"),  # was a failed first step
    (["--lr-d", "0"], "discriminator's learning rate must be a positive number"),
    (["--lambda-l1", "nan"], "L1 weight must be a number, 0 or more, not nan"),  # NaN weights, saved
    (["--ema-decay", "nan"], "--ema-decay must be 0 (none) or more and under 1, not nan"),  # likewise
    (["--epochs", "0", "--epochs-decay", "0"], "nothing to train"),
    (["--epochs", "-1", "--epochs-decay", "5"], "0 or more, not -1 and 5"),  # 4 in all: was 'nothing to train'
    (["--crop-size", "128", "--load-size", "128"], "crop size must be a multiple of 256"),
    (["--ngf", "0"], "network widths must be at least 1"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--gsd", "-1"], "ground sampling distance must be positive"),  # translate would resample to it
])
def test_train_refuses_settings_that_cannot_train_before_making_the_run(tmp_path, option, phrase):
    """Each used to fail with a traceback from PyTorch a few steps in (or, for no epochs, train
    nothing) and leave a run folder behind."""
    out = tmp_path / "run"
    tiny = ["--max-steps", "1", "--ngf", "4", "--ndf", "4"]  # should a check go, fail in seconds (the option wins)
    assert_clean_failure(run("train", aligned_pairs(tmp_path / "pairs"), "--out", out, *tiny, *option), out, phrase)


def aligned_pairs(folder: Path, count: int = 3, width: int = 128) -> Path:
    """A pix2pix aligned folder of ``count`` random 64 x 64 pairs (``width`` 64: plain images)."""
    folder.mkdir()
    for i in range(count):
        pair = np.random.default_rng(i).integers(0, 255, (3, 64, width), dtype=np.uint8)
        with rasterio.open(folder / f"{i}.png", "w", driver="PNG", width=width, height=64, count=3,
                           dtype="uint8") as f:
            f.write(pair)
    return folder


def test_train_refuses_a_folder_of_plain_images(tmp_path):
    """Square images are not A|B pairs: split in two, they trained a model on unrelated halves."""
    out = tmp_path / "run"
    photos = aligned_pairs(tmp_path / "photos", width=64)
    result = run("train", photos, "--out", out, "--max-steps", "1", "--ngf", "4", "--ndf", "4", "--holdout", "0")
    assert_clean_failure(result, out, "an aligned pair is A and B side by side")


def test_evaluate_says_why_a_split_is_empty(tmp_path):
    data = aligned_pairs(tmp_path / "pairs")
    for holdout, phrase in (("0", "no val pairs in"), ("-1", "--holdout must be 0 (none) or more")):
        result = run("evaluate", data, "--split", "val", "--holdout", holdout)
        assert result.exit_code == 1 and result.stderr.strip().startswith("geosat2map: error:") \
            and phrase in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_evaluate_on_a_map_without_its_reference_names_map(scene):
    result = run("evaluate", scene)
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"geosat2map: error: {scene} is a file: score a translate output against a reference map with --map MAP, "
        "or a generator on a folder of pairs"]


def test_a_map_is_named_as_a_geotiff(scene, tiny_weights, tmp_path):
    """A map named map.png would be a GeoTIFF an image viewer cannot open: refused. In a folder,
    a scene in another format (here a GeoTIFF named .img) gets a .tif map."""
    png = tmp_path / "map.png"
    assert_clean_failure(run("translate", scene, png, "--weights", tiny_weights), png, "name it .tif or .tiff")
    other = tmp_path / "scenes" / "other.img"
    other.parent.mkdir()
    shutil.copy(scene, other)
    out = tmp_path / "maps"
    out.mkdir()
    result = run("translate", other, scene, out, "--weights", tiny_weights, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(["other.tif", Path(scene).name])
    clash = tmp_path / "scenes" / Path(scene).with_suffix(".img").name
    shutil.copy(scene, clash)
    result = run("translate", clash, scene, out, "--weights", tiny_weights, "--quiet", "--overwrite")
    assert result.exit_code == 1 and "outputs would collide" in result.stderr


def test_a_folder_as_input_says_how_to_pass_its_scenes(tiny_weights, tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    write_scene(folder / "a.tif", width=300, height=260)
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", folder, out, "--weights", tiny_weights), out,
                         f"input is a folder, not a raster: {folder} (for the scenes in it, pass '{folder}/*.tif')")
    (tmp_path / "maps").mkdir()
    result = run("translate", f"{folder}/*.tif", tmp_path / "maps", "--weights", tiny_weights, "--quiet")
    assert result.exit_code == 0, result.output  # the pattern it offers works
    assert (tmp_path / "maps" / "a.tif").exists()


def test_qgis_script_goes_to_the_default_profile_and_names_this_python(tmp_path, monkeypatch):
    """Without a folder, the Processing scripts folder of QGIS 3's default profile (under
    $XDG_DATA_HOME on Linux, as QGIS's own data location); the script runs this Python. Run in
    QGIS: tests/test_qgis.py."""
    if sys.platform in ("win32", "darwin"):
        pytest.skip("the Linux data location is tested here")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    result = run("qgis-script")
    assert result.exit_code == 0, result.output
    path = tmp_path / "QGIS" / "QGIS3" / "profiles" / "default" / "processing" / "scripts" / "geosat2map_translate.py"
    assert path.exists() and f"wrote {path}" in result.output
    text = path.read_text()
    assert f"PYTHON = {sys.executable!r}" in text and "class Geosat2mapTranslate(QgsProcessingAlgorithm)" in text
    compile(text, str(path), "exec")  # valid Python for QGIS to load
    assert run("qgis-script").exit_code == 1  # an installed copy stays unless --overwrite
    assert run("qgis-script", "--overwrite").exit_code == 0


def test_qgis_script_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    import geosat2map.qgis_script as qgis_script

    def full_disk(*args) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qgis_script.os, "replace", full_disk)
    result = run("qgis-script", tmp_path)
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_choice_lists_repeat_the_library_lists():
    """The CLI writes its choices out (it imports the library lazily, so `--help` stays fast) and the
    QGIS script lists the compressions for its dialog (it runs in QGIS's Python, without geosat2map):
    each must stay the library's list, or a new choice is missing from one of them."""
    import ast

    from geosat2map import devices, engine, train, writer
    from geosat2map.qgis_script import SCRIPT

    def choices(command: str, option: str) -> tuple[str, ...]:
        (param,) = [p for p in cli.commands[command].params if p.name == option]
        return tuple(param.type.choices)

    assert choices("translate", "compress") == writer.COMPRESSIONS
    assert choices("translate", "backend") == engine.BACKENDS
    assert choices("translate", "precision") == choices("evaluate", "precision") == engine.PRECISIONS
    assert choices("train", "precision") == devices.PRECISIONS
    assert choices("train", "storage_aware") == train.STORAGE_AWARE
    (listed,) = [ast.literal_eval(node.value) for node in ast.walk(ast.parse(SCRIPT.read_text()))
                 if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["COMPRESSIONS"]]
    assert tuple(name for name, _ in listed) == writer.COMPRESSIONS


def test_preview_reads_through_a_small_gdal_cache(scene, tmp_path, monkeypatch):
    """A shrunk read decodes each block once: GDAL's default cache (5 % of memory) would only fill
    with them (716 MB of RSS for a 10000 x 10000 scene without overviews, 130 MB in 16 MiB)."""
    import rasterio.env

    from geosat2map import reader

    seen = []
    original = reader.Scene.read_decimated

    def spy(self, *args, **kwargs):
        seen.append(rasterio.env.getenv().get("GDAL_CACHEMAX"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(reader.Scene, "read_decimated", spy)
    png = tmp_path / "p.png"
    preview.side_by_side(scene, scene, png, size=64)
    assert png.exists() and seen == [preview.PREVIEW_GDAL_CACHE]


@pytest.mark.parametrize("args, out, phrase", [
    (["preview", "{scene}", "{scene}"], "preview.txt", "the preview is a PNG: name it .png"),
    (["export-onnx", "default"], "model.txt", "the model is an ONNX file: name it .onnx"),
    (["export-weights", "{tmp}"], "model.pt", "weights are a safetensors file: name it .safetensors"),
    (["average-weights", "--data", "{tmp}", "{weights}", "{weights}"], "model.pt", "weights are a safetensors file"),
    (["render-map", "{tmp}/roads.gpkg", "--like", "{scene}"], "map.png", "the map is a GeoTIFF"),
])
def test_every_output_is_named_for_its_format(args, out, phrase, scene, tiny_weights, tmp_path):
    """A file is opened by what its ending names: a PNG preview named .txt, or weights named .pt
    (which torch.load would unpickle), are refused before any work, in one line."""
    dst = tmp_path / out
    fill = {"scene": scene, "tmp": tmp_path, "weights": tiny_weights}
    assert_clean_failure(run(*[a.format(**fill) for a in args], dst), dst, phrase)


def test_dry_run_plans_the_map_as_translate_makes_it_and_writes_nothing(tiny_weights_gsd, tmp_path, monkeypatch):
    """--dry-run: the map's size, resolution, CRS, bands and tile count, as the real run then makes
    it, with no model loaded and nothing written; with several scenes, one that fails is reported
    and the others planned."""
    from geosat2map import pipeline, weights

    scene = write_scene(tmp_path / "scene.tif", width=700, height=900)  # 1 m pixels; the model's are 2 m
    out = tmp_path / "map.tif"

    def no_model(*_, **__):
        raise AssertionError("a dry run loaded the model")

    with monkeypatch.context() as m:
        m.setattr(weights, "load_generator", no_model)
        m.setattr(pipeline, "load_generator", no_model)
        result = run("translate", scene, out, "--weights", tiny_weights_gsd, "--dry-run")
        assert result.exit_code == 0, result.output
        planned = result.stdout
        bad = tmp_path / "notes.txt"
        bad.write_text("not a raster")
        folder = tmp_path / "maps"
        folder.mkdir()
        several = run("translate", scene, bad, folder, "--weights", tiny_weights_gsd, "--dry-run")
    assert not out.exists() and not any(folder.iterdir())
    assert several.exit_code == 1 and "notes.txt is not a raster" in several.stderr
    assert several.stdout.startswith(f"would write {folder / 'scene.tif'}: ")
    made = run("translate", scene, out, "--weights", tiny_weights_gsd, "--quiet")
    assert made.exit_code == 0, made.output
    with rasterio.open(out) as dst:
        tiles = re.search(r"(\d+)/\d+ tiles computed", made.stdout).group(1)
        assert planned.strip() == (f"would write {out}: {dst.width} x {dst.height}, 2.00 m/px, EPSG:32633, bands "
                                   f"1,2,3, {tiles} tiles of 256 overlapping by 64")
    assert_clean_failure(run("translate", scene, out, "--weights", tiny_weights_gsd, "--dry-run"), tmp_path / "x",
                         "exists (pass --overwrite")
    # A scene that marks nodata, valid everywhere: every tile computed, so nothing more to say.
    masked = write_scene(tmp_path / "masked.tif", width=700, height=900, nodata=0)
    plan = run("translate", masked, tmp_path / "m.tif", "--weights", tiny_weights_gsd, "--dry-run")
    assert plan.stdout.strip().endswith(f" {tiles} tiles of 256 overlapping by 64")


def test_dry_run_counts_the_tiles_with_data_a_run_computes(tiny_weights_gsd, tmp_path, monkeypatch):
    """A scene nodata but for a diagonal band (a rotated strip's footprint): the plan counts the
    tiles with data from the scene's mask, the ones the run computes; a large scene's mask is
    sampled, and its count says so."""
    from geosat2map import pipeline

    from .conftest import synthetic_image

    data = synthetic_image(1400, 1200, 3)
    yy, xx = np.mgrid[:1400, :1200]
    data[:, np.abs(yy - xx) > 150] = 0
    scene = write_scene(tmp_path / "band.tif", width=1200, height=1400, nodata=0, data=data)
    plan = run("translate", scene, tmp_path / "m.tif", "--weights", tiny_weights_gsd, "--dry-run")
    planned = re.search(r"(\d+) tiles of 256 overlapping by 64, (\d+) with data \(the rest wholly nodata: skipped\)$",
                        plan.stdout.strip())
    assert planned, plan.stdout
    made = run("translate", scene, tmp_path / "m.tif", "--weights", tiny_weights_gsd, "--quiet")
    computed, tiles = map(int, re.search(r"(\d+)/(\d+) tiles computed", made.stdout).groups())
    assert (int(planned.group(1)), int(planned.group(2))) == (tiles, computed) and computed < tiles
    monkeypatch.setattr(pipeline, "PLAN_MASK_SIDE", 100)  # this scene's 600 x 700 map: read every 7 pixels
    sampled = run("translate", scene, tmp_path / "n.tif", "--weights", tiny_weights_gsd, "--dry-run")
    assert sampled.stdout.strip().endswith(f", about {computed} with data (its mask read every 7 pixels)")
