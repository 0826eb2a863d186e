"""Where geosat2map keeps what it can make again but would rather not: ONNX exports and int8
models of a generator (translate), the teacher's maps of a training set (train)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$GEOSAT2MAP_CACHE, else $XDG_CACHE_HOME or ~/.cache, /geosat2map."""
    if os.environ.get("GEOSAT2MAP_CACHE"):
        return Path(os.environ["GEOSAT2MAP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geosat2map"


def prune(folder: Path, pattern: str, keep: int) -> None:
    """Delete all but the ``keep`` most recently used (modified or touched) files of ``folder``
    named by ``pattern``."""
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)
