"""Scoring a generator on paired data, and the triplet previews training saves."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning

from . import datasets, metrics
from .devices import resolve_device, use_bf16
from .engine import make_engine
from .errors import DataError, OutputError, gdal_reason
from .model import modes_kept, recorded_tta, tta_name, with_tta
from .quantize import calibration_picks
from .recolour import SHIFTS
from .weights import ModelSpec, as_stored, default_weights_path, load_generator, read_spec
from .writer import GDAL_WRITE_ERRORS


@torch.inference_mode()
def per_image_metrics(
    model: torch.nn.Module,
    dataset: datasets.PairDataset,
    device: torch.device,
    keep: int = 0,
    bf16: bool = False,
    classes: bool = False,
) -> tuple[list[dict[str, float]], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Each pair's metrics for ``model`` in eval mode (as translate runs it, under bf16 autocast
    when ``bf16``; with ``classes``, :func:`metrics.class_counts` too), in the dataset's order, and
    the first ``keep`` (input, output, target) triplets as uint8 tensors. The model's train/eval
    modes are restored afterwards, each layer's own."""
    per_image, kept = [], []
    with modes_kept(model):
        model.eval()
        for i in range(len(dataset)):
            a, b = dataset[i]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(a[None].to(device, memory_format=torch.channels_last))[0].float().cpu()
            out_u8, b_u8 = datasets.from_model_range(out), datasets.from_model_range(b)
            per_image.append(metrics.image_metrics(out_u8, b_u8, classes))
            if i < keep:
                kept.append((datasets.from_model_range(a).to(torch.uint8), out_u8.to(torch.uint8),
                             b_u8.to(torch.uint8)))
    return per_image, kept


