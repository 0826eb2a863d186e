"""geosat2map info: what a weights file is, read from its header."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import rasterio
import torch
from safetensors.torch import load_file

from geosat2map import weights
from geosat2map.weights import ModelSpec, load_generator, model_digest, save_generator

from .conftest import random_generator, run


def test_info_reports_the_file_and_its_spec(tiny_weights, tiny_weights_gsd):
    result = run("info", tiny_weights, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["sha256"] == hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    assert d["bytes"] == tiny_weights.stat().st_size and d["dtype"] == "float32"
    assert d["parameters"] == sum(p.numel() for p in random_generator().parameters())
    assert d["spec"]["ngf"] == 8 and d["spec"]["gsd_m"] is None
    assert d["model_sha256"] == model_digest(load_generator(tiny_weights)[0]) != d["sha256"]
    text = run("info", tiny_weights).stdout
    assert "width 8" in text and "no ground sampling distance" in text
    assert "trained at 2.00 m/pixel" in run("info", tiny_weights_gsd).stdout


def test_info_of_the_shipped_model():
    result = run("info")
    assert result.exit_code == 0, result.output
    # int4 codes: the score is labelled, the file's own or that of its weights before rounding
    assert "float16" in result.stdout and re.search(r"held-out pairs \(110, (as stored|scored before storage)\)",
                                                   result.stdout)
    assert result.stdout == run("info", "default").stdout
    assert re.search(r"(; trained on|, each trained on) \S*maps_train", result.stdout)


def test_info_of_a_map_says_how_it_was_made_and_by_which_model(tiny_weights, scene, tmp_path):
    """A map translate wrote records its scene, model digest, resolution and tiling; info reads
    them back and says whether the model is the shipped one. Any other raster: one line."""
    from geosat2map import translate

    out = translate(scene, tmp_path / "map.tif", weights=tiny_weights).dst
    result = run("info", out, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["GEOSAT2MAP_MODEL_SHA256"] == model_digest(load_generator(tiny_weights)[0])
    assert d["GEOSAT2MAP_SOURCE"] == "scene.tif" and d["shipped_model"] is False
    assert (d["width"], d["height"], d["crs"]) == (600, 500, "EPSG:32633")
    text = run("info", out).stdout.splitlines()
    assert text[0].startswith(f"{out}: a map of 600 x 500 pixels (EPSG:32633), made by geosat2map ")
    assert text[0].endswith(" from scene.tif") and "(not the shipped model;" in text[1]
    assert text[-1] == "asked with the defaults"
    shipped = translate(scene, tmp_path / "shipped.tif", bands=[3, 2, 1], overlap=32, compress="deflate").dst
    d = json.loads(run("info", shipped, "--json").stdout)
    assert d["shipped_model"] is True and d["GEOSAT2MAP_OPTIONS"]["bands"] == [3, 2, 1]
    assert run("info", shipped).stdout.splitlines()[-1] == "asked with --bands 3,2,1 --compress deflate --overlap 32"
    for edited in ("[3, 2, 1]", "{cut"):  # the record edited by hand (gdal_edit.py -mo): reported, not a traceback
        with rasterio.open(shipped, "r+") as dst:
            dst.update_tags(GEOSAT2MAP_OPTIONS=edited)
        text = run("info", shipped)
        assert text.exit_code == 0 and text.stdout.splitlines()[-1] == \
            "the options it was asked with: unreadable (GEOSAT2MAP_OPTIONS is not a JSON object)", text.output
        assert json.loads(run("info", shipped, "--json").stdout)["GEOSAT2MAP_OPTIONS"] is None
    with rasterio.open(shipped, "r+") as dst:  # an object, with a DEM that is not a path: preview places no DEM
        dst.update_tags(GEOSAT2MAP_OPTIONS='{"rpc_dem": 5}')
    pictured = run("preview", scene, shipped, tmp_path / "p.png")
    assert pictured.exit_code == 0 and (tmp_path / "p.png").exists(), pictured.output
    assert run("info", shipped).stdout.splitlines()[-1] == "asked with --rpc-dem 5"
    result = run("info", scene)
    assert result.exit_code == 1 and result.output.strip() == \
        f"geosat2map: error: {scene} is a raster, but not a map geosat2map made: it records no GEOSAT2MAP tags " \
        "(translate --dry-run plans the map of a scene)"


def test_info_of_a_file_that_is_not_weights(tmp_path):
    bogus = tmp_path / "notes.safetensors"
    bogus.write_text("hello")
    result = run("info", bogus)
    assert result.exit_code != 0 and result.stderr.startswith("geosat2map: error:")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("edit, phrase", [
    ({"ngf": "8"}, 'ngf is "8", not a whole number'), ({"ngf": 8.0}, "ngf is 8.0, not a whole number"),
    ({"in_channels": 0}, "in_channels is 0, not a size"), ({"gsd_m": True}, "gsd_m is true, not a number or null"),
    ({"provenance": [1]}, "provenance is [1], not an object"), (None, "has unreadable metadata (not a JSON object)"),
    ({"padding": "reflect", "attention": 1}, ": describes the model with attention, padding, which this version of "
                                             "geosat2map does not know: made by a newer one?")])
def test_weights_whose_description_was_edited_are_one_line_naming_the_field(tiny_weights, tmp_path, edit, phrase):
    """A weights file's metadata is JSON another tool may have written: a wrong type is named
    before the network is built (it was a TypeError from its constructor, or a traceback in info)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_weights), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    described = [1] if edit is None else {**json.loads(meta["geosat2map"]), **edit}
    save_file(tensors, tmp_path / "edited.safetensors", metadata={**meta, "geosat2map": json.dumps(described)})
    for command in (["info", tmp_path / "edited.safetensors"],
                    ["export-onnx", tmp_path / "edited.safetensors", tmp_path / "m.onnx"]):
        result = run(*command)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1 and phrase in result.stderr, result.output
        assert result.stderr.startswith(f"geosat2map: error: {tmp_path / 'edited.safetensors'}")
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_description_takes_numpy_numbers_from_python_and_names_a_wrong_one():
    """The field check serves Python callers too: NumPy's scalars are numbers, a float is no width."""
    import numpy as np

    assert ModelSpec(ngf=np.int64(8), gsd_m=np.float32(2.0)).build() is not None
    with pytest.raises(weights.WeightsError, match=r"ngf is np.float32\(8.0\), not a whole number"):
        ModelSpec(ngf=np.float32(8))


