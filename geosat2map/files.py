"""Small files written whole or not at all: a progress record, a run's settings, auto's picks."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_whole(path: Path, text: str, durable: bool = False) -> None:
    """``text`` written to ``path`` through a temporary file renamed into place (one per process:
    runs may share the folder), so a reader never sees it torn; ``durable``: synced to disk first
    (a record that a power cut must not lose). On any failure, a full disk or Ctrl-C, nothing of
    the temporary file is left; an OSError is the caller's to report."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink()
        except OSError:  # renamed into place, never made, or no folder at all
            pass
