"""Open a raster in real QGIS, headless, and report what QGIS sees as one JSON object on stdout.

Run by Debian's ``/usr/bin/python3`` (where the ``qgis`` bindings live), not by the project's
venv; ``tests/test_qgis.py`` calls it and checks the report. Usage:

    python3 tests/qgis_check.py RASTER PNG [--under SCENE] [--probe X,Y ...] [--size PIXELS]

It loads RASTER as QGIS does when a user drags it in (default renderer, default contrast
handling, a same-named .qml style), renders it (over SCENE, if given) to PNG with a transparent
background, and reports validity, CRS, extent, band types and colour interpretation (QGIS shows a
GDAL mask as an extra Alpha band), the renderer, its bands, contrast enhancement and legend, and
the rendered RGBA at each probe point (map coordinates of RASTER's CRS).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import (  # noqa: E402  (needs the platform set first)
    QgsApplication,
    QgsContrastEnhancement,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import QSize  # noqa: E402
from qgis.PyQt.QtGui import QColor, QImage  # noqa: E402


def _enhancement(renderer) -> list[str | None]:
    names = {v: k for k, v in vars(QgsContrastEnhancement).items() if k.endswith(("Enhancement", "MinMax", "Clip"))}
    out = []
    for getter in ("redContrastEnhancement", "greenContrastEnhancement", "blueContrastEnhancement"):
        ce = getattr(renderer, getter)() if hasattr(renderer, getter) else None
        out.append(None if ce is None else names.get(ce.contrastEnhancementAlgorithm(), "unknown"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("raster")
    parser.add_argument("png")
    parser.add_argument("--under")
    parser.add_argument("--probe", action="append", default=[])
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    app = QgsApplication([], False)
    app.initQgis()
    layer = QgsRasterLayer(args.raster, "map")
    report: dict = {"valid": layer.isValid()}
    if layer.isValid():
        provider = layer.dataProvider()
        ext = layer.extent()
        report.update(
            crs=layer.crs().authid(),
            extent=[ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum()],
            bands=layer.bandCount(),
            types=[provider.dataType(b).name if hasattr(provider.dataType(b), "name") else int(provider.dataType(b))
                   for b in range(1, layer.bandCount() + 1)],
            interpretation=[provider.colorInterpretationName(b) for b in range(1, layer.bandCount() + 1)],
            renderer=layer.renderer().type(),
            renderer_bands=[getattr(layer.renderer(), f"{c}Band", lambda: None)()  # None: a paletted renderer
                            for c in ("red", "green", "blue", "alpha")],
            contrast=_enhancement(layer.renderer()),
            # a paletted renderer's legend: (value, label) per class
            legend=[[c.value, c.label] for c in getattr(layer.renderer(), "classes", lambda: [])()],
        )
        layers = [layer]
        if args.under:
            under = QgsRasterLayer(args.under, "scene")
            layers.append(under)
        width = args.size
        height = max(1, round(args.size * ext.height() / ext.width()))
        settings = QgsMapSettings()
        settings.setLayers(layers)  # first is drawn on top
        settings.setDestinationCrs(layer.crs())
        settings.setExtent(ext)
        settings.setOutputSize(QSize(width, height))
        settings.setBackgroundColor(QColor(0, 0, 0, 0))
        job = QgsMapRendererParallelJob(settings)
        job.start()
        job.waitForFinished()
        image = job.renderedImage().convertToFormat(QImage.Format_ARGB32)
        report["png"] = image.save(args.png, "PNG")
        visible = settings.visibleExtent()
        probes = []
        for probe in args.probe:
            x, y = (float(v) for v in probe.split(","))
            col = int((x - visible.xMinimum()) / visible.width() * image.width())
            row = int((visible.yMaximum() - y) / visible.height() * image.height())
            c = QColor(image.pixel(col, row)) if 0 <= col < image.width() and 0 <= row < image.height() else None
            alpha = None if c is None else QColor.fromRgba(image.pixel(col, row)).alpha()
            probes.append(None if c is None else [c.red(), c.green(), c.blue(), alpha])
        report["probes"] = probes
    print(json.dumps(report), flush=True)
    # QGIS 3.22 can crash in exitQgis() when run headless; the report is out, so leave directly.
    os._exit(0)


if __name__ == "__main__":
    main()