def test_weights_whose_provenance_another_tool_wrote_are_described_without_it(tiny_weights, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_weights), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    described = {**json.loads(meta["geosat2map"]), "provenance": {"val": {"rmse": "low"}, "fine_tuned_from": "x"}}
    save_file(tensors, tmp_path / "other.safetensors", metadata={**meta, "geosat2map": json.dumps(described)})
    result = run("info", tmp_path / "other.safetensors")
    assert result.exit_code == 0 and "width 8" in result.stdout, result.output
    assert result.stdout.splitlines()[-1] == "its provenance is not as geosat2map writes it (--json: as recorded)"
    assert json.loads(run("info", tmp_path / "other.safetensors", "--json").stdout)["spec"]["provenance"] == \
        described["provenance"]


def test_a_training_run_given_as_weights_says_how_to_export_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    result = run("export-onnx", run_dir, tmp_path / "m.onnx")
    assert result.exit_code == 1 and "is a training run, not a weights file" in result.stderr
    assert f"geosat2map export-weights {run_dir}" in result.stderr
    assert run("info", tmp_path).stderr.strip().endswith("is a folder, not a weights file")
    (tmp_path / "starting").mkdir()  # train's folder while its data loads, before config.json is written
    assert run("info", tmp_path / "starting").stderr.strip().endswith(
        "is a folder, not a weights file (empty: a training run just started has no config.json yet)")
    # info reads a run folder as a run: this one's settings are damaged, and it says so in one line
    damaged = run("info", run_dir)
    assert damaged.exit_code == 1 and damaged.stderr == \
        f"geosat2map: error: the run's {run_dir / 'config.json'} is unreadable: it does not say data or out\n"