def evaluate_generator(
    model: torch.nn.Module,
    dataset: datasets.PairDataset,
    device: torch.device,
    keep: int = 0,
) -> tuple[dict[str, float], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Mean metrics of ``model`` over ``dataset``, and the first ``keep`` triplets (see
    :func:`per_image_metrics`)."""
    per_image, kept = per_image_metrics(model, dataset, device, keep)
    return metrics.summarize(per_image), kept


def pair_metrics(model: torch.nn.Module, pairs: list, names: list[str], size: int,
                 device: torch.device, bf16: bool = False, classes: bool = False) -> list[dict[str, float]]:
    """Each loaded pair's metrics for ``model``, the pairs resized to ``size`` x ``size`` (no augmentation)."""
    dataset = datasets.PairDataset(pairs, names, size, size, augment=False)
    return per_image_metrics(model, dataset, device, bf16=bf16, classes=classes)[0]


def evaluate_pairs(model: torch.nn.Module, pairs: list, names: list[str], size: int,
                   device: torch.device) -> dict[str, float]:
    """Mean metrics of ``model`` over loaded pairs (see :func:`pair_metrics`)."""
    return metrics.summarize(pair_metrics(model, pairs, names, size, device))


def score_as_stored(model: torch.nn.Module, spec: ModelSpec, storage: str, data: str | Path, holdout: int,
                    direction: str = "AtoB", device: str = "auto") -> dict[str, float] | None:
    """Held-out metrics of ``model``'s weights as a file stored as ``storage`` will hold them: the
    rounding of fp16, int8 or int4 storage costs part of what the fp32 weights score (0.03 of RMSE
    for the int4 default), and a file's recorded score must be its own. None when ``data`` holds
    no validation pairs."""
    pairs, names = datasets.load_pairs(data, "val", direction, holdout)
    if not pairs:
        return None
    dev = resolve_device(device)
    scored = model if storage == "fp32" else as_stored(model, spec, storage)
    return evaluate_pairs(scored.to(dev, memory_format=torch.channels_last), pairs, names, spec.tile_size, dev)


def write_triplets(triplets: list[tuple[torch.Tensor, ...]], path: Path) -> None:
    """One PNG: a row per triplet, input | output | target side by side."""
    if not triplets:
        return
    rows = [torch.cat(list(t), dim=-1) for t in triplets]
    grid = torch.cat(rows, dim=-2).numpy().astype(np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            _write_png(path, grid)
    except GDAL_WRITE_ERRORS as exc:  # GDAL's PNG driver writes the file on close
        path.unlink(missing_ok=True)
        raise OutputError(f"writing {path} failed (disk full?): {gdal_reason(exc)}") from None


def _write_png(path: Path, grid: np.ndarray) -> None:
    with rasterio.open(path, "w", driver="PNG", width=grid.shape[2], height=grid.shape[1], count=3,
                       dtype="uint8") as dst:
        dst.write(grid)


def evaluate(
    weights: str | Path | None,
    data: str | Path | list[str | Path],
    split: str = "all",
    direction: str | None = None,
    holdout: int = 10,
    device: str = "auto",
    tta: bool | str = False,
    against: str | Path | None = None,
    precision: str = "fp32",
    classes: bool = False,
    recolour: str | None = None,
) -> dict:
    """Score a weights file (None or 'default': the default model) on the ``split`` of a paired data
    folder (or of several, as one: :func:`datasets.load_pairs`), with translate's test-time
    augmentation ``tta`` (True or ``"flip"``: its flip averaging; ``"median"``: its median of 18
    views, not in int8), at ``precision`` (fp32 by default: the figures then do not depend on the machine;
    ``bf16`` or ``auto`` score what translate's bf16 engine makes, ``int8`` what ``translate
    --precision int8`` makes, see :func:`int8_metrics`).

    Images are resized to 256 x 256, as the maps literature evaluates. With ``against`` (another
    weights file, or 'default') both are scored on the same pairs and ``difference`` gives, per
    metric, the per-pair differences ``weights`` minus ``against`` (:func:`metrics.paired_differences`):
    whether a fine-tuned model is better, not only its means. With ``classes``, the result's ``classes`` gives
    per map colour class (:data:`metrics.MAP_CLASSES`: land, buildings, roads, water, parks...) the
    generated maps' precision, recall and IoU (:func:`metrics.class_scores`). With ``recolour`` (a
    key of :data:`recolour.SHIFTS`), each input is first recoloured that way, its map kept: how the
    model copes with another source's colours. ``direction``: which half of an aligned pair is
    the input; by default the one ``weights`` was trained in (:func:`trained_direction`). The
    result's ``notes`` say where the pairs scored include pairs a model learned (:func:`trained_pairs_note`).
    """
    direction = direction or trained_direction(weights)
    if holdout < 0:
        raise DataError(f"--holdout must be 0 (none) or more, not {holdout}")
    pairs, names = datasets.load_pairs(data, split, direction, holdout)
    if not pairs:
        folders = datasets.as_folders(data)
        aligned = not all(map(datasets.is_tile_folder, folders))
        hint = " (--holdout 0 holds none out)" if split == "val" and aligned else ""
        raise DataError(f"no {split} pairs in {', '.join(map(str, folders))}{hint}")
    if recolour is not None:
        if recolour not in SHIFTS:
            raise DataError(f"unknown recolouring {recolour!r} (use {', '.join(SHIFTS)})")
        pairs = [datasets.RecolouredPair(p, recolour) for p in pairs]
    int8 = precision == "int8"
    tta = tta_name(tta)
    dev = resolve_device("cpu" if int8 and device == "auto" else device)
    bf16 = not int8 and use_bf16(precision, dev)
    scores = [_per_pair(w, pairs, names, dev, tta, bf16, int8, classes)
              for w in ([weights] if against is None else [weights, against])]
    by_class = [metrics.class_scores(s) for s in scores] if classes else []
    scores = [metrics.without_classes(s) for s in scores]
    named = [str(f) for f in data] if isinstance(data, list) else str(data)
    scored = [(weights, "the model")] + ([] if against is None else [(against, "the --against model")])
    notes = [note for note in (trained_pairs_note(w, data, split, holdout, who) for w, who in scored) if note]
    result = {"weights": str(weights or "default"), "data": named, "split": split, "tta": recorded_tta(tta),
              "precision": "int8" if int8 else "bf16" if bf16 else "fp32",
              **({"recolour": recolour} if recolour else {}), "notes": notes}
    if against is None:
        return {**result, **metrics.summarize(scores[0]), "se": metrics.standard_errors(scores[0]),
                **({"classes": by_class[0]} if classes else {})}
    return {**result, "against": str(against), "count": float(len(pairs)),
            "scores": {"weights": metrics.summarize(scores[0]), "against": metrics.summarize(scores[1])},
            "difference": metrics.paired_differences(scores[0], scores[1]),
            **({"classes": {"weights": by_class[0], "against": by_class[1]}} if classes else {})}


def trained_folders(weights: str | Path | None) -> dict[str, int]:
    """The names (last path part) of the data folders ``weights`` was trained on anywhere in its
    lineage (the runs it was fine-tuned from, the generators it is a mean of), each with the
    ``--holdout`` it was trained with (0 where none was recorded)."""
    path = default_weights_path() if weights in (None, "default") else weights
    found: dict[str, int] = {}

    def walk(provenance: object) -> None:
        if not isinstance(provenance, dict):
            return
        settings = provenance.get("settings")
        holdout = settings.get("holdout", 0) if isinstance(settings, dict) else 0
        data = provenance.get("data")
        for folder in data if isinstance(data, list) else [data] if isinstance(data, str) else []:
            found.setdefault(Path(folder).name, holdout if isinstance(holdout, int) else 0)
        parent = provenance.get("fine_tuned_from")
        walk(parent.get("provenance") if isinstance(parent, dict) else None)
        for source in provenance.get("averaged_from") or []:
            walk(source.get("provenance") if isinstance(source, dict) else None)

    walk(read_spec(path).provenance)
    return found


def trained_pairs_note(weights: str | Path | None, data: str | Path | list[str | Path], split: str,
                       holdout: int, who: str = "the model") -> str | None:
    """A note where the pairs scored include pairs ``weights`` was trained on (by the folders'
    names, :func:`trained_folders`): ``--split all`` of a folder it learned from, or ``--split
    val`` at another ``--holdout`` than it held out. Such scores flatter; the user is told how to
    score the held-out pairs alone. ``who`` names the model in the note."""
    if split == "train":  # asked for in so many words
        return None
    learned = trained_folders(weights)
    for folder in datasets.as_folders(data):
        name = folder.resolve().name
        if name not in learned:
            continue
        if datasets.is_tile_folder(folder):
            if split == "all":
                return (f"{who} was trained on a tiles folder named {name}: --split all scores its training tiles "
                        "too; --split val scores the held-out ones alone")
            continue
        kept = learned[name]
        if split == "all" or not kept or holdout % kept:
            held = f"held out one pair in {kept} (--holdout {kept})" if kept else "held out no pairs"
            alone = f"; --split val --holdout {kept} scores those alone" if kept else ""
            return (f"{who} was trained on a folder named {name} and {held}: these scores include pairs it "
                    f"learned{alone}")
    return None


def trained_direction(weights: str | Path | None) -> str:
    """The direction (``AtoB`` or ``BtoA``) ``weights`` was trained in, as its provenance records
    it; ``AtoB`` where it records none (the shipped model; files from before it was recorded): a
    map -> aerial model scored the other way round scores garbage, without a word."""
    path = default_weights_path() if weights in (None, "default") else weights
    settings = read_spec(path).provenance.get("settings")
    recorded = settings.get("direction") if isinstance(settings, dict) else None
    return recorded if recorded in ("AtoB", "BtoA") else "AtoB"


def _per_pair(weights: str | Path | None, pairs: list, names: list[str], device: torch.device,
              tta: str | None, bf16: bool, int8: bool = False, classes: bool = False) -> list[dict[str, float]]:
    """Each pair's metrics for the generator in ``weights``, on ``device``, under the test-time
    augmentation ``tta`` (a key of :data:`~geosat2map.model.TTA`, or None)."""
    model, spec = load_generator(None if weights in (None, "default") else weights)
    model = with_tta(model, tta)
    if int8:
        return int8_metrics(model, datasets.PairDataset(pairs, names, spec.tile_size, spec.tile_size, augment=False),
                            device, classes)
    model.to(device, memory_format=torch.channels_last)
    return pair_metrics(model, pairs, names, spec.tile_size, device, bf16, classes)


def int8_metrics(model: torch.nn.Module, dataset: datasets.PairDataset,
                 device: torch.device, classes: bool = False) -> list[dict[str, float]]:
    """Each pair's metrics for ``translate --precision int8``'s engine on ``model``, its activation
    ranges from inputs spread over the pairs, as translate takes them from a scene's own tiles."""
    calibration = np.stack([datasets.from_model_range(dataset[i][0]).numpy()
                            for _, i in calibration_picks(1, len(dataset))])
    return engine_metrics(make_engine(model, device, "auto", "int8", calibration=calibration), dataset, classes)


def engine_metrics(engine, dataset: datasets.PairDataset, classes: bool = False) -> list[dict[str, float]]:
    """Each pair's metrics for a translate engine (:class:`~geosat2map.engine.Engine`: 0..255 pixels
    in and out), in the dataset's order."""
    per_image = []
    for i in range(len(dataset)):
        a, b = dataset[i]
        out = torch.from_numpy(engine(datasets.from_model_range(a)[None].numpy())[0]).round()
        per_image.append(metrics.image_metrics(out, datasets.from_model_range(b), classes))
    return per_image


def evaluate_rasters(output: str | Path, map_raster: str | Path, tile: int = 256, classes: bool = False) -> dict:
    """Score a translate output against a map raster of the same ground.

    The map is warped onto the output's grid (:func:`~geosat2map.placement.warped_onto`); both are
    cut into ``tile`` x ``tile`` windows, and windows with any nodata in either, or beyond the
    map, are left out. ``classes``: per map colour class too, as :func:`evaluate`'s.
    """
    from rasterio.windows import Window

    from .errors import InputError
    from .placement import north_up, warped_onto
    from .reader import PNG_READ_OPTIONS, bounded_cache, open_raster, reading

    # A paletted map is opened in its colours (open_raster). The windows go row by row, so GDAL's
    # cache needs a row of both rasters' blocks, three bands and a mask (a 10000 x 10000 output
    # scored against itself: 1.74 GB of RSS in GDAL's default cache, 396 MB so).
    with open_raster(output) as out_ds, \
            rasterio.Env(GDAL_CACHEMAX=bounded_cache(2 * 4 * tile * out_ds.width), **PNG_READ_OPTIONS), \
            open_raster(map_raster) as map_ds, north_up(map_raster, map_ds) as north, \
            warped_onto(north, out_ds.crs, out_ds.transform, out_ds.width, out_ds.height) as warped:
        if out_ds.width < tile or out_ds.height < tile:  # a small scene at the model's resolution
            raise InputError(f"{output} is {out_ds.width} x {out_ds.height} pixels: smaller than one {tile}-pixel "
                             "window to score (translate the scene at a finer --resolution)")
        bands = [1, 2, 3] if map_ds.count >= 3 else [1, 1, 1]
        per_tile = []
        for y in range(0, out_ds.height - tile + 1, tile):
            for x in range(0, out_ds.width - tile + 1, tile):
                w = Window(x, y, tile, tile)
                with reading(output):
                    a = out_ds.read([1, 2, 3], window=w) if (out_ds.dataset_mask(window=w) > 0).all() else None
                with reading(map_raster):
                    if a is None or not (warped.dataset_mask(window=w) > 0).all():
                        continue
                    b = warped.read(bands, window=w)
                per_tile.append(metrics.image_metrics(torch.from_numpy(a.astype(np.float32)),
                                                      torch.from_numpy(b.astype(np.float32)), classes))
    if not per_tile:
        raise InputError(f"no complete {tile}-pixel window where {output} and {map_raster} both have data")
    by_class = {"classes": metrics.class_scores(per_tile)} if classes else {}
    per_tile = metrics.without_classes(per_tile)
    return {"output": str(output), "map": str(map_raster), **metrics.summarize(per_tile),
            "se": metrics.standard_errors(per_tile), **by_class}


def water_by_ndwi(scene: str | Path, output: str | Path, green: int = 2, nir: int = 4) -> dict[str, float]:
    """Where a translate output paints the maps' water colour, judged by the scene's own
    near-infrared band: a check of a map on ground with no map to compare against.

    The output is read onto the scene's grid (average). Water is NDWI (green - NIR) / (green + NIR)
    above 0.2, land below -0.1 (between: undecided); the maps' water colour is blue more than 25
    levels above red. Returns the fractions of valid pixels that are water and land, ``precision``
    (water-coloured pixels that are water), ``land_as_water`` and ``water_found``.
    """
    from rasterio.enums import Resampling

    with rasterio.open(scene) as src:
        green_band, nir_band = (src.read(b).astype(np.float64) for b in (green, nir))
        valid = src.dataset_mask() > 0
    with rasterio.open(output) as dst:
        rgb = dst.read([1, 2, 3], out_shape=(3, *valid.shape), resampling=Resampling.average).astype(int)
    ndwi = (green_band - nir_band) / (green_band + nir_band + 1e-6)
    water, land = valid & (ndwi > 0.2), valid & (ndwi < -0.1)
    painted = valid & (rgb[2] > rgb[0] + 25)
    return {"water": float(water.mean()), "land": float(land.mean()),
            "precision": float((painted & water).sum() / max(painted.sum(), 1)),
            "land_as_water": float(painted[land].mean()), "water_found": float(painted[water].mean())}
