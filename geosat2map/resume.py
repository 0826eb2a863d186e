"""The progress record of an interrupted translate, kept beside its partial output.

``translate --resume`` continues only the run that made the partial file: the record names the
input (path, size, modification time), the options that shape the output grid and pixels, and a
digest of the generator's weights, and a resumed run must match all three. It also says how many
output rows the partial file holds; everything else (which tiles to recompute, how the blend
continues) follows from the tile grid, so no blending state is stored.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .files import write_text_whole
from .records import fits

VERSION = 1
#: Options records came to hold after they first did, with the value every run had before: a
#: partial output kept by an earlier version still resumes under the same options.
ADDED_OPTIONS = {"compress": "zstd", "quality": None, "aoi": None, "src_nodata": None}


def record_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.part.json")


def identity(src: Path | str, options: dict, digest: str) -> dict:
    """What a resumed run must share with the interrupted one (``digest``: the model's,
    :func:`~geosat2map.weights.model_digest`). A remote input (a URL or /vsi path, given as a str)
    is named by its address alone: its size and date are not asked of the server."""
    if isinstance(src, str):
        source = {"path": src}
    else:
        st = src.stat()
        source = {"path": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"input": source, "options": options, "model_sha256": digest}


def save(path: Path, ident: dict, rows: int, computed: int) -> None:
    """Write the record atomically and durably (a torn record would make the partial file
    unusable; one lost in a power cut would hide it)."""
    record = {"version": VERSION, **ident, "rows": rows, "computed": computed}
    write_text_whole(path, json.dumps(record, indent=1), durable=True)


def load(path: Path, partial: Path, dst: Path) -> dict:
    """The record of an interrupted run for ``dst``, or a one-line error saying why there is none."""
    if not path.exists() or not partial.exists():
        raise InputError(f"nothing to resume for {dst}: no partial output of an interrupted run beside it")
    try:
        record = json.loads(path.read_text())
        if not _well_formed(record):
            raise ValueError
    except (ValueError, OSError):
        raise InputError(f"the progress record {path} is unreadable; run without --resume to start over") from None
    return record


def _well_formed(record) -> bool:
    """Whether ``record`` holds what a resume reads from it, of the right types: one edited or
    damaged into other JSON is unreadable, not a traceback further on."""
    if not isinstance(record, dict) or record.get("version") != VERSION:
        return False
    options = record.get("options", {})
    counts = all(fits(record.get(n), int) and record[n] >= 0 for n in ("rows", "computed"))
    # the backend names the engine a resume makes again
    return counts and isinstance(options, dict) and isinstance(options.get("backend", ""), str)


def check(record: dict, ident: dict, dst: Path) -> None:
    """Refuse to continue a partial output made from another input, options or model."""
    for key, what in (("input", "input file"), ("model_sha256", "model")):
        if record.get(key) != ident[key]:
            raise InputError(f"the partial output of {dst} was made from another {what}; "
                             "run without --resume to start over")
    saved = {**ADDED_OPTIONS, **record.get("options", {})}
    for name, value in ident["options"].items():
        if saved.get(name) != value:
            raise InputError(f"the partial output of {dst} was made with {name}={saved.get(name)!r}, "
                             f"not {value!r}; pass the same options, or run without --resume")
