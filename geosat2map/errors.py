"""Exceptions that carry a one-line message for the user.

The CLI prints ``str(exc)`` of these as a single line and exits non-zero; anything else is a
bug and keeps its traceback.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): libraries'
    messages can run to many lines, a user's error is one."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def gdal_reason(exc: BaseException) -> str:
    """GDAL's own first line for a rasterio error (rasterio's text is often "Read failed. See previous exception")."""
    return first_line(exc.__cause__ or exc)


class Geosat2mapError(Exception):
    """Base class: a problem with the user's input or environment, not with the code."""


class InputError(Geosat2mapError):
    """The input raster cannot be used (missing, unreadable, not georeferenced, ...)."""


class NotGeoreferenced(InputError):
    """A raster has no georeferencing where one is needed (its message names translate's way round)."""


class OutputError(Geosat2mapError):
    """The output cannot be written where asked."""


class WeightsError(Geosat2mapError):
    """A weights file is missing, corrupt, unsafe or does not fit the input."""


class DataError(Geosat2mapError):
    """A training or evaluation data set cannot be used."""


class TrainingError(Geosat2mapError):
    """Training cannot go on (diverged, corrupt checkpoint, ...)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run that kept its progress; the message says how to resume."""
