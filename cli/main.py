"""The ``geosat2map`` command: thin click wrappers over the library.

Every command turns a :class:`geosat2map.Geosat2mapError` into one line on stderr and exit
status 1; Ctrl-C exits 130 after the library has cleaned up.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from geosat2map.errors import DataError, Geosat2mapError, Interrupted, first_line


@contextmanager
def _c_stderr_aside() -> Iterator[None]:
    """Keep C libraries' direct writes to file descriptor 2 off the terminal.

    GDAL's bundled libtiff prints some errors itself ("_tiffWriteProc: File too large.") on top
    of the exception we turn into one line. Python's sys.stderr (our messages, tqdm, warnings,
    tracebacks) moves to a duplicate of the real descriptor; what C writes to 2 goes to a
    temporary file, shown only if the command dies of an unexpected error.
    """
    try:
        real_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a real stream (e.g. click's test runner)
        yield
        return
    if real_fd != 2:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    sink = tempfile.TemporaryFile()
    os.dup2(sink.fileno(), 2)
    previous, sys.stderr = sys.stderr, os.fdopen(saved, "w", buffering=1, closefd=False)
    clean = False
    try:
        yield
        clean = True
    except (Geosat2mapError, KeyboardInterrupt, click.exceptions.Exit, click.exceptions.ClickException):
        clean = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = previous
        if not clean:
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
        sink.close()


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            with _c_stderr_aside():
                return super().invoke(ctx)
        except Geosat2mapError as exc:
            click.echo(f"geosat2map: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as exc:
            if not (isinstance(exc, Interrupted) and _helper_rank()):  # rank 0 says where every rank stopped
                # A helper's own line names it: rank 0's "rank N failed (its own error is above)" points here.
                click.echo(f"geosat2map: interrupted{_rank_named()}" + (f": {exc}" if str(exc) else ""), err=True)
            ctx.exit(130)


def _helper_rank() -> bool:
    """Under torchrun, a rank other than 0: rank 0 reports for all."""
    return int(os.environ.get("RANK", "0")) > 0


def _rank_named() -> str:
    """What a helper rank's own lines carry, ' (rank N)', so they say whose they are; '' elsewhere."""
    return f" (rank {os.environ['RANK']})" if _helper_rank() else ""


class _OneLineWarnings:
    """Shows a library's warning (GDAL's through pyogrio: "Non closed ring detected...") in one
    line, where Python's showed the file and source line it was raised from; and each text once a
    command: Python dedupes by the line that warns, and rasterio warns the same thing ("nodata
    attribute is shadowing the alpha band") from several of its lines, for every window read.
    Under torchrun a helper rank's line names it: every rank reads the scene, so each meets a
    warning about it, and rank 0's line alone would not say whose the others are."""

    def __init__(self) -> None:
        self.shown: set[str] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = first_line(message) if isinstance(message, Warning) else str(message)
        if text not in self.shown:
            self.shown.add(text)
            click.echo(f"geosat2map: warning{_rank_named()}: {text}", err=True)


def _terminate(signum, frame) -> None:
    # SIGTERM takes the same path as Ctrl-C, so temporary outputs are removed on the way out.
    raise KeyboardInterrupt


@click.group(cls=_Group, name="geosat2map")
@click.version_option(package_name="geosat2map")
def cli() -> None:
    """Satellite or aerial GeoTIFF in, georeferenced map-style GeoTIFF out (Pix2Pix)."""
    # GDAL's messages reach us as exceptions; without this, Python's last-resort handler would
    # also print rasterio's error log lines on stderr next to our one-line error.
    logging.getLogger("rasterio").addHandler(logging.NullHandler())
    warnings.showwarning = _OneLineWarnings()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
        if hasattr(signal, "SIGXFSZ"):  # over a file-size limit: a write error to report, not a crash
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _parse_resolution(ctx, param, value: str):
    if value in ("model", "native"):
        return value
    try:
        metres = float(value)
    except ValueError:
        raise click.BadParameter("use model, native or a number of metres per pixel") from None
    if metres <= 0:
        raise click.BadParameter("metres per pixel must be positive")
    return metres


