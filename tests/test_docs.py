"""The documentation stays true to the code: the README's Python API example runs as written (on
small scenes made under its file names, around its longitude/latitude box, its URL read from a
local file of the same content: no network in tests), and the command lines the README and docs/
show use commands and options that exist."""

from __future__ import annotations

import re
from pathlib import Path

import click
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.transform import from_origin

from geosat2map_cli.main import cli

from .conftest import synthetic_image

README = Path(__file__).parents[1] / "README.md"
URL = "https://example.com/ortho.tif"
UTM = "EPSG:32614"  # the zone of the example's box (97.7 degrees west)
RES, SIZE = 2.0, 240  # one tile at the default model's 2.12 m


def python_example() -> str:
    """The example's code, after as many blank lines as precede it, so a traceback names README lines."""
    text = README.read_text(encoding="utf-8")
    block = re.compile(r"```python\n(.*?)```", re.S).search(text, text.index("## Python API"))
    return "\n" * text.count("\n", 0, block.start(1)) + block.group(1)


def write(path: Path, data: np.ndarray, left: float, top: float) -> None:
    path.parent.mkdir(exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=3,
                       dtype="uint8", crs=UTM, transform=from_origin(left, top, RES, RES)) as dst:
        dst.write(data.astype("uint8"))


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    code = python_example()
    assert URL in code
    monkeypatch.chdir(tmp_path)
    x, y = Transformer.from_crs("EPSG:4326", UTM, always_xy=True).transform(-97.735, 47.51)  # in the box
    left, top = x - RES * SIZE / 2, y + RES * SIZE / 2
    data = synthetic_image(SIZE, SIZE)
    for name in ("scene.tif", "ortho_copy.tif", "a.tif", "b.tif"):
        write(tmp_path / name, data, left, top)
    half = SIZE // 2
    write(tmp_path / "sheets" / "a.tif", data[:, :, :half], left, top)
    write(tmp_path / "sheets" / "b.tif", data[:, :, half:], left + RES * half, top)
    park = shapely.box(left + 100, top - 300, left + 300, top - 100)
    pyogrio.raw.write(tmp_path / "city.gpkg", geometry=np.array([shapely.to_wkb(park)], dtype=object),
                      field_data=[], fields=[], crs=UTM, geometry_type="Polygon", layer="parks")

    exec(compile(code.replace(URL, "ortho_copy.tif"), str(README), "exec"), {})

    for name in ("map.tif", "town.tif", "parks.tif", "ortho_map.tif", "a_map.tif", "b_map.tif", "maps/a.tif",
                 "maps/b.tif"):
        with rasterio.open(tmp_path / name) as ds:
            assert (ds.count, ds.dtypes[0], ds.crs) == (3, "uint8", UTM), name
    with rasterio.open("map.tif") as whole, rasterio.open("ortho_map.tif") as mosaic:
        assert whole.bounds == mosaic.bounds  # the two sheets, put together, are the scene
        assert np.abs(whole.read().astype(int) - mosaic.read().astype(int)).mean() < 1
    with rasterio.open("parks.tif") as ds:  # the polygon's box, nodata outside the polygon: here none
        assert ds.dataset_mask().all() and abs(ds.bounds.left - park.bounds[0]) <= RES


def test_the_calls_the_readme_names_exist():
    """The Python API section's calls named in its prose (export_onnx, classify_map...) resolve from
    ``import geosat2map`` as written."""
    import geosat2map

    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    calls = set(re.findall(r"`(geosat2map(?:\.\w+)+)\(", section))
    assert len(calls) >= 7
    for call in calls:
        obj = geosat2map
        for part in call.split(".")[1:]:
            obj = getattr(obj, part, None)
            assert obj is not None, call
        assert callable(obj), call


def command_lines(text: str, commands: list[str]) -> list[str]:
    """Every geosat2map command line the text shows: in code blocks (continuations joined, comments
    cut) and in inline code, where it may start at the command's name (`translate --tta`)."""
    lines = []
    for block in re.findall(r"```\w*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").split("\n"):
            line = re.sub(r"^\s*(\$|#)\s*", "", line.split("  #")[0])
            if line.startswith("geosat2map "):
                lines.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += re.findall(r"`(?:rio )?(geosat2map [a-z][^`]*)`", prose)
    named = "|".join(map(re.escape, commands))
    lines += ["geosat2map " + span for span in re.findall(rf"`((?:{named}) --[^`]*)`", prose)]
    return lines


@pytest.mark.parametrize("doc, least", [("README.md", 60), ("docs/model_card.md", 100),
                                        ("docs/performance.md", 5)])
def test_the_documented_command_lines_use_options_the_commands_have(doc, least):
    """A renamed or removed option or command would leave the README telling users to type something
    that fails, or the model card giving a training command that no longer runs: each command they
    show exists, each --option it passes is one of that command's, and a choice's value one it takes."""
    ctx = click.Context(cli)
    lines = command_lines((README.parent / doc).read_text(encoding="utf-8"), cli.list_commands(ctx))
    assert len(lines) >= least
    for line in lines:
        name, *words = line.split()[1:]
        command = cli.get_command(ctx, name)
        assert command is not None, line
        params = {opt: param for param in command.params for opt in param.opts + param.secondary_opts}
        for word, following in zip(words, words[1:] + [""]):
            option = word.split("=")[0].rstrip(",.;:)")
            if not option.startswith("--") or option == "--help":
                continue
            assert option in params, f"{line!r}: {name} has no {option}"
            value = following.rstrip(",.;:)")
            if isinstance(params[option].type, click.Choice) and re.fullmatch(r"[a-z][\w-]*", value):
                assert value in params[option].type.choices, f"{line!r}: {option} takes no {value}"
