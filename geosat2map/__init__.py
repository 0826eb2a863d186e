"""geosat2map: georeferenced satellite/aerial imagery to georeferenced map-style rasters with Pix2Pix.

The public names are imported on first use (PEP 562), not with the package: importing torch
takes over a second, and the command line imports ``geosat2map.errors`` before every command,
so ``geosat2map --help`` took 2 s instead of 0.07 s.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
#: Where each public name lives.
_EXPORTS = {
    "Geosat2mapError": "errors",
    "TranslateResult": "pipeline",
    "translate": "pipeline",
    "ModelSpec": "weights",
    "load_generator": "weights",
    "save_generator": "weights",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .errors import Geosat2mapError
    from .pipeline import TranslateResult, translate
    from .weights import ModelSpec, load_generator, save_generator


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # geosat2map.errors, .train, ... as attributes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