def _parse_bands(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return [int(b) for b in value.split(",")]
    except ValueError:
        raise click.BadParameter("a comma-separated list of band numbers, e.g. 1,2,3") from None


@cli.command()
@click.argument("src", nargs=-1, required=True, type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--weights", default=None, help="Generator weights (.safetensors); default: the shipped model.")
@click.option("--resolution", default="model", show_default=True, callback=_parse_resolution,
              help="model (the model's ground sampling distance), native, or metres per pixel.")
@click.option("--tile-size", type=int, default=256, show_default=True)
@click.option("--overlap", type=int, default=None, help="Overlap between tiles in pixels [default: 64].")
@click.option("--batch-size", type=int, default=None,
              help="Tiles per model call [default: 8 on the CPU, 16 in bf16; on a GPU as many as half its free "
                   "memory holds, up to 128].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@click.option("--backend", type=click.Choice(["auto", "torch", "compiled", "onnxruntime"]), default="auto",
              show_default=True,
              help="auto: on the CPU, the fastest of PyTorch and ONNX Runtime (onnx extra), timed once per "
                   "model on this machine and remembered (so the same command makes the same map). "
                   "compiled: PyTorch compiled with torch.compile (CPU, needs a C++ compiler; seconds to compile, "
                   "faster in bf16 after: for very large scenes or many scenes in one call).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="auto", show_default=True,
              help="auto: bf16 autocast where the hardware multiplies bf16 (CUDA, CPUs with AMX or "
                   "AVX512-BF16) and it is faster; maps within 3 levels of fp32's at 99.9 % of values. "
                   "int8: ONNX Runtime on the CPU (onnx extra), its ranges from 8 of the scene's own tiles "
                   "(some seconds); 1.2-1.5x fp32's speed on CPUs without bf16, maps a little further from fp32's.")
@click.option("--bands", default=None, callback=_parse_bands,
              help="Input bands, e.g. 1,2,3 (default: by colour interpretation, else 1,2,3; one band as grey, "
                   "or in its colour table's colours when paletted).")
@click.option("--bounds", type=float, nargs=4, default=None, metavar="LEFT BOTTOM RIGHT TOP",
              help="Translate only this box (the source pixels that cover it), in the scene's CRS or --bounds-crs.")
@click.option("--bounds-crs", default=None, metavar="CRS",
              help="The CRS --bounds is given in, e.g. EPSG:4326 for longitude and latitude [default: the scene's].")
@click.option("--aoi", default=None, metavar="FILE[:LAYER]",
              help="Translate only inside these polygons (a vector file or URL GDAL reads, in any CRS: "
                   "GeoPackage, GeoJSON, Shapefile...): the map covers their bounding box and is nodata outside them.")
@click.option("--src-nodata", type=float, default=None, metavar="VALUE",
              help="The value that marks nodata in the scene (a pixel with it in every band), in place of the "
                   "scene's own nodata, alpha or mask: e.g. 0 for a black collar the file does not mark (as "
                   "gdalwarp -srcnodata).")
@click.option("--rpc-dem", default=None, metavar="DEM",
              help="Orthorectify a scene georeferenced by RPCs (a raw satellite product) over this raster of "
                   "heights, as gdalwarp -rpc -to RPC_DEM=DEM does [default: the RPCs' mean height].")
@click.option("--tta", "tta", flag_value="flip",
              help="Test-time augmentation: average each tile's map with the mirrored map of its mirror image "
                   "(a cleaner map, twice the compute).")
@click.option("--tta-median", "tta", flag_value="median",
              help="Test-time augmentation, stronger: each tile's map is the per-pixel median of 18 views (shifted "
                   "by 3 pixels on a 3 x 3 grid, each mirrored): closer to real maps than --tta on every "
                   "held-out metric, 18 times the compute (any --backend and --precision: the engine maps "
                   "the views).")
@click.option("--cog", is_flag=True, help="Write a Cloud Optimized GeoTIFF.")
@click.option("--compress", type=click.Choice(["zstd", "deflate", "lzw", "jpeg", "webp"]), default="zstd",
              show_default=True,
              help="zstd, deflate, lzw: lossless (deflate or lzw for readers without ZSTD); jpeg, webp: lossy, "
                   "smaller files, at --quality.")
@click.option("--quality", type=click.IntRange(1, 100), default=None,
              help="JPEG or WebP quality, 1-100 [default: 90].")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run (Ctrl-C, SIGTERM) of the same command from the rows it "
                   "kept, or a killed one (SIGKILL, power cut) from its last minute's checkpoint. A finished map "
                   "of the same scene and model is kept; with several SRC, partial ones are resumed and the rest "
                   "translated.")
@click.option("--allow-ungeoreferenced", is_flag=True, help="Translate a raster without georeferencing.")
@click.option("--dry-run", is_flag=True,
              help="Print the map each SRC would make (its size, resolution, CRS, bands, tiles and notes; with "
                   "--resume, the maps kept and the rows a partial one holds) and write nothing: no model is "
                   "loaded, no tile computed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def translate(src, dst, overlap, quiet, dry_run, **options) -> None:
    """Translate the satellite/aerial raster SRC into a map-style GeoTIFF DST. SRC may also be any
    address GDAL reads: https://..., s3://..., /vsizip/archive.zip/scene.tif.

    With several SRC (or a quoted pattern such as 'scenes/*.tif'), DST is a folder: each map gets its
    scene's file name there, and the model is loaded once. A scene that fails is reported and the others go on (exit status 1 at the end).
    """
    from geosat2map.reader import check_input, is_gdal_path
    from geosat2map.writer import GEOTIFF, check_destination

    to_folder = len(src) > 1 or any(map(_is_pattern, src))  # pattern: a folder
    src = _expand_globs(src)
    if dry_run:
        _dry_run(src, Path(dst), to_folder, overlap, options)
        return
    if not to_folder:  # the library checks these again; here they come before the model loads
        check_input(src[0])
        if options["resume"] and Path(dst).exists() and not options["overwrite"]:  # a rerun after the end
            _keep_finished(src[0], Path(dst), {**options, "overlap": overlap})
            return
        check_destination(Path(dst), None if is_gdal_path(src[0]) else Path(src[0]), options["overwrite"], GEOTIFF)

    from geosat2map.allocator import retain_freed_memory
    from geosat2map.pipeline import DEFAULT_OVERLAP, FinishedMap, translate as run_translate, translate_many

    retain_freed_memory()  # batch after batch, the same activations' memory (see geosat2map.allocator)

    helper = _helper_rank()
    bar = _LazyBar(unit="tile", disable=quiet or helper, dynamic_ncols=True, leave=False)  # one per scene

    def progress(advance: int, total: int) -> None:
        bar.get(total=total).update(advance)

    options.update(overlap=DEFAULT_OVERLAP if overlap is None else overlap, progress=progress)
    if not to_folder:
        try:
            result = run_translate(src[0], dst, **options)
        finally:
            bar.close()
        if not helper:
            _report(result)
        return
    failed = 0
    try:
        for scene, outcome in translate_many(list(src), dst, **options):
            bar.close()
            if isinstance(outcome, Geosat2mapError):
                failed += 1
                _scene_error(scene, outcome)
            elif isinstance(outcome, FinishedMap):
                click.echo(f"kept {outcome.dst}: finished before")
            elif not helper:
                _report(outcome)
    finally:
        bar.close()
    if failed:
        raise click.exceptions.Exit(1)


def _dry_run(sources: tuple[str, ...], dst: Path, to_folder: bool, overlap: int | None, options: dict) -> None:
    """translate --dry-run: each scene's plan (geosat2map.pipeline.plan_translation), after the
    checks a run makes first; with several, a scene that fails is reported and the others go on."""
    from geosat2map.aoi import AreaOfInterest
    from geosat2map.pipeline import DEFAULT_OVERLAP, check_map_folder, kept_rows, map_name, plan_translation
    from geosat2map.reader import check_input, is_gdal_path
    from geosat2map.writer import GEOTIFF, check_destination

    if to_folder:
        check_map_folder(list(sources), dst)
    asked = {k: options[k] for k in ("weights", "resolution", "tile_size", "bands", "bounds", "bounds_crs", "aoi",
                                     "src_nodata", "rpc_dem", "allow_ungeoreferenced")}
    asked["overlap"] = DEFAULT_OVERLAP if overlap is None else overlap
    if asked["aoi"] is not None:  # read once for all scenes, as translate_many does
        asked["aoi"] = AreaOfInterest.read(asked["aoi"])
    failed = 0
    for scene in sources:
        out = dst / map_name(scene) if to_folder else dst
        try:
            check_input(scene)
            if options["resume"] and not options["overwrite"] and out.exists():
                click.echo(f"would keep {out}: finished before (if made from this scene by this model with these "
                           "options)")
                continue
            check_destination(out, None if is_gdal_path(scene) else Path(scene), options["overwrite"], GEOTIFF)
            kept = kept_rows(out, required=not to_folder) if options["resume"] else None
            plan = plan_translation(scene, **asked)
        except Geosat2mapError as exc:
            if not to_folder:
                raise
            failed += 1
            _scene_error(scene, exc)
            continue
        for note in plan.notes:
            click.echo(f"note: {note}", err=True)
        gsd = f", {plan.gsd_m:.2f} m/px" if plan.gsd_m else ""
        outside = plan.grid_tiles - plan.tiles
        tiles = f"{plan.tiles} tile{'' if plan.tiles == 1 else 's'} of {options['tile_size']}"
        click.echo(f"would write {out}: {plan.width} x {plan.height}{gsd}, {plan.crs or 'no CRS'}, bands "
                   f"{','.join(map(str, plan.bands))}, {tiles} overlapping by {asked['overlap']}"
                   + (f" ({outside} more outside the area of interest)" if outside else "")
                   + _data_tiles(plan)
                   + ("" if kept is None else f"; continuing its partial output, {kept} of {plan.height} rows kept"))
    if failed:
        raise click.exceptions.Exit(1)


def _data_tiles(plan) -> str:
    """The dry run's count of the tiles a run computes (the others wholly nodata), where the scene
    marks nodata."""
    if plan.data_tiles is None or (plan.data_tiles == plan.tiles and plan.mask_step == 1):
        return ""
    if plan.mask_step == 1:
        return f", {plan.data_tiles} with data (the rest wholly nodata: skipped)"
    return f", about {plan.data_tiles} with data (its mask read every {plan.mask_step} pixels)"


def _scene_error(scene: str, exc: Exception) -> None:
    """One scene's failure in a run of several: its one line, naming the scene unless it does."""
    click.echo(f"geosat2map: error: {'' if str(scene) in str(exc) else f'{scene}: '}{exc}", err=True)


def _keep_finished(src: str, dst: Path, options: dict) -> None:
    """--resume of a run that had finished (a requeued job runs its command again): the map is
    kept if it is this scene's by this model, made with these options."""
    from geosat2map.pipeline import DEFAULT_OVERLAP, finished_map
    from geosat2map.weights import load_generator, model_digest

    if options["overlap"] is None:
        options["overlap"] = DEFAULT_OVERLAP
    kept = finished_map(src, dst, model_digest(load_generator(options["weights"])[0]), options)
    click.echo(f"kept {kept.dst}: finished before")


class _LazyBar:
    """A tqdm progress bar made at its first update, so a command that fails early prints only
    its error line; closed, the next update starts a new one."""

    def __init__(self, **options) -> None:
        self.options = options
        self.bar = None

    def get(self, **more):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(**self.options, **more)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_pattern(source: str) -> bool:
    """Whether ``source`` is a file pattern to expand: it has ``*``, ``?`` or ``[``, is not an
    address GDAL reads (a URL's "?" starts its query) and names no file as it is (a scene named
    ``scene[1].tif`` is that file, not a pattern matching ``scene1.tif``)."""
    from geosat2map.reader import is_gdal_path

    return glob.has_magic(source) and not is_gdal_path(source) and not os.path.lexists(source)


def _expand_globs(sources: tuple[str, ...]) -> tuple[str, ...]:
    """Expand quoted patterns such as 'scenes/*.tif' (for shells that do not, or long lists)."""
    out: list[str] = []
    for pattern in sources:
        if _is_pattern(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise Geosat2mapError(f"no file matches {pattern}")
            out.extend(matches)
        else:
            out.append(pattern)
    return tuple(out)


def _report(result) -> None:
    from geosat2map.model import TTA_LABELS

    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    gsd = f", {result.gsd_m:.2f} m/px" if result.gsd_m else ""
    tta = f", {TTA_LABELS[result.tta]}" if result.tta else ""
    click.echo(f"wrote {result.dst}: {result.width} x {result.height}{gsd}, {result.tiles_computed}/{result.tiles} "
               f"tiles computed on {result.device} ({result.backend}, batch {result.batch_size}{tta}) "
               f"in {result.seconds:.1f} s "
               f"({result.tiles_computed / max(result.seconds, 1e-9):.1f} tiles/s)")


@cli.command()
@click.argument("scene", type=click.Path(dir_okay=False))
@click.argument("map_path", metavar="MAP", type=click.Path(dir_okay=False))
@click.argument("png", type=click.Path(dir_okay=False))
@click.option("--size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Long side of each panel, pixels.")
@click.option("--overwrite", is_flag=True)
def preview(scene, map_path, png, size, overwrite) -> None:
    """Write PNG: SCENE beside the MAP translated from it."""
    from geosat2map.preview import side_by_side

    h, w = side_by_side(scene, map_path, png, size=size, overwrite=overwrite)
    click.echo(f"wrote {png} ({w} x {h})")


#: The share of a map's pixels in no colour class past which classify asks whether it was given a
#: map: the default model's NAIP map leaves 2.7 %, the maps targets 7 %; a satellite scene 100 %.
UNLIKE_A_MAP = 0.5


@cli.command()
@click.argument("map_path", metavar="MAP", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--compress", type=click.Choice(["zstd", "deflate", "lzw"]), default="zstd", show_default=True)
@click.option("--cog", is_flag=True, help="Write a Cloud Optimized GeoTIFF.")
@click.option("--json", "as_json", is_flag=True, help="Each class's pixels and area (m²) as JSON.")
@click.option("--overwrite", is_flag=True)
def classify(map_path, dst, compress, cog, as_json, overwrite) -> None:
    """Write DST: each pixel of MAP (a translated map) as its map colour class (1 land, 2 building,
    3 road, 4 highway, 5 water, 6 park; 0 unclassified: labels, edges), a paletted GeoTIFF in the
    classes' colours, with a QGIS style beside it (DST named .qml: QGIS's legend then names the
    classes); print each class's area."""
    from geosat2map.classify import classify_map, style_path

    by_class = classify_map(map_path, dst, overwrite=overwrite, compress=compress, cog=cog)
    total = sum(c.pixels for c in by_class.values())
    unclassified = by_class["unclassified"].pixels / max(total, 1)
    if unclassified > UNLIKE_A_MAP:  # a translated map leaves a few % (labels, edges) in no class
        click.echo(f"note: {100 * unclassified:.0f} % of {map_path}'s pixels are no map colour: is it a map "
                   "(translate's output), not a scene?", err=True)
    if as_json:
        click.echo(json.dumps({name: {"pixels": c.pixels, "area_m2": c.area_m2} for name, c in by_class.items()}))
        return
    click.echo(f"wrote {dst} (its QGIS style: {style_path(Path(dst)).name}): {total:,} valid pixels")
    _echo_class_areas(by_class, lambda c: f"{100 * c.pixels / max(total, 1):5.1f} %")


def _area(m2: float) -> str:
    """An area for people: hectares below 100 ha (1 km²), square kilometres above."""
    return f"{m2 / 1e4:,.2f} ha" if m2 < 1e6 else f"{m2 / 1e6:,.2f} km²"


def _echo_class_areas(by_class: dict, amount: Callable) -> None:
    """One line per class: its name, ``amount`` of it (a share, a count) and its area where known."""
    for name, c in by_class.items():
        area = "" if c.area_m2 is None else f"  {_area(c.area_m2):>12}"
        click.echo(f"  {name:<12} {amount(c)}{area}")


@cli.command()
@click.argument("classes_path", metavar="CLASSES", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--classes", "names", default="building,road,highway,water,park", show_default=True,
              help="The classes made features, comma-separated (land, building, road, highway, water, park).")
@click.option("--min-pixels", type=click.IntRange(min=1), default=4, show_default=True,
              help="Merge patches of fewer pixels (a map's specks) into their largest neighbour first, as "
                   "gdal_sieve does (1: none).")
@click.option("--simplify", type=click.FloatRange(min=0), default=0, show_default=True, metavar="PIXELS",
              help="Smooth the outlines by this tolerance, in pixels of CLASSES (2 smooths the pixels' "
                   "staircase; 0: the pixels' edges exactly). Neighbours stay edge to edge: no gaps or overlaps.")
@click.option("--json", "as_json", is_flag=True, help="Each class's features and area (m²) as JSON.")
@click.option("--overwrite", is_flag=True)
def vectorize(classes_path, dst, names, min_pixels, simplify, as_json, overwrite) -> None:
    """Write DST (.gpkg, .geojson or .fgb): each patch of a class in CLASSES (classify's raster) as
    a polygon, with its class and its area on the ground, in the raster's CRS."""
    from geosat2map.vectorize import vectorize_classes

    by_class = vectorize_classes(classes_path, dst, tuple(n.strip() for n in names.split(",") if n.strip()),
                                 min_pixels=min_pixels, simplify=simplify, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps({name: {"features": c.count, "area_m2": c.area_m2} for name, c in by_class.items()}))
        return
    click.echo(f"wrote {dst}: {sum(c.count for c in by_class.values()):,} polygons")
    _echo_class_areas(by_class, lambda c: f"{c.count:>8,}")


@cli.command("render-map")
@click.argument("vectors", nargs=-1, required=True)
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--like", type=click.Path(dir_okay=False), help="Take the grid (CRS, transform, size) of this raster.")
@click.option("--bounds", nargs=4, type=float, help="left bottom right top, in --crs units.")
@click.option("--crs", help="CRS of --bounds, e.g. EPSG:32633.")
@click.option("--resolution", type=float, help="Pixel size in --crs units (with --bounds).")
@click.option("--style", type=click.Path(dir_okay=False), help="Style file (default: the shipped maps style).")
@click.option("--max-pixels", type=click.IntRange(min=1),
              help="Refuse a --bounds/--resolution grid with more pixels, as a resolution in the wrong units "
                   "[default: 2^32, 65 536 x 65 536].")
@click.option("--overwrite", is_flag=True)
def render_map_cmd(vectors, dst, like, bounds, crs, resolution, style, max_pixels, overwrite) -> None:
    """Render VECTORS (FILE or FILE:LAYER) in map style onto a grid, as an RGB GeoTIFF DST."""
    from geosat2map.render import grid_from, render_map

    grid = grid_from(like=like, bounds=bounds, crs=crs, resolution=resolution, max_pixels=max_pixels)
    n = render_map(list(vectors), dst, grid, style=style, overwrite=overwrite)
    click.echo(f"wrote {dst}: {grid.width} x {grid.height}, {n} feature{'' if n == 1 else 's'} drawn")


@cli.command()
@click.argument("sheets", nargs=-1)
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--index", metavar="FILE[:LAYER]",
              help="A tile index listing the sheets (gdaltindex's, QGIS's Tile Index): their paths in --index-field, "
                   "relative to the index's folder.")
@click.option("--index-field", default="location", show_default=True, help="The index's field of sheet paths.")
@click.option("--aoi", metavar="FILE[:LAYER]", help="Only the sheets whose extent meets these polygons (any CRS).")
@click.option("--crs", help="The mosaic's CRS, e.g. EPSG:32615 [default: the first sheet's]; sheets in another are "
                            "warped into it.")
@click.option("--src-nodata", type=float, default=None, metavar="VALUE",
              help="Every sheet's nodata value, in place of what the files say (as gdalbuildvrt -srcnodata): "
                   "e.g. 0 for black collars, so that the sheet below shows there.")
@click.option("--overwrite", is_flag=True)
def mosaic(sheets, dst, index, index_field, aoi, crs, src_nodata, overwrite) -> None:
    """Put raster SHEETS (an orthophoto delivered in tiles, or a quoted pattern such as
    'sheets/*.tif') together as one seamless scene DST, a GDAL VRT (.vrt), to translate or cut
    into tiles as one (what gdalbuildvrt does, for installs without GDAL's programs; sheets in
    another CRS, which it refuses, are warped, each by a VRT in the folder DST_warped beside it)."""
    from geosat2map.mosaic import build_mosaic, sheets_from_index

    listed = list(_expand_globs(sheets)) + (sheets_from_index(index, index_field) if index else [])
    if not listed:
        raise click.UsageError("give SHEETS, or --index")
    result = build_mosaic(listed, dst, overwrite=overwrite, crs=crs, src_nodata=src_nodata, aoi=aoi)
    warped = f"; {result.warped} warped into it (in {result.warped_dir})" if result.warped else ""
    click.echo(f"wrote {result.dst}: {result.sheets} sheet{'' if result.sheets == 1 else 's'}, "
               f"{result.width} x {result.height} pixels ({result.crs}{warped})")


@cli.command()
@click.argument("sat", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--map", "map_raster", type=click.Path(dir_okay=False), help="A map raster of the same ground.")
@click.option("--vector", "vectors", multiple=True, help="Vector layer FILE or FILE:LAYER (repeatable).")
@click.option("--resolution", default="model", show_default=True, callback=_parse_resolution,
              help="model (the default model's ground sampling distance), native, or metres per pixel.")
@click.option("--tile-size", type=int, default=256, show_default=True)
@click.option("--stride", type=int, default=None, help="Pixels between tiles [default: tile size].")
@click.option("--aoi", default=None, metavar="FILE[:LAYER]",
              help="Only tiles at least half inside these polygons (a vector file GDAL reads, in any CRS).")
@click.option("--max-nodata", type=float, default=0.05, show_default=True)
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of the split blocks held out for validation (0: none).")
@click.option("--block-tiles", type=int, default=4, show_default=True, help="Side of a split block, in tiles.")
@click.option("--style", type=click.Path(dir_okay=False), help="Style for --vector (default: maps).")
@click.option("--src-nodata", type=float, default=None, metavar="VALUE",
              help="SAT's nodata value, a pixel holding it in every band, in place of its own marking (as "
                   "translate's).")
@click.option("--rpc-dem", default=None, metavar="DEM",
              help="Orthorectify SAT, georeferenced by RPCs, over this raster of heights (as translate's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is an earlier tiles folder (or empty).")
def tiles(sat, out_dir, map_raster, vectors, aoi, overwrite, **options) -> None:
    """Cut aligned satellite/map training pairs from SAT into OUT_DIR (what `train` reads)."""
    from geosat2map.tiles import TileOptions, make_tiles

    result = make_tiles(sat, out_dir, map_raster=map_raster, vectors=list(vectors), aoi=aoi,
                        options=TileOptions(**options), overwrite=overwrite)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    skipped = ", ".join(f"{k} {v}" for k, v in result.skipped.items() if v)
    click.echo(f"wrote {result.out_dir}: {result.train} train + {result.val} val tiles at {result.gsd_m:.2f} m"
               + (f" (skipped: {skipped})" if skipped else ""))


@cli.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--direction", type=click.Choice(["AtoB", "BtoA"]), default="AtoB", show_default=True)
@click.option("--ngf", type=int, default=None,
              help="Generator width [default: 64; with --init-from, that generator's; wider than it, the "
                   "generator is grown to this width, new channels starting with no effect on its maps; the "
                   "width a grown generator was grown from: narrowed back to those channels as trained].")
@click.option("--ndf", type=int, default=64, show_default=True, help="Discriminator width.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--load-size", type=int, default=286, show_default=True,
              help="Pairs are resized to this before the random crop: 286 is the recipe's jitter; the crop "
                   "size keeps the data's scale, the one translate resamples to.")
@click.option("--crop-size", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--lr-d", type=float, default=None,
              help="The discriminator's learning rate [default: --lr]; lower, it slows a fresh discriminator "
                   "against a fine-tuned generator.")
@click.option("--lambda-gan", type=float, default=1.0, show_default=True,
              help="Weight of the adversarial term; 0: the generator trains on its pixel terms alone and the "
                   "discriminator is skipped (fine-tuning where --lambda-l1 has made the adversarial term "
                   "negligible: each step without the discriminator's passes).")
@click.option("--lambda-l1", type=float, default=100.0, show_default=True)
@click.option("--lambda-l2", type=float, default=0.0, show_default=True,
              help="Weight of a squared-error term beside L1 (0: none, the pix2pix recipe): pulls uncertain "
                   "pixels to the mean of the maps that fit, which RMSE and PSNR score, not their median.")
@click.option("--epochs", type=int, default=100, show_default=True, help="Epochs at the initial rate.")
@click.option("--epochs-decay", type=int, default=100, show_default=True, help="Epochs of linear decay to 0.")
@click.option("--checkpoint-every", type=int, default=500, show_default=True,
              help="Iterations (0: at epoch ends only).")
@click.option("--holdout", type=int, default=10, show_default=True,
              help="Aligned folders: every Nth image is validation (0: none).")
@click.option("--gsd", "gsd_m", type=float, default=None,
              help="Ground sampling distance of the training images, metres/pixel (stored in the weights).")
@click.option("--init-from", default=None, help="Fine-tune from a weights file ('default': the shipped model).")
@click.option("--max-steps", type=int, default=None, help="Stop (with a checkpoint) after this many steps.")
@click.option("--keep-snapshots", is_flag=True,
              help="Keep every epoch's generator (fp16) in OUT/snapshots, to average with average-weights "
                   "(with --ema-decay, the trained weights too, as epochNNN.trained.safetensors).")
@click.option("--ema-decay", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True,
              help="Keep a moving average of the generator's weights with this decay per step (e.g. 0.999) "
                   "and save and score it instead of the latest weights (0: off, the pix2pix recipe).")
@click.option("--freeze-batchnorm", is_flag=True,
              help="With --init-from: train with the generator's BatchNorm layers in eval mode on the "
                   "statistics it starts with, as translate runs it (they are not re-estimated).")
@click.option("--no-dropout", is_flag=True,
              help="Train the generator with dropout off, as translate runs it (the pix2pix recipe drops "
                   "half the channels of three decoder levels at every step).")
@click.option("--rot90", is_flag=True,
              help="Also turn each training crop by a random multiple of 90 degrees (imagery seen from "
                   "above has no up; the pix2pix recipe only mirrors).")
@click.option("--shift", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also move each training pair by a random number of pixels, up to this many each way, "
                   "its edges mirrored: the scene at other places on the U-Net's grid, at the same scale "
                   "(0: off, as the recipe).")
@click.option("--colour-jitter", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Also recolour each training input at random (white balance, tone curve, brightness, "
                   "contrast, saturation, hue; 1: the full ranges, see geosat2map.recolour), its map as it is: "
                   "for imagery whose colours are not the training imagery's (0: off, as the recipe).")
@click.option("--distill-from", default=None,
              help="Also pull the generator towards this teacher's flip-averaged maps (translate --tta's "
                   "output, or see --distill-views; 'default': the shipped model): one pass learns what the "
                   "teacher needs several for.")
@click.option("--distill-weight", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.5, show_default=True,
              help="With --distill-from: the teacher's share of the L1 term (the real map has the rest).")
@click.option("--distill-views", type=click.Choice(["flip", "median"]), default="flip", show_default=True,
              help="With --distill-from: the teacher's map is the mean of each pair and its mirror image "
                   "(flip), or the per-pixel median of 18 shifted and mirrored views (median: closer to the "
                   "real maps, nine times the teacher's passes, made once a run and kept).")
@click.option("--storage-aware", type=click.Choice(["int8", "int4"]), default=None,
              help="Quantisation-aware training for a weights file stored this way (export-weights --int8 or "
                   "--int4): every step computes with the weights rounded as stored; the run scores and saves "
                   "its generators stored this way.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Forward and backward passes under bf16 autocast (weights and optimiser stay fp32); "
                   "auto: where the hardware multiplies bf16 (CUDA, CPUs with AMX or AVX512-BF16).")
@click.option("--quiet", is_flag=True)
@click.pass_context
def train(ctx, data, out, resume, quiet, **options) -> None:
    """Train Pix2Pix on DATA (a pix2pix aligned folder or a `geosat2map tiles` output; several are
    trained on as one, e.g. your region's tiles beside the data the model learned from).

    With --resume, the run's stored options are used; --epochs/--epochs-decay given on the command line
    replace its schedule (train a finished run longer).
    """
    from geosat2map.train import TrainConfig, train as run_training

    config = TrainConfig(data=data[0] if len(data) == 1 else list(data), out=out, **options)
    helper = _helper_rank()
    bar = _LazyBar(unit="step", disable=quiet or helper, dynamic_ncols=True, smoothing=0.05)

    def progress(info: dict) -> None:
        step = bar.get()
        step.update(1)
        shown = {"D": f"{info['D']:.3f}"} if "D" in info else {}  # no discriminator at --lambda-gan 0
        step.set_postfix(epoch=info["epoch"] + 1, L1=f"{info['G_L1']:.3f}", **shown, refresh=False)

    given = {name for name in ("epochs", "epochs_decay")
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    schedule = tuple(options[name] if name in given else None for name in ("epochs", "epochs_decay"))
    schedule = schedule if resume and given else None
    try:
        record = run_training(config, resume=resume, progress=progress, schedule=schedule)
    finally:  # before the stderr it writes to is restored: an interrupted run prints one line
        bar.close()
    if record and not helper:
        val = record.get("val", {})
        click.echo(f"epoch {record['epoch']} step {record['step']}: L1 {record.get('G_L1', 0):.4f}"
                   + (f", val {_scores(val, ('rmse', 'acc5'))}" if val else ""))


@cli.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--map", "map_raster", type=click.Path(dir_okay=False),
              help="DATA is a translate output: score it against this map raster.")
@click.option("--weights", default=None, help="Generator weights (default: the shipped model).")
@click.option("--split", type=click.Choice(["all", "train", "val"]), default="all", show_default=True)
@click.option("--holdout", type=int, default=10, show_default=True, help="Aligned folders: every Nth is val.")
@click.option("--direction", type=click.Choice(["AtoB", "BtoA"]), default=None,
              help="Which half of an aligned pair is the input [default: the direction the weights were trained "
                   "in, else AtoB].")
@click.option("--device", default="auto", show_default=True)
@click.option("--tta", "tta", flag_value="flip", help="Score the generator with translate --tta's flip averaging.")
@click.option("--tta-median", "tta", flag_value="median",
              help="Score the generator with translate --tta-median's median of 18 views.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="fp32", show_default=True,
              help="bf16: score what translate's bf16 engine makes (auto: bf16 where the hardware has it); int8: "
                   "what translate --precision int8 makes, calibrated on 8 of the pairs' inputs (CPU, onnx extra).")
@click.option("--against", default=None,
              help="Also score these weights ('default': the shipped model) on the same pairs and give the "
                   "per-pair differences with their standard errors.")
@click.option("--classes", is_flag=True,
              help="Also score each map colour class (land, buildings, roads, highways, water, parks): its share "
                   "of the real maps, and the generated maps' precision, recall and IoU in it.")
@click.option("--recolour", type=click.Choice(["pale", "warm", "dark"]), default=None,
              help="Recolour each input first, its map kept: pale (lower contrast and saturation, brighter: "
                   "haze, desert light), warm (red up 10 %, blue down 12 %: another white balance) or dark "
                   "(gamma 1.4, darker by 15 %): how the model copes with another source's colours.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(data, map_raster, weights, split, holdout, direction, device, tta, precision, against, classes,
             recolour, as_json) -> None:
    """Score a generator on paired DATA (a pix2pix aligned folder or a tiles folder; several are
    scored as one), or a translate output DATA against --map: RMSE, accuracy at delta 5 and 10,
    PSNR, SSIM."""
    from geosat2map.evaluate import evaluate as run_eval, evaluate_rasters

    files = [d for d in data if Path(d).is_file()]
    if files and not map_raster:
        raise DataError(f"{files[0]} is a file: score a translate output against a reference map with --map MAP, "
                        "or a generator on a folder of pairs")
    if map_raster:
        if tta or against or recolour:
            raise click.UsageError("--tta, --tta-median, --against and --recolour score generators; with --map, "
                                   "score translate outputs")
        if len(data) > 1:
            raise click.UsageError("with --map, DATA is one translate output")
        result = evaluate_rasters(data[0], map_raster, classes=classes)
    else:
        result = run_eval(weights, data[0] if len(data) == 1 else list(data), split=split, direction=direction,
                          holdout=holdout, device=device, tta=tta, against=against, precision=precision,
                          classes=classes, recolour=recolour)
        for note in result["notes"]:
            click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif against:
        _echo_comparison(result)
    else:  # each mean with its standard error over the pairs (or tiles of a translate output)
        se = result["se"]
        # no spread to give for one pair, or for PSNR where every pair is identical (infinite)
        cells = [_metric(k, heading, d, result[k], se[k]) for k, heading, d in _METRIC_COLUMNS]
        n = int(result["count"])
        click.echo(f"{n} {'tile' if map_raster else 'pair'}{'' if n == 1 else 's'} of 256 x 256 (mean +- standard "
                   f"error): " + "  ".join(cells))
    if classes and not as_json:
        _echo_classes(result["classes"], against)


def _echo_classes(by_class: dict, against: str | None) -> None:
    """Per colour class: its share of the real maps, then precision, recall and IoU (each model's)."""
    models = [by_class["weights"], by_class["against"]] if against else [by_class]
    click.echo("class      share" + "  precision recall   IoU" * len(models)
               + ("   (weights, then against)" if against else ""))
    for name, first in models[0].items():
        cells = "".join(f"  {s[name]['precision']:9.3f} {s[name]['recall']:6.3f} {s[name]['iou']:5.3f}" for s in models)
        click.echo(f"{name:<9} {100 * first['share']:5.1f} %{cells}")


#: evaluate's columns: (key, heading, decimals).
_METRIC_COLUMNS = [("rmse", "RMSE", 2), ("acc5", "acc@5", 4), ("acc10", "acc@10", 4), ("psnr", "PSNR dB", 2),
                   ("ssim", "SSIM", 4)]


def _metric(key: str, heading: str, decimals: int, value: float, se: float | None = None) -> str:
    """One score as evaluate prints it in a line: 'RMSE 22.09 +- 0.51', 'PSNR 27.63 dB'."""
    spread = f" +- {se:.{decimals}f}" if se is not None and math.isfinite(se) else ""
    return f"{heading.removesuffix(' dB')} {value:.{decimals}f}{spread}" + (" dB" if key == "psnr" else "")


def _scores(val: dict, keys: tuple[str, ...] = ("rmse", "acc5", "acc10", "psnr", "ssim")) -> str:
    """Held-out scores (those of ``keys`` a record holds: older runs scored fewer) as evaluate prints them."""
    return "  ".join(_metric(k, heading, d, val[k]) for k, heading, d in _METRIC_COLUMNS
                     if k in keys and isinstance(val.get(k), (int, float)))


def _echo_comparison(result: dict) -> None:
    """Both generators' means, then weights minus against per pair: mean +- standard error, and
    on how many pairs the first is the better."""
    n = int(result["count"])
    rows = [(f"weights: {result['weights']}", [f"{result['scores']['weights'][k]:.{d}f}" for k, _, d in _METRIC_COLUMNS]),
            (f"against: {result['against']}", [f"{result['scores']['against'][k]:.{d}f}" for k, _, d in _METRIC_COLUMNS]),
            ("difference +- s.e.", [f"{result['difference'][k]['mean']:+.{d}f} +- {result['difference'][k]['se']:.{d}f}"
                                    for k, _, d in _METRIC_COLUMNS]),
            ("weights better on", [f"{int(result['difference'][k]['better'])} of {int(result['difference'][k]['count'])}"
                                   for k, _, _ in _METRIC_COLUMNS])]
    label = max(len(r[0]) for r in rows)
    widths = [max(len(h), *(len(r[1][i]) for r in rows)) for i, (_, h, _) in enumerate(_METRIC_COLUMNS)]
    click.echo(f"{n} pair{'' if n == 1 else 's'} of 256 x 256".ljust(label) + "  " + "  ".join(h.rjust(w) for (_, h, _), w in
                                                                           zip(_METRIC_COLUMNS, widths)))
    for name, cells in rows:
        click.echo(name.ljust(label) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))


def _storage_options(command):
    """--half, --int8 and --int4, the stored precision of a weights file (export-weights, average-weights)."""
    command = click.option("--int4", is_flag=True,
                           help="As --int8, but the largest convolution weights in 4 bits with a scale per 64 "
                                "(about a seventh of fp32's size).")(command)
    command = click.option("--int8", is_flag=True,
                           help="Store the convolution weights as int8 with a scale per channel, the rest fp16 "
                                "(about a quarter of fp32's size).")(command)
    return click.option("--half", is_flag=True, help="Store fp16 (half the size).")(command)


def _storage(half: bool, int8: bool, int4: bool) -> str:
    """The storage --half / --int8 / --int4 ask for; two at once is a usage error, not a silent choice."""
    if half + int8 + int4 > 1:
        raise click.UsageError("--half, --int8 and --int4 are different storages: pass one "
                               "(int8 and int4 keep the rest in fp16)")
    return "int4" if int4 else "int8" if int8 else "fp16" if half else "fp32"


@cli.command("export-weights")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--which", type=click.Choice(["best", "latest", "trained", "unrounded"]), default="best",
              show_default=True,
              help="trained: with --ema-decay, the weights being trained instead of their average (after "
                   "the latest epoch). unrounded: the latest at full precision, from the run's checkpoint "
                   "(a --storage-aware run's files hold it rounded; average those to round once).")
@_storage_options
@click.option("--gsd", "gsd_m", type=float, default=None, help="Override the ground sampling distance (m/px).")
@click.option("--overwrite", is_flag=True)
def export_weights(run_dir, out, which, half, int8, int4, gsd_m, overwrite) -> None:
    """Export a training run's generator to the weights file translate loads."""
    from geosat2map.export import export_run

    spec = export_run(run_dir, out, which=which, storage=_storage(half, int8, int4), gsd_m=gsd_m, overwrite=overwrite)
    gsd = f"{spec.gsd_m:.3f} m" if spec.gsd_m is not None else "not recorded"
    click.echo(f"wrote {out} (ngf {spec.ngf}, ground sampling distance {gsd})")
    _echo_val(spec.provenance)



@cli.command("average-weights")
@click.argument("weights", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="The paired training folder: BatchNorm statistics are re-estimated on its training split.")
@click.option("--holdout", type=int, default=10, show_default=True, help="As in training: every Nth pair is held out.")
@click.option("--crops", type=int, default=None,
              help="Re-estimate the BatchNorm statistics on this many training crops [default: keep them "
                   "when every input has the same, else one crop of every training pair].")
@click.option("--load-size", type=int, default=286, show_default=True,
              help="As in training: the crops are cut from pairs resized to this.")
@_storage_options
@click.option("--overwrite", is_flag=True)
def average_weights(weights, out, data, holdout, crops, load_size, half, int8, int4, overwrite) -> None:
    """Average the generators WEIGHTS... (snapshots of one run) into OUT, with fresh BatchNorm statistics
    (kept instead when every input has the same: a run trained with --freeze-batchnorm)."""
    from geosat2map.average import average_generators
    from geosat2map.weights import save_generator
    from geosat2map.writer import WEIGHTS, check_destination

    storage = _storage(half, int8, int4)
    check_destination(Path(out), None, overwrite, WEIGHTS)
    model, spec = average_generators(list(weights), data, recalibration=crops, holdout=holdout,
                                     load_size=load_size, storage=storage)
    save_generator(model, spec, out, storage)
    recalibrated = spec.provenance.get("bn_recalibration")
    click.echo(f"wrote {out}: mean of {len(weights)} generators (ngf {spec.ngf}), BatchNorm "
               + (f"re-estimated on {recalibrated['crops']} crops" if recalibrated
                  else "statistics kept (the same in every input)"))
    _echo_val(spec.provenance)


def _echo_val(provenance: dict, dtype: str = "float32") -> None:
    """The held-out scores a weights file records (``dtype``: its stored types, as info reads them).
    Files exported or averaged into fp16, int8 or int4 record their own score (``val_storage``) and
    the fp32 one before it; older files and the trainer's fp16 snapshots, the fp32 weights' only."""
    stored = provenance.get("val_storage", "fp32") != "fp32"
    before = "val_storage" not in provenance and dtype != "float32"
    for key, label in (("val_before_storage", ", before storage"),
                       ("val", ", as stored" if stored else ", scored before storage" if before else "")):
        val = provenance.get(key)
        if val:
            click.echo(f"held-out pairs ({int(val['count'])}{label}): {_scores(val)}")
    if "val_before_storage" in provenance and "val" not in provenance:
        click.echo("not scored as stored: the run's data folder was not found")


@cli.command()
@click.argument("weights", required=False, default="default")
@click.option("--json", "as_json", is_flag=True, help="Print everything, the whole provenance included, as JSON.")
def info(weights, as_json) -> None:
    """What the generator WEIGHTS (default: the shipped model) is: its architecture, the ground
    sampling distance translate resamples scenes to, its held-out scores and where it came from.
    Given a map (.tif) translate wrote: how it was made, and by which model. Given a training
    run's folder: its epochs so far and their held-out scores."""
    from geosat2map.weights import describe_weights
    from geosat2map.writer import GEOTIFF_SUFFIXES

    if Path(weights).suffix.lower() in GEOTIFF_SUFFIXES:
        _map_info(weights, as_json)
        return
    if (Path(weights) / "config.json").is_file():
        _run_info(weights, as_json)
        return
    d = describe_weights(None if weights == "default" else weights)
    if as_json:
        click.echo(json.dumps(d.as_dict(), indent=2))
        return
    spec, prov = d.spec, d.spec.provenance
    click.echo(f"{d.path}: {d.bytes / 1e6:.1f} MB, {d.dtype}, sha256 {d.sha256}")
    click.echo(f"model sha256 {d.model_sha256} (of its tensors: what its maps record as GEOSAT2MAP_MODEL_SHA256)")
    click.echo(f"{spec.arch} generator, width {spec.ngf}, {d.parameters:,} parameters: {spec.in_channels} bands in "
               f"({spec.input_bands}), {spec.out_channels} out, {spec.tile_size} x {spec.tile_size} tiles")
    click.echo(f"trained at {spec.gsd_m:.2f} m/pixel: translate resamples scenes to it" if spec.gsd_m else
               "no ground sampling distance recorded: translate keeps each scene's own pixels")
    try:
        _echo_provenance(prov, d.dtype)
    except (KeyError, TypeError, ValueError, AttributeError):  # written by another tool, or edited
        click.echo("its provenance is not as geosat2map writes it (--json: as recorded)")


def _echo_provenance(prov: dict, dtype: str) -> None:
    """A weights file's held-out scores and where it came from, as geosat2map records them."""
    from geosat2map.datasets import folders_text

    _echo_val(prov, dtype)
    made = [f"recipe {prov['recipe']}"] if prov.get("recipe") else []
    if "epoch" in prov:
        made.append(f"epoch {prov['epoch']}, step {prov.get('step', '?')}")
    if "data" in prov:  # one folder, or several trained on as one
        made.append("trained on " + folders_text(prov["data"]))
    if "fine_tuned_from" in prov:
        parent = prov["fine_tuned_from"]
        grown = (f" (grown from width {parent['widened_from_ngf']})" if "widened_from_ngf" in parent else
                 f" (narrowed from width {parent['narrowed_from_ngf']})" if "narrowed_from_ngf" in parent else "")
        made.append(f"fine-tuned from {parent['file']}{grown}")
    if "distilled_from" in prov:
        teacher = prov["distilled_from"]
        views = "median of 18 views" if teacher.get("views") == "median" else "flip-averaged maps"
        made.append(f"distilled from {teacher['file']}'s {views}")
    if prov.get("settings", {}).get("shift"):
        made.append(f"pairs moved by up to {prov['settings']['shift']} pixels each way")
    if prov.get("settings", {}).get("colour_jitter"):
        made.append(f"inputs recoloured at random (strength {prov['settings']['colour_jitter']:g})")
    if "averaged_from" in prov:
        sources = prov["averaged_from"]
        names = ", ".join(source.get("file", "?") for source in sources)
        data = [p.get("data") if isinstance(p := source.get("provenance"), dict) else None for source in sources]
        each = f", each trained on {folders_text(data[0])}" if data[0] and data.count(data[0]) == len(data) else ""
        made.append(f"the mean of {len(sources)} generators ({names}){each}")
    if made:
        click.echo("; ".join(made) + " (--json: the whole provenance)")


def _run_info(path: str, as_json: bool) -> None:
    """A training run's settings, epochs and held-out scores, and what can be done with it next."""
    from dataclasses import asdict

    from geosat2map.datasets import as_folders, folders_text
    from geosat2map.run_info import read_run

    run = read_run(path)
    c, done = run.config, len(run.history)
    if as_json:
        click.echo(json.dumps({"run": str(run.path), "epochs_done": done, "epochs_planned": run.epochs_planned,
                               "resumable": run.resumable, "generators": run.generators,
                               "unreadable_history_lines": run.unreadable_lines, "checkpoint": run.position,
                               "seconds_to_go": run.seconds_to_go(),
                               "config": asdict(c),
                               "history": run.history}, indent=2))
        return
    folders = [str(f) for f in as_folders(c.data)]
    start = f", from {c.init_from}" if c.init_from else ""
    width = c.ngf or ("as --init-from" if c.init_from else 64)  # the trainer's default
    click.echo(f"{run.path}: a training run of width {width}{start} on {folders_text(c.data)} (--holdout "
               f"{c.holdout}): {done} of {run.epochs_planned} epochs done")
    taught = (f", distilled from {c.distill_from}" + (" (median of views)" if c.distill_views == "median" else "")
              if c.distill_from else "")
    click.echo(f"lr {c.lr:g} ({c.epochs} epochs, then {c.epochs_decay} of decay), L1 weight {c.lambda_l1:g}, "
               f"adversarial weight {c.lambda_gan:g}{taught}")
    last, best = (run.history[-1] if run.history else None), run.best()
    for label, record in (("last" if best is not last else "last, the best", last), ("best", best)):
        if record is None or (label == "best" and record is last):
            continue
        val = record.get("val")
        scored = f"held out {_scores(val)}" if isinstance(val, dict) else "not scored (no held-out pairs)"
        click.echo(f"{label}: epoch {record.get('epoch', '?')}, step {record.get('step', '?')}: {scored}")
    if run.position and run.position["step_in_epoch"]:
        n = run.steps_per_epoch()
        click.echo(f"epoch {run.position['epoch'] + 1} under way: {run.position['step_in_epoch']}"
                   f"{f' of {n}' if n else ''} steps at the last checkpoint (step {run.position['global_step']})")
    to_go = run.seconds_to_go()
    if to_go:
        slow_first = run.first_epoch_teaches and len(run.history) == 1
        click.echo(f"at the recent epochs' pace (about {_duration(run.epoch_seconds())} each): about "
                   f"{_duration(to_go)} to go" + (" (less: the first epoch also made the teacher's maps, which the "
                                                  "next reuse)" if slow_first else ""))
    if run.unreadable_lines:
        click.echo(f"{run.unreadable_lines} line(s) of history.jsonl unreadable (cut short by a kill?)")
    if run.resumable and done < run.epochs_planned:
        click.echo(f"`geosat2map train {' '.join(folders)} --out {run.path} --resume` continues it")
    elif run.resumable:
        click.echo(f"finished: `geosat2map train {' '.join(folders)} --out {run.path} --resume --epochs-decay N` "
                   "trains it longer")
    if run.generators:
        which = "its best generator" if "best_generator.safetensors" in run.generators else "its latest generator"
        click.echo(f"`geosat2map export-weights {run.path} OUT.safetensors` makes a weights file of {which}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def _map_info(path: str, as_json: bool) -> None:
    from geosat2map.errors import WeightsError
    from geosat2map.pipeline import changed_options
    from geosat2map.provenance import read_provenance
    from geosat2map.weights import describe_weights

    p = read_provenance(path)
    try:
        default = describe_weights(None).model_sha256
    except WeightsError:  # no shipped model in this install
        default = None
    p["shipped_model"] = p.get("GEOSAT2MAP_MODEL_SHA256") == default
    if as_json:
        click.echo(json.dumps(p, indent=2))
        return
    which = "the shipped model" if p["shipped_model"] else "not the shipped model"
    if "GEOSAT2MAP_CLASSES" in p:  # classify's output
        click.echo(f"{p['file']}: the classes of {p['width']} x {p['height']} pixels ({p['crs']}) of the map "
                   f"{p.get('GEOSAT2MAP_CLASSIFIED_MAP', '?')}, made by {p.get('TIFFTAG_SOFTWARE', 'geosat2map')} "
                   f"classify on {p.get('TIFFTAG_DATETIME', '?')}")
        click.echo(f"values {p['GEOSAT2MAP_CLASSES']}")
        if "GEOSAT2MAP_MODEL_SHA256" in p:
            click.echo(f"the map: from {p.get('GEOSAT2MAP_SOURCE', '?')} by model sha256 "
                       f"{p['GEOSAT2MAP_MODEL_SHA256']} ({which})")
        return
    click.echo(f"{p['file']}: a map of {p['width']} x {p['height']} pixels ({p['crs']}), made by "
               f"{p.get('TIFFTAG_SOFTWARE', 'geosat2map')} on {p.get('TIFFTAG_DATETIME', '?')} from "
               f"{p.get('GEOSAT2MAP_SOURCE', '?')}")
    click.echo(f"model sha256 {p.get('GEOSAT2MAP_MODEL_SHA256', '?')} ({which}; `geosat2map info WEIGHTS` "
               "prints a weights file's)")
    inside = f"; only inside the polygons of {p['GEOSAT2MAP_AOI']}" if "GEOSAT2MAP_AOI" in p else ""
    if "GEOSAT2MAP_SRC_NODATA" in p:
        inside += f"; the scene's nodata taken as {p['GEOSAT2MAP_SRC_NODATA']} (--src-nodata)"
    if "GEOSAT2MAP_RPC_DEM" in p:
        inside += f"; orthorectified over the DEM {p['GEOSAT2MAP_RPC_DEM']} (--rpc-dem)"
    click.echo(f"{p.get('GEOSAT2MAP_RESOLUTION', '?')}; {p.get('GEOSAT2MAP_TILING', '?')}{inside}")
    if "GEOSAT2MAP_OPTIONS" not in p:  # maps made before session 38 do not record them
        return
    if p["GEOSAT2MAP_OPTIONS"] is None:
        click.echo("the options it was asked with: unreadable (GEOSAT2MAP_OPTIONS is not a JSON object)")
        return
    changed = changed_options(p["GEOSAT2MAP_OPTIONS"]).items()
    click.echo("asked with " + (" ".join(_as_option(name, value) for name, value in changed) or "the defaults"))


def _as_option(name: str, value) -> str:
    """One recorded translate option as its command-line flag."""
    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if name == "tta":  # the other test-time augmentations have their own flags
        return f"{flag}-{value}"
    if name == "aoi":
        return f"{flag} (polygons {value.split()[0]})"  # recorded as a digest of the polygons and their CRS
    if isinstance(value, list):
        return f"{flag} {','.join(map(str, value)) if name == 'bands' else ' '.join(map(str, value))}"
    return f"{flag} {value}"


@cli.command("export-onnx")
@click.argument("weights")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--tile-size", type=int, default=256, show_default=True)
@click.option("--overlap", type=int, default=64, show_default=True, help="Overlap to suggest to Deepness, pixels.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare ONNX Runtime's output with torch's on random tiles.")
@click.option("--overwrite", is_flag=True)
def export_onnx_cmd(weights, out, tile_size, overlap, check, overwrite) -> None:
    """Export WEIGHTS (a .safetensors file, or 'default') as an ONNX model OUT for the Deepness QGIS plugin."""
    from geosat2map.onnx_export import export_onnx, onnx_matches_torch

    source = None if weights == "default" else weights
    meta = export_onnx(source, out, tile_size=tile_size, overlap=overlap, overwrite=overwrite)
    res = f", {meta['resolution']} cm/px" if "resolution" in meta else ""
    line = f"wrote {out} ({meta['model_type']}{res}, tile {meta['tile_size']}, overlap {meta['tiles_overlap']} %)"
    if check:
        line += f"; ONNX Runtime vs torch: max difference {onnx_matches_torch(source, out):.1e}"
    click.echo(line)


@cli.command("qgis-script")
@click.argument("folder", required=False, type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace a copy already there.")
def qgis_script_cmd(folder, overwrite) -> None:
    """Install translate as a QGIS Processing script into FOLDER (default: the scripts folder of
    QGIS 3's default profile). It runs geosat2map with this Python."""
    from geosat2map.qgis_script import install_script

    dst = install_script(folder, sys.executable, overwrite=overwrite)
    click.echo(f"wrote {dst}; in QGIS: Processing Toolbox > Scripts > geosat2map > Translate imagery into a map "
               "(restart QGIS, or reload the Toolbox, to see it)")
