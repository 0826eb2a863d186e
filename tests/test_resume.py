"""translate --resume: an interrupted run keeps its finished rows and a resumed run ends as if never stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geosat2map import ModelSpec, save_generator, translate
from geosat2map.errors import InputError, Interrupted
from geosat2map_cli.main import cli

from .conftest import random_generator, stop_after, write_scene

PARTIAL, RECORD = ".map.tif.part.tif", ".map.tif.part.json"


@pytest.fixture
def scene(tmp_path) -> Path:
    """1500 rows (6 block rows) with a nodata corner, so masks have to survive the resume too."""
    data = write_scene(tmp_path / "src.tif", width=700, height=1500, nodata=0)
    with rasterio.open(data, "r+") as ds:
        corner = ds.read()
        corner[:, :300, :200] = 0
        ds.write(corner)
    return data


def content(path: Path) -> tuple:
    with rasterio.open(path) as ds:
        tags = {k: v for k, v in ds.tags().items() if k != "TIFFTAG_DATETIME"}  # the same but for the time
        return (ds.read(), ds.dataset_mask(), ds.transform, ds.crs, ds.overviews(1), ds.profile["compress"],
                [ds.read(1, out_shape=(1, ds.height // f, ds.width // f)).sum() for f in ds.overviews(1)], tags)


def assert_same_map(a: Path, b: Path, tags: bool = True) -> None:
    """Pixels, mask, georeferencing, overviews and compression alike (and tags, but the time)."""
    for x, y in zip(content(a)[: None if tags else -1], content(b)[: None if tags else -1]):
        assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y


@pytest.mark.parametrize("on_device, compress", [(False, "zstd"), (True, "zstd"), (False, "jpeg")])
def test_interrupted_twice_and_resumed_equals_an_uninterrupted_run(scene, tiny_weights, tmp_path, monkeypatch,
                                                                   on_device, compress):
    """Also on the GPU path (run here on the CPU), which hands the writer whole rows, and in JPEG,
    whose kept rows must not be encoded twice."""
    if on_device:
        import geosat2map.pipeline as pipeline
        from geosat2map.engine import InferenceEngine

        monkeypatch.setattr(pipeline, "_blend_on_device", lambda engine, grid: isinstance(engine, InferenceEngine))
    whole = tmp_path / "whole.tif"
    uninterrupted = translate(scene, whole, weights=tiny_weights, batch_size=3, compress=compress)
    out = tmp_path / "map.tif"
    total = 4 * 8  # 700 x 1500 with 256-pixel tiles and 64 overlap: 4 columns, 8 rows
    with pytest.raises(Interrupted, match="rows are kept"):
        translate(scene, out, weights=tiny_weights, batch_size=3, progress=stop_after(20), compress=compress)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PARTIAL, RECORD, "src.tif", "whole.tif"])
    # A second interruption, later in the resumed run, keeps more rows.
    with pytest.raises(Interrupted):
        translate(scene, out, weights=tiny_weights, batch_size=5, resume=True, progress=stop_after(total - 6),
                  compress=compress)
    result = translate(scene, out, weights=tiny_weights, batch_size=2, resume=True, compress=compress)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif", "src.tif", "whole.tif"]
    assert_same_map(whole, out)
    # (Not byte for byte: where GDAL places each block depends on when its cache flushes, which
    # varies between uninterrupted runs too.)
    assert result.tiles_computed == uninterrupted.tiles_computed == total


@pytest.mark.parametrize("options", [{}, {"cog": True}, {"compress": "jpeg"}])
def test_interrupted_while_the_map_is_finished_keeps_every_row_for_resume(scene, tiny_weights, tmp_path,
                                                                           monkeypatch, options):
    """Stopped after every tile was computed, while the overviews or the COG or JPEG copy were
    made (minutes for a large map): the run was thrown away. Its rows are kept; --resume finishes it."""
    whole = tmp_path / "whole.tif"
    translate(scene, whole, weights=tiny_weights, **options)
    out = tmp_path / "map.tif"
    real_replace = os.replace

    def stopped_before_the_rename(src, dst) -> None:  # the finished file's rename into place: the last step
        if Path(dst) == out:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", stopped_before_the_rename)
    with pytest.raises(Interrupted, match="all 1500 rows are kept; the same command with --resume finishes the map"):
        translate(scene, out, weights=tiny_weights, **options)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PARTIAL, RECORD, "src.tif", "whole.tif"])
    assert json.loads((tmp_path / RECORD).read_text())["rows"] == 1500
    result = translate(scene, out, weights=tiny_weights, resume=True, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif", "src.tif", "whole.tif"]
    assert_same_map(whole, out)
    assert result.tiles_computed == 4 * 8


@pytest.mark.parametrize("options", [{}, {"cog": True}])
def test_a_stop_once_the_map_is_in_place_says_it_is_whole(scene, tiny_weights, tmp_path, monkeypatch, options):
    """Stopped just after the finished map's rename: it said "interrupted" with nothing kept,
    though the map was whole at the destination."""
    whole = tmp_path / "whole.tif"
    translate(scene, whole, weights=tiny_weights, **options)
    out = tmp_path / "map.tif"
    real_replace = os.replace

    def stopped_after_the_rename(src, dst) -> None:
        real_replace(src, dst)
        if Path(dst) == out:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stopped_after_the_rename)
    with pytest.raises(Interrupted, match="map.tif was finished before the stop: the map is whole"):
        translate(scene, out, weights=tiny_weights, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif", "src.tif", "whole.tif"]
    assert_same_map(whole, out)


def test_interrupted_before_a_block_row_is_done_keeps_nothing(scene, tiny_weights, tmp_path):
    out = tmp_path / "map.tif"
    with pytest.raises(KeyboardInterrupt) as info:
        translate(scene, out, weights=tiny_weights, progress=stop_after(2))
    assert not isinstance(info.value, Interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.tif"]


def test_resume_refuses_other_options_input_or_nothing(scene, tiny_weights, tmp_path):
    out = tmp_path / "map.tif"
    with pytest.raises(InputError, match="nothing to resume"):
        translate(scene, out, weights=tiny_weights, resume=True)
    with pytest.raises(Interrupted):
        translate(scene, out, weights=tiny_weights, progress=stop_after(25))
    with pytest.raises(InputError, match="overlap=64"):
        translate(scene, out, weights=tiny_weights, overlap=32, resume=True)
    with pytest.raises(InputError, match="crop="):  # the scene's origin is (500000, 4500000), 1 m pixels
        translate(scene, out, weights=tiny_weights, bounds=(500000, 4498600, 500700, 4500000), resume=True)
    with pytest.raises(InputError, match="compress='zstd', not 'jpeg'"):
        translate(scene, out, weights=tiny_weights, compress="jpeg", resume=True)
    with pytest.raises(InputError, match="src_nodata=None, not '0.0'"):
        translate(scene, out, weights=tiny_weights, src_nodata=0, resume=True)
    os.utime(scene, ns=(1, 1))
    with pytest.raises(InputError, match="another input file"):
        translate(scene, out, weights=tiny_weights, resume=True)
    assert (tmp_path / PARTIAL).exists() and (tmp_path / RECORD).exists()  # refusals keep the partial
    # Starting over without --resume replaces the partial output, and says so.
    result = translate(scene, out, weights=tiny_weights)
    assert any("replaced" in n for n in result.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif", "src.tif"]
    # A record from before compress and quality were recorded: made in ZSTD, as every run then was.
    with pytest.raises(Interrupted):
        translate(scene, out, weights=tiny_weights, progress=stop_after(25), overwrite=True)
    record = json.loads((tmp_path / RECORD).read_text())
    del record["options"]["compress"], record["options"]["quality"]
    (tmp_path / RECORD).write_text(json.dumps(record))
    with pytest.raises(InputError, match="compress='zstd', not 'webp'"):
        translate(scene, out, weights=tiny_weights, compress="webp", resume=True, overwrite=True)
    # A record damaged or edited into other JSON: one line, the partial kept for a run without --resume.
    for damaged in ([record], {**record, "options": []}, {**record, "rows": "768"},
                    {k: v for k, v in record.items() if k != "computed"},
                    {**record, "options": {**record["options"], "backend": 5}}):
        (tmp_path / RECORD).write_text(json.dumps(damaged))
        with pytest.raises(InputError, match=r"the progress record .* is unreadable; run without --resume"):
            translate(scene, out, weights=tiny_weights, resume=True, overwrite=True)
    (tmp_path / RECORD).write_text(json.dumps(record))
    advances: list[int] = []
    translate(scene, out, weights=tiny_weights, resume=True, overwrite=True, progress=lambda a, t: advances.append(a))
    assert advances[0] > 1 and sum(advances) == 32  # the kept rows' tiles counted at once: it resumed


def test_cli_interrupt_message_and_resume_flag(scene, tiny_weights, tmp_path, monkeypatch):
    import geosat2map.pipeline as pipeline

    out = tmp_path / "map.tif"
    real = pipeline.translate

    def interrupted(*args, **kwargs):
        kwargs["progress"] = stop_after(13)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "translate", interrupted)
    first = CliRunner().invoke(cli, ["translate", str(scene), str(out), "--weights", str(tiny_weights), "--quiet"])
    assert first.exit_code == 130
    assert first.stderr.strip().splitlines() == [
        "geosat2map: interrupted: 512 of 1500 rows are kept; the same command with --resume continues"
    ]
    monkeypatch.setattr(pipeline, "translate", real)
    second = CliRunner().invoke(cli, ["translate", str(scene), str(out), "--weights", str(tiny_weights), "--quiet",
                                      "--resume"])
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif", "src.tif"]


def test_a_second_run_on_the_same_output_is_refused_while_one_writes(scene, tiny_weights, tmp_path):
    import fcntl

    out = tmp_path / "map.tif"
    lock = tmp_path / ".map.tif.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(Exception, match="another geosat2map run is writing"):
            translate(scene, out, weights=tiny_weights)
    finally:
        os.close(fd)
    assert not out.exists()


def test_a_file_system_without_locks_still_gets_its_map(scene, tiny_weights, tmp_path, monkeypatch):
    """flock fails with ENOLCK on some NFS, SMB and FUSE mounts: it was a traceback."""
    import errno

    import geosat2map.writer as writer

    def no_locks(fd, operation) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(writer.fcntl, "flock", no_locks)
    translate(scene, tmp_path / "map.tif", weights=tiny_weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif", "src.tif"]


def test_a_resume_that_fails_before_its_copy_is_done_keeps_the_partial(scene, tiny_weights, tmp_path, monkeypatch):
    from geosat2map.errors import OutputError
    from geosat2map.writer import GeoTIFFWriter

    out = tmp_path / "map.tif"
    with pytest.raises(Interrupted):
        translate(scene, out, weights=tiny_weights, progress=stop_after(20))
    kept = (tmp_path / PARTIAL).read_bytes()

    def broken(self):
        raise OutputError("simulated failure while copying")

    monkeypatch.setattr(GeoTIFFWriter, "_copy_previous", broken)
    with pytest.raises(OutputError, match="simulated"):
        translate(scene, out, weights=tiny_weights, resume=True)
    assert (tmp_path / PARTIAL).read_bytes() == kept and (tmp_path / RECORD).exists()
    monkeypatch.undo()
    translate(scene, out, weights=tiny_weights, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif", "src.tif"]


#: A translate that SIGKILLs its own process once the writer has written the block row at or
#: below KILL_AT (argv: scene, dst, weights, KILL_AT, resume 0/1), checkpointing at every block row.
KILLED_RUN = """
import os, signal, sys
import geosat2map.writer as writer
from geosat2map import translate