def test_a_run_whose_history_was_edited_is_described_from_what_reads(tmp_path):
    from geosat2map.run_info import read_run

    (tmp_path / "config.json").write_text(json.dumps({"data": "d", "out": str(tmp_path), "ngf": 8}))
    (tmp_path / "history.jsonl").write_text('{"epoch": 1, "val": {"rmse": "low"}}\n[2]\n'
                                            '{"epoch": 3, "val": {"rmse": 30.5, "acc5": 0.25}}\n')
    described = read_run(tmp_path)
    assert [r["epoch"] for r in described.history] == [1, 3] and described.unreadable_lines == 1
    assert described.best()["epoch"] == 3 and not described.resumable
    (tmp_path / "config.json").write_text(json.dumps({"data": ["d", "e"], "out": str(tmp_path), "ngf": 8}))
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # resumable: the command to continue it names both folders
    assert f"`geosat2map train d e --out {tmp_path} --resume` continues it" in run("info", tmp_path).stdout
    text = run("info", tmp_path)
    assert text.exit_code == 0 and "last, the best: epoch 3, step ?: held out RMSE 30.50  acc@5 0.2500" in text.stdout
    assert read_run(tmp_path).position is None  # an empty checkpoint: no position, still resumable
    # A weight average's last epoch where the trained weights scored better: how to export them.
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"epoch": 4, "val": {"rmse": 30.0, "acc5": 0.3}, "val_online": {"rmse": 29.5, "acc5": 0.31}}\n')
    hint = f"its trained weights (not the average) at epoch 4: held out RMSE 29.50  acc@5 0.3100; `geosat2map " \
           f"export-weights {tmp_path} OUT.safetensors --which trained` makes a weights file of them"
    assert hint not in run("info", tmp_path).stdout.splitlines()  # no trained weights saved: nothing to export
    (tmp_path / "trained_generator.safetensors").write_bytes(b"")
    assert hint in run("info", tmp_path).stdout.splitlines()
    with open(tmp_path / "history.jsonl", "a") as f:  # the average better again: no hint
        f.write('{"epoch": 5, "val": {"rmse": 29.0}, "val_online": {"rmse": 29.2}}\n')
    assert "its trained weights" not in run("info", tmp_path).stdout


def test_int4_weights_load_within_half_a_level_gap_and_the_rest_as_int8(tmp_path, monkeypatch):
    model = random_generator()
    monkeypatch.setattr(weights, "INT8_MIN_ELEMENTS", 1)
    monkeypatch.setattr(weights, "INT4_MIN_ELEMENTS", 4096)  # the larger convolutions in 4 bits
    paths = {kind: tmp_path / f"{kind}.safetensors" for kind in ("int8", "int4")}
    for kind, path in paths.items():
        save_generator(model, ModelSpec(ngf=8), path, kind)
    assert paths["int4"].stat().st_size < 0.7 * paths["int8"].stat().st_size
    stored, loaded = load_file(paths["int4"]), load_generator(paths["int4"])[0].state_dict()
    gap = (weights.NF4_LEVELS[1:] - weights.NF4_LEVELS[:-1]).max()  # the widest step between levels
    coded = set()
    for name, original in model.state_dict().items():
        if original.dim() != 4:
            continue
        if original.numel() >= 4096:  # 4-bit codes, two to a byte, one fp16 scale per 64 weights
            coded.add(name)
            assert stored[name].dtype == torch.uint8 and stored[name].numel() * 2 == original.numel()
            scale = original.reshape(-1, weights.INT4_GROUP).abs().amax(dim=1, keepdim=True)
            error = (loaded[name] - original).reshape(-1, weights.INT4_GROUP).abs()
            assert torch.all(error <= scale * gap / 2 + 1e-3 * scale), name
        else:  # int8, one scale per slice of dimension 0
            assert stored[name].dtype == torch.int8, name
    assert coded and coded != {k for k, v in model.state_dict().items() if v.dim() == 4}
    d = json.loads(run("info", paths["int4"], "--json").stdout)
    assert d["dtype"] == "float16, int4, int8"
    assert d["parameters"] == sum(p.numel() for p in model.parameters())


