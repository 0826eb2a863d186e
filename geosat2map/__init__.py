"""geosat2map: georeferenced satellite/aerial imagery to georeferenced map-style rasters with Pix2Pix."""

from .errors import Geosat2mapError
from .weights import ModelSpec, load_generator, save_generator

__version__ = "0.1.0"
__all__ = ["Geosat2mapError", "ModelSpec", "load_generator", "save_generator", "__version__"]
