"""``geosat2map translate``: scenes to maps, and its dry run."""

from __future__ import annotations

from pathlib import Path

import click

from geosat2map.errors import Geosat2mapError

from .common import LazyBar, expand_globs, helper_rank, is_pattern, parse_resolution


def _parse_bands(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return [int(b) for b in value.split(",")]
    except ValueError:
        raise click.BadParameter("a comma-separated list of band numbers, e.g. 1,2,3") from None


@click.command()
@click.argument("src", nargs=-1, required=True, type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--weights", default=None, help="Generator weights (.safetensors); default: the shipped model.")
@click.option("--resolution", default="model", show_default=True, callback=parse_resolution,
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
    scene's file name there, and the model is loaded once. A scene that fails is reported and the
    others go on (exit status 1 at the end).
    """
    from geosat2map.reader import check_input, is_gdal_path
    from geosat2map.writer import GEOTIFF, check_destination

    to_folder = len(src) > 1 or any(map(is_pattern, src))  # pattern: a folder
    src = expand_globs(src)
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
    from geosat2map.pipeline import DEFAULT_OVERLAP, FinishedMap, translate_many
    from geosat2map.pipeline import translate as run_translate

    retain_freed_memory()  # batch after batch, the same activations' memory (see geosat2map.allocator)

    helper = helper_rank()
    bar = LazyBar(unit="tile", disable=quiet or helper, dynamic_ncols=True, leave=False)  # one per scene

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
    from geosat2map.pipeline import (
        DEFAULT_OVERLAP,
        check_map_folder,
        kept_rows,
        map_name,
        plan_translation,
    )
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