def test_int4_codes_are_the_nearest_level_with_ties_going_down():
    levels = weights.NF4_LEVELS
    midpoints = (levels[1:] + levels[:-1]) / 2
    values = torch.cat([levels, midpoints, torch.nextafter(midpoints, torch.tensor(2.0)),
                        torch.nextafter(midpoints, torch.tensor(-2.0)), torch.rand(4000) * 2 - 1])
    groups = torch.cat([torch.ones(len(values), 1), values[:, None].expand(-1, weights.INT4_GROUP - 1)], 1)
    packed, scale = weights._int4_codes(groups)  # every group's largest magnitude is 1: scale 1
    assert torch.all(scale == 1)
    codes = torch.stack([packed & 15, packed >> 4], 1).reshape(-1, weights.INT4_GROUP)[:, 1].long()
    distance = (values.double()[:, None] - levels.double()[None]).abs()
    two = distance.topk(2, dim=1, largest=False).values
    clear = two[:, 1] - two[:, 0] > 1e-6  # not within rounding of a midpoint (float32 midpoints are rounded)
    assert clear.sum() > 4000 and torch.equal(codes[clear], distance.argmin(1)[clear])
    # On a midpoint, the lower level; one step above it, the upper
    assert torch.equal(codes[16:31], torch.arange(15)) and torch.equal(codes[31:46], torch.arange(1, 16))
    assert torch.equal(codes[46:61], torch.arange(15))


def test_int8_weights_load_within_half_a_step_and_take_a_quarter_of_the_size(tmp_path, monkeypatch):
    model = random_generator()
    paths = {kind: tmp_path / f"{kind}.safetensors" for kind in ("fp32", "int8", "int8_inner")}
    save_generator(model, ModelSpec(ngf=8), paths["fp32"])
    monkeypatch.setattr(weights, "INT8_MIN_ELEMENTS", 1)  # every convolution weight
    save_generator(model, ModelSpec(ngf=8), paths["int8"], "int8")
    assert paths["int8"].stat().st_size < 0.3 * paths["fp32"].stat().st_size
    loaded = load_generator(paths["int8"])[0].state_dict()
    for name, original in model.state_dict().items():
        if original.dim() == 4:  # a convolution weight: int8, one scale per slice of dimension 0
            step = original.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
            assert torch.all((loaded[name] - original).abs() <= step / 2 + 1e-7), name
        elif original.is_floating_point():  # the rest: fp16
            assert torch.equal(loaded[name], original.half().float()), name
    # Only weights of INT8_MIN_ELEMENTS or more are int8; the smaller, outer ones stay fp16.
    monkeypatch.setattr(weights, "INT8_MIN_ELEMENTS", 4096)
    save_generator(model, ModelSpec(ngf=8), paths["int8_inner"], "int8")
    stored = load_file(paths["int8_inner"])
    convolutions = {k: v for k, v in model.state_dict().items() if v.dim() == 4}
    assert {k for k in convolutions if stored[k].dtype == torch.int8} == {
        k for k, v in convolutions.items() if v.numel() >= 4096} != set(convolutions)
    assert stored["encoder.0.0.weight"].dtype == torch.float16
    d = json.loads(run("info", paths["int8"], "--json").stdout)
    assert d["dtype"] == "float16, int8"
    assert d["parameters"] == sum(p.numel() for p in model.parameters())  # the scales are not parameters
    with pytest.raises(ValueError, match="storage must be one of"):
        save_generator(model, ModelSpec(ngf=8), tmp_path / "bf16.safetensors", "bf16")
    assert not (tmp_path / "bf16.safetensors").exists()