writer.CHECKPOINT_SECONDS = 0.0
write = writer.GeoTIFFWriter._write

def write_then_die(self, window, pixels, valid):
    write(self, window, pixels, valid)
    if window.row_off >= int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)

writer.GeoTIFFWriter._write = write_then_die
translate(sys.argv[1], sys.argv[2], weights=sys.argv[3], resume=sys.argv[5] == "1", backend="torch")
"""


def _killed(scene: Path, out: Path, weights: Path, kill_at: int, resume: bool = False) -> None:
    run = subprocess.run([sys.executable, "-c", KILLED_RUN, str(scene), str(out), str(weights), str(kill_at),
                          str(int(resume))], capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr


def test_a_killed_run_resumes_from_its_last_checkpoint(scene, tiny_weights, tmp_path):
    """SIGKILL (no handler runs): the partial file as of the last checkpoint is what is resumed;
    the block row written after it, past the file's block index, is computed again. A resume
    killed while it copies the kept rows keeps them too (in .prev) for the next."""
    whole = tmp_path / "whole.tif"
    translate(scene, whole, weights=tiny_weights, backend="torch")
    out = tmp_path / "map.tif"
    _killed(scene, out, tiny_weights, kill_at=768)
    assert json.loads((tmp_path / RECORD).read_text())["rows"] == 768 and not out.exists()
    _killed(scene, out, tiny_weights, kill_at=0, resume=True)  # dies on the first row it copies
    assert (tmp_path / ".map.tif.part.prev.tif").exists()
    translate(scene, out, weights=tiny_weights, backend="torch", resume=True)
    assert_same_map(whole, out)
    # A run started afresh over such leftovers (.prev of 768 rows), killed in turn, resumes from
    # its own rows, not the leftovers'.
    out.unlink()
    _killed(scene, out, tiny_weights, kill_at=768)
    _killed(scene, out, tiny_weights, kill_at=0, resume=True)
    assert (tmp_path / ".map.tif.part.prev.tif").exists()
    _killed(scene, out, tiny_weights, kill_at=1024)
    assert json.loads((tmp_path / RECORD).read_text())["rows"] == 1024
    result = translate(scene, out, weights=tiny_weights, backend="torch", resume=True)
    assert_same_map(whole, out)
    assert result.tiles_computed == 4 * 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif", "src.tif", "whole.tif"]


@pytest.mark.parametrize("where", ["record", "commit"])
def test_a_run_that_fails_after_checkpoints_leaves_nothing(scene, tiny_weights, tmp_path, monkeypatch, where):
    """A full disk when a checkpoint's record is saved is one line; a failure when the map is
    finished (after records were saved) takes the record with the partial file."""
    import geosat2map.files as files
    import geosat2map.writer as writer
    from geosat2map.errors import OutputError

    def full_disk(*args) -> None:
        raise OSError(28, "No space left on device")

    def failed_commit(self) -> None:
        raise OutputError("finishing the map failed: No space left on device")

    monkeypatch.setattr(writer, "CHECKPOINT_SECONDS", 0.0)
    if where == "record":  # the record's own write fails (its module's os, not the writer's)
        monkeypatch.setattr(files, "os", SimpleNamespace(fsync=full_disk, replace=os.replace, getpid=os.getpid))
    else:
        monkeypatch.setattr(writer.GeoTIFFWriter, "commit", failed_commit)
    with pytest.raises(OutputError, match="No space left on device"):
        translate(scene, tmp_path / "map.tif", weights=tiny_weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.tif"]


def test_an_interrupt_whose_rows_cannot_be_kept_says_why_and_leaves_nothing(scene, tiny_weights, tmp_path,
                                                                           monkeypatch):
    import geosat2map.files as files

    def full_disk(fd) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "os", SimpleNamespace(fsync=full_disk, replace=os.replace, getpid=os.getpid))
    with pytest.raises(KeyboardInterrupt, match=r"keeping the \d+ rows done failed \(No space left on device\): "
                                                "nothing to resume") as stopped:
        translate(scene, tmp_path / "map.tif", weights=tiny_weights, progress=stop_after(25))
    assert not isinstance(stopped.value, Interrupted)  # no --resume to offer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.tif"]


def test_a_resumed_batch_keeps_finished_maps_resumes_partial_ones_and_starts_the_rest(scene, tiny_weights,
                                                                                      tmp_path):
    """The batch was stopped in its second scene: its first map is kept, the second resumed (and
    ends as if never stopped), the third made; a map by another model is not taken for finished."""
    from geosat2map.pipeline import FinishedMap, translate_many

    scenes = [scene.rename(tmp_path / "a.tif")] + [Path(shutil.copy(tmp_path / "a.tif", tmp_path / f"{n}.tif"))
                                                    for n in ("b", "c")]
    maps = tmp_path / "maps"
    maps.mkdir()
    translate(scenes[0], maps / "a.tif", weights=tiny_weights)
    with pytest.raises(Interrupted):
        translate(scenes[1], maps / "b.tif", weights=tiny_weights, progress=stop_after(20))
    # What the resumed batch will do, planned (--dry-run): keep, continue, start.
    plan = CliRunner().invoke(cli, ["translate", *map(str, scenes), str(maps), "--weights", str(tiny_weights),
                                    "--resume", "--dry-run"])
    rows = json.loads((maps / ".b.tif.part.json").read_text())["rows"]
    assert plan.exit_code == 0 and plan.stdout.splitlines()[0] == (
        f"would keep {maps / 'a.tif'}: finished before (if made from this scene by this model with these options)")
    assert plan.stdout.splitlines()[1].endswith(f"; continuing its partial output, {rows} of 1500 rows kept")
    assert plan.stdout.splitlines()[2].endswith(" 32 tiles of 256 overlapping by 64")  # its mask: data everywhere
    alone = CliRunner().invoke(cli, ["translate", str(scenes[2]), str(maps / "c.tif"), "--weights",
                                     str(tiny_weights), "--resume", "--dry-run"])  # as the run: nothing to resume
    assert alone.exit_code == 1 and alone.stderr.startswith("geosat2map: error: nothing to resume for ")
    outcomes = dict(translate_many(scenes, maps, weights=tiny_weights, resume=True))
    assert isinstance(outcomes[scenes[0]], FinishedMap)
    assert outcomes[scenes[1]].tiles_computed == outcomes[scenes[2]].tiles_computed == 32  # counted over both runs
    assert_same_map(maps / "b.tif", maps / "c.tif", tags=False)  # the same scene, under two names
    assert sorted(p.name for p in maps.iterdir()) == ["a.tif", "b.tif", "c.tif"]
    again = CliRunner().invoke(cli, ["translate", *map(str, scenes), str(maps), "--weights", str(tiny_weights),
                                     "--resume", "--quiet"])
    assert again.exit_code == 0 and again.stdout.splitlines() == [
        f"kept {maps / n}: finished before" for n in ("a.tif", "b.tif", "c.tif")], again.output
    # A map made by other weights is the user's to replace, not a finished part of this batch.
    save_generator(random_generator(seed=1), ModelSpec(ngf=8), tmp_path / "other.safetensors")
    other = translate_many(scenes[:1], maps, weights=tmp_path / "other.safetensors", resume=True)
    assert "is not this scene's map by this model" in str(dict(other)[scenes[0]])
    # One scene: a run that had finished, run again with --resume (a requeued job), keeps its map.
    one = CliRunner().invoke(cli, ["translate", str(scenes[0]), str(maps / "a.tif"), "--weights", str(tiny_weights),
                                   "--resume"])
    assert one.exit_code == 0 and one.stdout == f"kept {maps / 'a.tif'}: finished before\n", one.output
    mismatch = CliRunner().invoke(cli, ["translate", str(scenes[1]), str(maps / "a.tif"), "--weights",
                                        str(tiny_weights), "--resume"])
    assert mismatch.exit_code == 1 and "is not this scene's map by this model" in mismatch.stderr
    # Nor is a map asked for another way: the command run again with another option makes its own.
    resized = CliRunner().invoke(cli, ["translate", str(scenes[0]), str(maps / "a.tif"), "--weights",
                                       str(tiny_weights), "--resume", "--overlap", "32", "--compress", "deflate"])
    assert resized.exit_code == 1 and resized.stderr.count("\n") == 1, resized.output
    assert "was made with other options (compress 'zstd', not 'deflate'; overlap 64, not 32)" in resized.stderr
    other = translate_many(scenes[:1], maps, weights=tiny_weights, resume=True, resolution=1.0)
    assert "was made with other options (resolution 'model', not 1.0)" in str(dict(other)[scenes[0]])
    # Its record edited by hand (gdal_edit.py -mo) into text that is not an object of options.
    for edited in ("[1, 2]", "{cut"):
        with rasterio.open(maps / "a.tif", "r+") as dst:
            dst.update_tags(GEOSAT2MAP_OPTIONS=edited)
        outcome = dict(translate_many(scenes[:1], maps, weights=tiny_weights, resume=True))[scenes[0]]
        assert "exists and does not record the options it was made with" in str(outcome), edited
