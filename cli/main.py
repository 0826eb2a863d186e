"""The ``geosat2map`` command group: thin click wrappers over the library, one module per
family of commands (translate, maps, training, weights, info, qgis), registered here.

Every command turns a :class:`geosat2map.Geosat2mapError` into one line on stderr and exit
status 1; Ctrl-C exits 130 after the library has cleaned up.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import click

from geosat2map.errors import Geosat2mapError, Interrupted, first_line

from .common import helper_rank, rank_named
from .info import info
from .maps import classify, mosaic, preview, render_map_cmd, vectorize
from .qgis import qgis_script_cmd
from .training import evaluate, tiles, train
from .translate import translate
from .weights import average_weights, export_onnx_cmd, export_weights


@contextmanager
def _c_stderr_aside() -> Iterator[None]:
    """Keep C libraries' direct writes to file descriptor 2 off the terminal.

    GDAL's bundled libtiff prints some errors itself ("_tiffWriteProc: File too large.") on top
    of the exception we turn into one line. Python's sys.stderr (our messages, tqdm, warnings,
    tracebacks) moves to a duplicate of the real descriptor; what C writes to 2 goes to a
    temporary file, shown only if the command dies of an unexpected error.
    """
    try:
        real_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a real stream (e.g. click's test runner)
        yield
        return
    if real_fd != 2:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    sink = tempfile.TemporaryFile()
    os.dup2(sink.fileno(), 2)
    previous, sys.stderr = sys.stderr, os.fdopen(saved, "w", buffering=1, closefd=False)
    clean = False
    try:
        yield
        clean = True
    except (Geosat2mapError, KeyboardInterrupt, click.exceptions.Exit, click.exceptions.ClickException):
        clean = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = previous
        if not clean:
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
        sink.close()


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            with _c_stderr_aside():
                return super().invoke(ctx)
        except Geosat2mapError as exc:
            click.echo(f"geosat2map: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as exc:
            if not (isinstance(exc, Interrupted) and helper_rank()):  # rank 0 says where every rank stopped
                # A helper's own line names it: rank 0's "rank N failed (its own error is above)" points here.
                click.echo(f"geosat2map: interrupted{rank_named()}" + (f": {exc}" if str(exc) else ""), err=True)
            ctx.exit(130)


class _OneLineWarnings:
    """Shows a library's warning (GDAL's through pyogrio: "Non closed ring detected...") in one
    line, where Python's showed the file and source line it was raised from; and each text once a
    command: Python dedupes by the line that warns, and rasterio warns the same thing ("nodata
    attribute is shadowing the alpha band") from several of its lines, for every window read.
    Under torchrun a helper rank's line names it: every rank reads the scene, so each meets a
    warning about it, and rank 0's line alone would not say whose the others are."""

    def __init__(self) -> None:
        self.shown: set[str] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = first_line(message) if isinstance(message, Warning) else str(message)
        if text not in self.shown:
            self.shown.add(text)
            click.echo(f"geosat2map: warning{rank_named()}: {text}", err=True)


def _terminate(signum, frame) -> None:
    # SIGTERM takes the same path as Ctrl-C, so temporary outputs are removed on the way out.
    raise KeyboardInterrupt


@click.group(cls=_Group, name="geosat2map")
@click.version_option(package_name="geosat2map")
def cli() -> None:
    """Satellite or aerial GeoTIFF in, georeferenced map-style GeoTIFF out (Pix2Pix)."""
    # GDAL's messages reach us as exceptions; without this, Python's last-resort handler would
    # also print rasterio's error log lines on stderr next to our one-line error.
    logging.getLogger("rasterio").addHandler(logging.NullHandler())
    warnings.showwarning = _OneLineWarnings()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
        if hasattr(signal, "SIGXFSZ"):  # over a file-size limit: a write error to report, not a crash
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


for _command in (translate, preview, classify, vectorize, render_map_cmd, mosaic, tiles, train, evaluate,
                 export_weights, average_weights, info, export_onnx_cmd, qgis_script_cmd):
    cli.add_command(_command)
