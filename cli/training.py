"""Training commands: cut pairs from a region (``tiles``), ``train`` and ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geosat2map.errors import DataError

from .common import METRIC_COLUMNS, LazyBar, helper_rank, metric, parse_resolution, scores


@click.command()
@click.argument("sat", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--map", "map_raster", type=click.Path(dir_okay=False), help="A map raster of the same ground.")
@click.option("--vector", "vectors", multiple=True, help="Vector layer FILE or FILE:LAYER (repeatable).")
@click.option("--resolution", default="model", show_default=True, callback=parse_resolution,
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


@click.command()
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
    from geosat2map.train import TrainConfig
    from geosat2map.train import train as run_training

    config = TrainConfig(data=data[0] if len(data) == 1 else list(data), out=out, **options)
    helper = helper_rank()
    bar = LazyBar(unit="step", disable=quiet or helper, dynamic_ncols=True, smoothing=0.05)

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
                   + (f", val {scores(val, ('rmse', 'acc5'))}" if val else ""))


@click.command()
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
    from geosat2map.evaluate import evaluate as run_eval
    from geosat2map.evaluate import evaluate_rasters

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
        cells = [metric(k, heading, d, result[k], se[k]) for k, heading, d in METRIC_COLUMNS]
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


def _echo_comparison(result: dict) -> None:
    """Both generators' means, then weights minus against per pair: mean +- standard error, and
    on how many pairs the first is the better."""
    n = int(result["count"])
    difference = result["difference"]
    rows = [(f"{which}: {result[which]}", [f"{result['scores'][which][k]:.{d}f}" for k, _, d in METRIC_COLUMNS])
            for which in ("weights", "against")]
    rows += [("difference +- s.e.", [f"{difference[k]['mean']:+.{d}f} +- {difference[k]['se']:.{d}f}"
                                     for k, _, d in METRIC_COLUMNS]),
             ("weights better on", [f"{int(difference[k]['better'])} of {int(difference[k]['count'])}"
                                    for k, _, _ in METRIC_COLUMNS])]
    label = max(len(r[0]) for r in rows)
    widths = [max(len(h), *(len(r[1][i]) for r in rows)) for i, (_, h, _) in enumerate(METRIC_COLUMNS)]
    headings = "  ".join(h.rjust(w) for (_, h, _), w in zip(METRIC_COLUMNS, widths))
    click.echo(f"{n} pair{'' if n == 1 else 's'} of 256 x 256".ljust(label) + "  " + headings)
    for name, cells in rows:
        click.echo(name.ljust(label) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
