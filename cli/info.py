"""``geosat2map info``: what a weights file, a map translate wrote, or a training run is."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import echo_val, scores


@click.command()
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

    echo_val(prov, dtype)
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
        scored = f"held out {scores(val)}" if isinstance(val, dict) else "not scored (no held-out pairs)"
        click.echo(f"{label}: epoch {record.get('epoch', '?')}, step {record.get('step', '?')}: {scored}")
    trained = run.trained_beat_average()
    if trained:
        click.echo(f"its trained weights (not the average) at epoch {last.get('epoch', '?')}: held out "
                   f"{scores(trained)}; `geosat2map export-weights {run.path} OUT.safetensors --which trained` "
                   "makes a weights file of them")
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
