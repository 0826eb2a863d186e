"""Averaging generator snapshots of one training run into one generator.

GAN generators wander around a good solution from epoch to epoch (this project's validation RMSE
moves by about 1 between consecutive epochs); the mean of the weights of several snapshots of the
same run is often better than any of them (Yazici et al., "The unusual effectiveness of averaging
in GAN training", ICLR 2019; model soups). The snapshots must share the architecture; BatchNorm
statistics are then re-estimated for the averaged weights on training crops, as the trainer does
at each epoch end, unless every snapshot has the same statistics: a run trained with frozen
BatchNorm (``train --freeze-batchnorm``) learned its weights for those statistics, so they are kept
unless re-estimation is asked for.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from . import datasets
from .devices import resolve_device
from .errors import WeightsError
from .evaluate import score_as_stored
from .model import UNetGenerator
from .train import recalibrate_batchnorm
from .weights import ModelSpec, load_generator, model_digest


def average_generators(
    weights: list[str | Path],
    data: str | Path,
    *,
    recalibration: int | None = None,
    batch: int = 4,
    holdout: int = 10,
    load_size: int = 286,
    direction: str = "AtoB",
    seed: int = 0,
    device: str = "auto",
    storage: str = "fp32",
) -> tuple[UNetGenerator, ModelSpec]:
    """The mean of the generators in ``weights``, its BatchNorm statistics kept when they are the
    same in every input (see the module's docstring) and ``recalibration`` is None, else
    re-estimated over ``recalibration`` training crops (None: one of every pair) of the paired
    data folder ``data`` (the training split, ``holdout`` as in training, so validation pairs
    stay unseen; ``load_size`` as the run was trained, so the statistics come from the scale the
    weights learned). The held-out pairs are then scored and the metrics kept in the spec's
    provenance (``val``), as the trainer does: those of the weights as a file stored as
    ``storage`` (see :func:`~geosat2map.weights.save_generator`) holds them."""
    if len(weights) < 2:
        raise WeightsError("averaging needs at least two weights files")
    loaded = [load_generator(w) for w in weights]
    sources = [{"file": Path(w).name, "sha256": model_digest(m), "provenance": s.provenance}
               for w, (m, s) in zip(weights, loaded)]
    model, spec = loaded[0]
    shape = (spec.arch, spec.ngf, spec.in_channels, spec.out_channels, spec.norm)
    for w, (_, other) in zip(weights[1:], loaded[1:]):
        if (other.arch, other.ngf, other.in_channels, other.out_channels, other.norm) != shape:
            raise WeightsError(f"{w} is a different generator (width {other.ngf}) from {weights[0]} (width {spec.ngf})")
        if not _same_scale(other.gsd_m, spec.gsd_m):  # the mean would record one scale for weights that learned two
            raise WeightsError(f"{w} learned {_scale(other.gsd_m)} and {weights[0]} {_scale(spec.gsd_m)}: "
                               "average generators trained at one ground sampling distance")
    states = [m.state_dict() for m, _ in loaded]
    mean = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            mean[key] = torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        else:  # BatchNorm's batch counters: reset by the recalibration below
            mean[key] = value
    model.load_state_dict(mean)
    dev = resolve_device(device)
    model.to(dev, memory_format=torch.channels_last)
    provenance = {"recipe": spec.provenance.get("recipe"), "averaged_from": sources}
    statistics = [k for k in states[0] if k.endswith(("running_mean", "running_var"))]
    if recalibration is None and all(torch.equal(s[k], states[0][k]) for s in states[1:] for k in statistics):
        provenance["bn_statistics"] = "kept: the same in every input"
    else:
        pairs, names = datasets.load_pairs(data, "train", direction, holdout)
        crops = datasets.PairDataset(pairs, names, load_size, augment=True, seed=seed)
        used = recalibrate_batchnorm(model, crops, recalibration, batch, seed, dev)
        provenance["bn_recalibration"] = {"crops": used, "batch": batch, "data": str(data), "holdout": holdout,
                                          "load_size": load_size}
    val = score_as_stored(model, spec, storage, data, holdout, direction, device)
    if val:  # scored like a trained snapshot, so the file says how good it is
        provenance["val"], provenance["val_storage"] = val, storage
    return model.eval(), replace(spec, provenance=provenance)


def _same_scale(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-3))


def _scale(gsd_m: float | None) -> str:
    return f"{gsd_m:.2f} m pixels" if gsd_m is not None else "no recorded pixel size"
