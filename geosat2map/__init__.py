"""geosat2map: georeferenced satellite/aerial imagery to georeferenced map-style rasters with Pix2Pix."""

from .errors import Geosat2mapError
from .pipeline import TranslateResult, translate
from .weights import ModelSpec, load_generator, save_generator

__version__ = "0.1.0"
__all__ = ["Geosat2mapError", "ModelSpec", "TranslateResult", "load_generator", "save_generator", "translate",
           "__version__"]
