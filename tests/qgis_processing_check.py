"""Run the installed geosat2map Processing script inside real QGIS, headless, and report as JSON.

Run by Debian's ``/usr/bin/python3`` (where the ``qgis`` bindings live); ``tests/test_qgis.py``
calls it. Usage:

    python3 tests/qgis_processing_check.py SCRIPT NAME=VALUE ... [--cancel-at PERCENT] [--project-layer]
        [--aoi-in-memory | --aoi-selected FID]

It loads SCRIPT as QGIS's Processing Toolbox does, runs its algorithm through ``processing.run``
with the given parameters, and reports the results, the highest progress seen, the messages, the
error (a QgsProcessingException's text) and whether the output opens as a valid raster layer.
``--cancel-at`` cancels the run once the progress reaches PERCENT; ``--project-layer`` opens INPUT
as a layer of the project first (a GeoPackage raster table, say, which a bare string cannot name);
``--aoi-in-memory`` passes AOI's features as a memory layer of the project (a layer with no file,
as an edited or computed one is); ``--aoi-selected FID`` passes AOI as a project layer with only
that feature selected, and "Selected features only" ticked.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsFeatureRequest,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import Qt  # noqa: E402


class Feedback(QgsProcessingFeedback):
    def __init__(self, cancel_at: float | None) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.progress_seen = 0.0
        self.cancel_at = cancel_at
        # Direct: headless, no event loop would deliver a queued signal while the algorithm runs.
        self.progressChanged.connect(self._progress, Qt.DirectConnection)

    def _progress(self, value: float) -> None:
        self.progress_seen = max(self.progress_seen, value)
        if self.cancel_at is not None and value >= self.cancel_at:
            self.cancel()

    def pushInfo(self, info: str) -> None:
        self.messages.append(info)
        super().pushInfo(info)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("script")
    parser.add_argument("params", nargs="*")
    parser.add_argument("--cancel-at", type=float)
    parser.add_argument("--project-layer", action="store_true",
                        help="load INPUT as a layer of the project and pass the layer, as the Toolbox does")
    parser.add_argument("--aoi-in-memory", action="store_true", help="pass AOI's features as a memory layer")
    parser.add_argument("--aoi-selected", type=int, help="pass AOI with only this feature selected")
    args = parser.parse_args()
    params = dict(p.split("=", 1) for p in args.params)

    app = QgsApplication([], False)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing

    Processing.initialize()
    import processing

    spec = importlib.util.spec_from_file_location("geosat2map_translate", args.script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    alg = module.Geosat2mapTranslate()
    alg.initAlgorithm()
    feedback = Feedback(args.cancel_at)
    report: dict = {"name": alg.displayName(), "python": module.PYTHON}
    if args.project_layer:
        layer = QgsRasterLayer(params["INPUT"], "scene")
        report["input_layer_valid"] = layer.isValid()
        QgsProject.instance().addMapLayer(layer)
        params["INPUT"] = layer
    if args.aoi_in_memory:
        memory = QgsVectorLayer(params["AOI"], "aoi").materialize(QgsFeatureRequest())
        report["aoi_provider"] = memory.providerType()
        QgsProject.instance().addMapLayer(memory)
        params["AOI"] = memory
    if args.aoi_selected is not None:
        layer = QgsVectorLayer(params["AOI"], "aoi")
        QgsProject.instance().addMapLayer(layer)
        layer.selectByIds([args.aoi_selected])
        report["aoi_selected"] = layer.selectedFeatureCount()
        params["AOI"] = QgsProcessingFeatureSourceDefinition(layer.id(), True)
    try:
        report["results"] = processing.run(alg, params, feedback=feedback)
    except QgsProcessingException as exc:
        report["error"] = str(exc)
    report.update(progress=feedback.progress_seen, messages=feedback.messages, canceled=feedback.isCanceled())
    out = params.get("OUTPUT")
    if out and os.path.exists(out):
        layer = QgsRasterLayer(out, "map")
        report.update(output_valid=layer.isValid(), output_crs=layer.crs().authid())
    print(json.dumps(report, default=str), flush=True)
    os._exit(0)  # QGIS 3.22 can crash in exitQgis() headless; the report is out


if __name__ == "__main__":
    main()
