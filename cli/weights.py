"""Commands that write weights files: ``export-weights``, ``average-weights``, ``export-onnx``."""

from __future__ import annotations

from pathlib import Path

import click

from .common import echo_val


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


@click.command("export-weights")
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
    echo_val(spec.provenance)


@click.command("average-weights")
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
    echo_val(spec.provenance)


@click.command("export-onnx")
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
