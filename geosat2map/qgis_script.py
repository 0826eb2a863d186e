"""The QGIS Processing script (``qgis/geosat2map_translate.py`` in the package), installed into a
QGIS profile with the path of the Python that runs geosat2map written into it.

QGIS runs Processing scripts in its own Python, which has neither torch nor this package; the
script runs ``python -m geosat2map_cli translate`` with the Python recorded here instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import OutputError

SCRIPT = Path(__file__).with_name("qgis") / "geosat2map_translate.py"
#: The line of the script that names the Python to run, as shipped.
PLACEHOLDER = 'PYTHON = "python3"'


def default_scripts_folder() -> Path:
    """The Processing scripts folder of QGIS 3's default profile on this system."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "QGIS" / "QGIS3" / "profiles" / "default" / "processing" / "scripts"


def install_script(folder: Path | None = None, python: str = sys.executable, overwrite: bool = False) -> Path:
    """Write the script into ``folder`` (default: :func:`default_scripts_folder`, made if missing)
    to run geosat2map with ``python``; returns its path. An existing copy is replaced only when
    ``overwrite``."""
    folder = Path(folder) if folder is not None else default_scripts_folder()
    dst = folder / SCRIPT.name
    if dst.exists() and not overwrite:
        raise OutputError(f"{dst} exists (pass --overwrite to replace it)")
    text = SCRIPT.read_text(encoding="utf-8")
    if text.count(PLACEHOLDER) != 1:
        raise RuntimeError(f"{SCRIPT} must name its Python once as {PLACEHOLDER}")
    tmp = dst.with_name(f".{dst.name}.part")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text.replace(PLACEHOLDER, f"PYTHON = {str(python)!r}"), encoding="utf-8")
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # a full disk: not half a script left beside the user's
        raise OutputError(f"cannot write {dst}: {exc.strerror or exc}") from None
    return dst
