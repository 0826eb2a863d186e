"""Exporting a training run's generator to the weights file translate loads."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import torch

from .datasets import as_folders
from .errors import InputError, first_line
from .evaluate import score_as_stored
from .model import UNetGenerator
from .train import CHECKPOINT, TrainConfig
from .weights import ModelSpec, load_generator, read_spec, save_generator
from .writer import WEIGHTS, check_destination


def export_run(
    run_dir: str | Path,
    out: str | Path,
    which: str = "best",
    storage: str = "fp32",
    gsd_m: float | None = None,
    overwrite: bool = False,
) -> ModelSpec:
    """Copy a training run's best, latest or trained generator to ``out``, stored as ``storage``
    (see :func:`~geosat2map.weights.save_generator`) and optionally with a new GSD. Stored in fewer
    bits, it is scored again on the run's held-out pairs (see :func:`_rescored`).

    ``which="trained"``: a run with a weight average (``--ema-decay``) saves and scores the average;
    this takes the weights being trained after its latest epoch instead (``val_online`` in its
    history), which have scored the better RMSE at times.

    ``which="unrounded"``: the latest generator at full precision, from the run's checkpoint. A
    ``--storage-aware`` run's files hold it rounded as stored, and weights averaged from rounded
    files are rounded twice: two such runs' latest generators averaged at full precision and
    stored in int4 scored RMSE 21.37 on the maps pairs, their int4 files averaged 21.39.
    """
    run_dir, out = Path(run_dir), Path(out)
    name = {"best": "best_generator", "latest": "generator", "trained": "trained_generator",
            "unrounded": "generator"}[which]
    src = run_dir / f"{name}.safetensors"
    check_destination(out, None, overwrite, WEIGHTS)
    latest = run_dir / "generator.safetensors"
    if not latest.exists():  # generators are saved at each epoch's end
        if (run_dir / "checkpoint.pt").exists():
            raise InputError(f"{run_dir} has not finished an epoch yet, so it holds no generator to export "
                             "(its checkpoint is mid-epoch): resume it (train --resume) past the epoch's end")
        raise InputError(f"{run_dir} is not a training run (no checkpoint.pt, no generator.safetensors)")
    if which == "trained" and not src.exists():
        if not read_spec(latest).provenance.get("settings", {}).get("ema_decay"):
            raise InputError("this run keeps no weight average (--ema-decay): its generator file already "
                             "holds the trained weights (--which latest)")
        raise InputError(f"{run_dir} predates trained_generator.safetensors: with --keep-snapshots its "
                         "snapshots/epochNNN.trained.safetensors hold each epoch's trained weights")
    if which == "best" and not src.exists():
        raise InputError(f"{run_dir} trained without validation pairs (--holdout 0, or a tile folder "
                         "without a val split), so it has no best generator: export --which latest")
    model, spec = load_generator(src)
    if which == "unrounded":
        _load_unrounded(model, run_dir, spec)
        provenance = {k: v for k, v in spec.provenance.items() if k not in ("val", "val_storage")}
        spec = replace(spec, provenance={**provenance, **_scored(model, spec, storage, run_dir)})
    if gsd_m is not None:
        spec = replace(spec, gsd_m=gsd_m)
    # (a storage-aware run's generator is already scored as it stores it; one trained without
    # validation pairs has no score to redo)
    if storage != "fp32" and spec.provenance.get("val") and spec.provenance.get("val_storage") != storage:
        spec = replace(spec, provenance=_rescored(model, spec, storage, run_dir))
    save_generator(model, spec, out, storage)
    return spec


def _load_unrounded(model: UNetGenerator, run_dir: Path, spec: ModelSpec) -> None:
    """The run's checkpoint's generator (its weight average, with one) into ``model``: the same
    epoch as its latest generator file, at full precision. A checkpoint written after it (a run
    stopped, or still training, in a later epoch) holds other weights: refused."""
    path = run_dir / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{run_dir} has no {CHECKPOINT} to take full-precision weights from") from None
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise InputError(f"{path} is not a readable checkpoint: {first_line(exc)}") from None
    step = spec.provenance.get("step")
    if not isinstance(state, dict) or state.get("global_step") != step:
        raise InputError(f"{path} is not at its run's latest generator (step {step}): export --which "
                         "unrounded from a run that ended an epoch and stopped there")
    try:
        model.load_state_dict(state.get("G_ema", state.get("G")))
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise InputError(f"{path} holds no generator of its run's width: {first_line(exc)}") from None


def _scored(model: UNetGenerator, spec: ModelSpec, storage: str, run_dir: Path) -> dict:
    """``val``: the held-out score of the weights as ``storage`` keeps them (``val_storage``), on
    the run's own validation pairs; nothing when the run's data folder is not where its config
    says (moved, another machine)."""
    config = TrainConfig.from_json(run_dir / "config.json")
    if all(folder.is_dir() for folder in as_folders(config.data)):
        val = score_as_stored(model, spec, storage, config.data, config.holdout, config.direction)
        if val:
            return {"val": val, "val_storage": storage}
    return {}


def _rescored(model: UNetGenerator, spec: ModelSpec, storage: str, run_dir: Path) -> dict:
    """The provenance with ``val`` the score of the weights as ``storage`` keeps them (see
    :func:`_scored`) and the run's fp32 score as ``val_before_storage``."""
    provenance = dict(spec.provenance)
    provenance["val_before_storage"] = provenance.pop("val")
    return {**provenance, **_scored(model, spec, storage, run_dir)}
