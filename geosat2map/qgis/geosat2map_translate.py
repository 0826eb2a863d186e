"""geosat2map translate as a QGIS Processing algorithm (Processing Toolbox > Scripts > geosat2map).

`geosat2map qgis-script` copies this file into a QGIS profile's processing/scripts folder with
PYTHON below set to the Python that has geosat2map installed; QGIS's own Python need not have
torch or rasterio. The algorithm runs `python -m geosat2map_cli translate` on the layer's file
in a child process (the same seamless, streaming map as on the command line), shows its progress,
stops it (SIGTERM: no half-written map is left; the rows done wait for "Continue") when the user
cancels, and loads the map; and, where asked, the map's classes (`geosat2map classify`) and
their patches as polygons (`geosat2map vectorize`).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingUtils,
)

#: The Python interpreter with geosat2map installed (written by `geosat2map qgis-script`).
PYTHON = "python3"

#: Variables QGIS sets for its own GDAL, PROJ and Python, which would point geosat2map's
#: (rasterio's and pyproj's own builds, another Python) at files of other versions.
FOREIGN = ("PYTHONHOME", "PYTHONPATH", "GDAL_DATA", "GDAL_DRIVER_PATH", "PROJ_LIB", "PROJ_DATA")


class Geosat2mapTranslate(QgsProcessingAlgorithm):
    INPUT, EXTENT, AOI, BANDS, WEIGHTS, RESOLUTION = "INPUT", "EXTENT", "AOI", "BANDS", "WEIGHTS", "RESOLUTION"
    NODATA, TTA, COMPRESSION, RESUME, OUTPUT = "NODATA", "TTA", "COMPRESSION", "RESUME", "OUTPUT"
    CLASSES, FEATURES, SIMPLIFY, DEM = "CLASSES", "FEATURES", "SIMPLIFY", "DEM"
    #: The formats vectorize writes (geosat2map.vectorize.VECTOR_SUFFIXES: this script runs in QGIS's
    #: Python, which has no geosat2map to import), checked before translate's minutes, not after.
    FEATURE_FORMATS = (".gpkg", ".geojson", ".json", ".fgb")
    #: translate --compress's choices, as the dialog lists them.
    COMPRESSIONS = (("zstd", "ZSTD (lossless)"), ("deflate", "DEFLATE (lossless, for older readers)"),
                    ("lzw", "LZW (lossless, for older readers)"), ("jpeg", "JPEG (lossy, small)"),
                    ("webp", "WebP (lossy, smallest)"))
    #: translate's test-time augmentations, as the dialog lists them.
    TTAS = ((None, "None"), ("--tta", "Average with the mirrored image's map (cleaner, twice the compute)"),
            ("--tta-median", "Median of 18 shifted and mirrored views (cleaner still, 18 times the compute)"))

    def name(self) -> str:
        return "translate"

    def displayName(self) -> str:
        return "Translate imagery into a map"

    def group(self) -> str:
        return "geosat2map"

    def groupId(self) -> str:
        return "geosat2map"

    def shortHelpString(self) -> str:
        return ("Turns a georeferenced satellite or aerial image into a map-style GeoTIFF with a Pix2Pix "
                "generator (geosat2map translate): streamed in overlapping 256-pixel tiles, seamless, with the "
                "image's CRS, footprint and nodata mask. Resolution: 'model' (the ground sampling distance the "
                "model learned), 'native', or metres per pixel.")

    def createInstance(self) -> Geosat2mapTranslate:
        return Geosat2mapTranslate()

    def initAlgorithm(self, config=None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Satellite or aerial image"))
        self.addParameter(QgsProcessingParameterExtent(
            self.EXTENT, "Only this extent (empty: the whole image)", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.AOI, "Only inside these polygons (the rest of their extent transparent)",
            types=[QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.BANDS, "Bands as red,green,blue, e.g. 3,2,1 (empty: by colour interpretation, else 1,2,3)",
            optional=True))
        self.addParameter(QgsProcessingParameterFile(
            self.WEIGHTS, "Generator weights (.safetensors; empty: the shipped model)", optional=True,
            fileFilter="Weights (*.safetensors)"))
        self.addParameter(QgsProcessingParameterString(
            self.RESOLUTION, "Resolution: model, native or metres per pixel", defaultValue="model"))
        self.addParameter(QgsProcessingParameterNumber(
            self.NODATA, "Nodata value of the image, in every band (empty: the image's own nodata or mask)",
            type=QgsProcessingParameterNumber.Double, optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.DEM, "DEM to orthorectify an image georeferenced by RPCs over (empty: the RPCs' mean height)",
            optional=True))
        self.addParameter(QgsProcessingParameterEnum(
            self.TTA, "Test-time augmentation", options=[label for _, label in self.TTAS], defaultValue=0))
        self.addParameter(QgsProcessingParameterEnum(
            self.COMPRESSION, "Compression", options=[label for _, label in self.COMPRESSIONS], defaultValue=0))
        self.addParameter(QgsProcessingParameterBoolean(
            self.RESUME, "Continue the run canceled (or killed) before, from the rows it kept", defaultValue=False))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Map"))
        self.addParameter(QgsProcessingParameterRasterDestination(  # geosat2map classify on the map
            self.CLASSES, "Classes of the map (land, building, road, highway, water, park)", optional=True,
            createByDefault=False))
        self.addParameter(QgsProcessingParameterVectorDestination(  # geosat2map vectorize on the classes
            self.FEATURES, "Features of the map (its lakes, parks, buildings and roads as polygons)",
            QgsProcessing.TypeVectorPolygon, optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterNumber(  # vectorize --simplify
            self.SIMPLIFY, "Smoothing of the features' outlines, in pixels (0: the pixels' edges; 2: smooth)",
            type=QgsProcessingParameterNumber.Double, minValue=0, defaultValue=0))

    def processAlgorithm(self, parameters, context, feedback) -> dict:
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        source = layer.source() if layer is not None else None
        if not source:
            raise QgsProcessingException("no input image")
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        features = self.parameterAsOutputLayer(parameters, self.FEATURES, context)
        if features and not features.lower().endswith(self.FEATURE_FORMATS):
            raise QgsProcessingException(f"the features are written as GeoPackage, GeoJSON or FlatGeobuf, "
                                         f"not {os.path.basename(features)}")
        resume = self.parameterAsBoolean(parameters, self.RESUME, context)
        # A new run replaces the map there (Processing's own rule); a resumed one keeps a map that is
        # already finished, if it is this image's by this model, instead of failing to find a partial.
        command = [PYTHON, "-m", "geosat2map_cli", "translate", source, out, "--resume" if resume else "--overwrite",
                   "--resolution", self.parameterAsString(parameters, self.RESOLUTION, context).strip() or "model"]
        if parameters.get(self.EXTENT):  # translate --bounds: the source pixels that cover it
            box = self.parameterAsExtent(parameters, self.EXTENT, context)
            crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
            command += ["--bounds", *(repr(v) for v in (box.xMinimum(), box.yMinimum(), box.xMaximum(),
                                                          box.yMaximum()))]
            if crs.isValid():
                command += ["--bounds-crs", crs.authid() or crs.toWkt()]
        if parameters.get(self.AOI):  # translate --aoi: the layer's file, or its (selected) features written to one
            path, layer_name = self.parameterAsCompatibleSourceLayerPathAndLayerName(
                parameters, self.AOI, context, ["gpkg", "shp", "geojson"], "gpkg", feedback)
            command += ["--aoi", f"{path}:{layer_name}" if layer_name else path]
        bands = self.parameterAsString(parameters, self.BANDS, context).strip()
        if bands:
            command += ["--bands", bands]
        weights = self.parameterAsFile(parameters, self.WEIGHTS, context)
        if weights:
            command += ["--weights", weights]
        if parameters.get(self.NODATA) is not None:  # translate --src-nodata: a collar the file does not mark
            command += ["--src-nodata", repr(self.parameterAsDouble(parameters, self.NODATA, context))]
        dem = self.parameterAsRasterLayer(parameters, self.DEM, context)
        if dem is not None:  # translate --rpc-dem
            command += ["--rpc-dem", dem.source()]
        tta = self.TTAS[self.parameterAsEnum(parameters, self.TTA, context)][0]
        if tta:
            command.append(tta)
        command += ["--compress", self.COMPRESSIONS[self.parameterAsEnum(parameters, self.COMPRESSION, context)][0]]
        if not _run(command, feedback):
            return {}
        results = {self.OUTPUT: out}
        classes = self.parameterAsOutputLayer(parameters, self.CLASSES, context)
        # The features are traced from the classes: asked for alone, those go to a temporary file.
        classified = classes or (QgsProcessingUtils.generateTempFilename("classes.tif") if features else None)
        if classified:
            if not _run([PYTHON, "-m", "geosat2map_cli", "classify", out, classified, "--overwrite"], feedback):
                return {}
            if classes:
                results[self.CLASSES] = classes
        if features:
            simplify = repr(self.parameterAsDouble(parameters, self.SIMPLIFY, context))
            if not _run([PYTHON, "-m", "geosat2map_cli", "vectorize", classified, features, "--simplify", simplify,
                         "--overwrite"], feedback):
                return {}
            results[self.FEATURES] = features
        feedback.setProgress(100)
        return results


def _run(command: list[str], feedback) -> bool:
    """Run a geosat2map command in a child process, relaying its progress and messages; stop it on
    cancel (False); a QgsProcessingException with its error line if it fails."""
    feedback.pushCommandInfo(" ".join(command))
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    try:
        # No console window for the child on Windows (the flag is 0 elsewhere).
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                 errors="replace", creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    except OSError as exc:
        raise QgsProcessingException(f"cannot run geosat2map with {PYTHON}: {exc}") from None
    events: queue.SimpleQueue = queue.SimpleQueue()  # the child's progress and messages, in order
    reader = threading.Thread(target=_follow, args=(child.stderr, events), daemon=True)
    reader.start()
    lines: list[str] = []
    stopping = False
    while child.poll() is None:  # feedback is given on this thread only; the reader thread just reads
        _relay(events, feedback, lines)
        if feedback.isCanceled() and not stopping:
            child.terminate()  # once: translate stops on SIGTERM, leaving nothing at the output path
            stopping = True
        try:
            child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    reader.join()
    _relay(events, feedback, lines)
    for line in child.stdout.read().splitlines():
        feedback.pushInfo(line)
    child.stdout.close()
    child.stderr.close()
    if feedback.isCanceled():
        return False
    if child.returncode != 0:
        errors = [line for line in lines if line.startswith("geosat2map: error:")]
        raise QgsProcessingException((errors or lines or [f"geosat2map exited with {child.returncode}"])[-1])
    return True


def _follow(stream, events: queue.SimpleQueue) -> None:
    """Read the child's stderr: its progress bar (tqdm's "NN%|" updates, one per carriage return)
    as percentages, every other line as a message."""
    text = ""
    while True:
        chunk = stream.read(256)
        if not chunk:
            break
        text += chunk
        *done, text = re.split(r"[\r\n]", text)
        for part in done:
            progress = re.match(r"\s*(\d+)%\|", part)
            if progress:
                events.put(int(progress.group(1)))
            elif part.strip():
                events.put(part.strip())
    if text.strip():
        events.put(text.strip())


def _relay(events: queue.SimpleQueue, feedback, lines: list[str]) -> None:
    """Give the feedback what the reader thread has read so far."""
    while not events.empty():
        event = events.get()
        if isinstance(event, int):
            feedback.setProgress(event)
        else:
            lines.append(event)
            feedback.pushInfo(event)
