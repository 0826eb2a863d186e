"""What a map records of how it was made (GeoTIFF metadata tags), and reading it back.

Kept apart from the pipeline (and torch) so that a preview, ``geosat2map info`` and a resumed
batch read a map's record the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .reader import Scene, open_raster, scene_name

#: The tag holding the translate options a map was asked for, as JSON.
OPTIONS_TAG = "GEOSAT2MAP_OPTIONS"


def provenance_tags(src: Path | str, scene: Scene, digest: str, engine: str, tile_size: int,
                    overlap: int, tta: str | None, asked: str) -> dict[str, str]:
    """What a map records of how it was made (beside :func:`~geosat2map.writer.software_tags`): the
    scene's file name, the model's ``digest`` (the sha256 weights provenance and resume records use,
    see :func:`~geosat2map.weights.model_digest`), the resolution and the tiling, the options it
    was ``asked`` for (:func:`~geosat2map.pipeline.asked_options`); ``tta``: how the test-time
    augmentation run is named (``"flip-averaged (--tta)"``), None without one; with an area of
    interest, the polygons' file (and layer); with ``--src-nodata``, its value; with
    ``--rpc-dem``, the DEM's file name."""
    optional = {} if scene.aoi_source is None else {"GEOSAT2MAP_AOI": Path(scene.aoi_source).name}
    if scene.src_nodata is not None:
        optional["GEOSAT2MAP_SRC_NODATA"] = f"{scene.src_nodata:g}"
    if scene.rpc_dem is not None:
        optional["GEOSAT2MAP_RPC_DEM"] = scene_name(scene.rpc_dem)
    return optional | {
        "GEOSAT2MAP_SOURCE": scene_name(src),
        "GEOSAT2MAP_MODEL_SHA256": digest,
        "GEOSAT2MAP_RESOLUTION": f"{scene.gsd_m:.4g} m/pixel" if scene.gsd_m else "the scene's pixels (no ground size)",
        "GEOSAT2MAP_TILING": f"{tile_size}-pixel tiles overlapping by {overlap}, {engine}"
                             + (f", {tta}" if tta else ""),
        OPTIONS_TAG: asked,
    }


def recorded_options(tags: dict[str, str]) -> dict | None:
    """The translate options a map's ``tags`` record as asked, or None where they record none
    (maps made before session 38) or none readable: the tag is plain text anyone can edit
    (``gdal_edit.py -mo``), so a resumed batch or ``info`` must not trust it to be a JSON object."""
    try:
        options = json.loads(tags[OPTIONS_TAG])
    except (KeyError, ValueError):
        return None
    return options if isinstance(options, dict) else None


def read_provenance(path: str | Path) -> dict:
    """What the map at ``path`` records of how it was made (:func:`provenance_tags` and the
    software tags), with its size and CRS: the tags as text but the options (``GEOSAT2MAP_OPTIONS``)
    as a dict, None where unreadable (:func:`recorded_options`). An :class:`InputError` for a
    raster geosat2map did not make."""
    with open_raster(path) as src:
        tags = src.tags()
        about = {"file": str(path), "width": src.width, "height": src.height,
                 "crs": src.crs.to_string() if src.crs else None}
    if not any(k.startswith("GEOSAT2MAP_") for k in tags):
        raise InputError(f"{path} is a raster, but not a map geosat2map made: it records no GEOSAT2MAP tags "
                         "(translate --dry-run plans the map of a scene)")
    made = about | {k: v for k, v in tags.items()
                    if k.startswith(("GEOSAT2MAP_", "TIFFTAG_SOFTWARE", "TIFFTAG_DATETIME"))}
    if OPTIONS_TAG in made:
        made[OPTIONS_TAG] = recorded_options(tags)
    return made
