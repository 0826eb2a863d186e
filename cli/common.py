"""What several commands share: rank awareness under torchrun, progress bars, file patterns,
the resolution option, and held-out scores as the commands print them."""

from __future__ import annotations

import glob
import math
import os

import click

from geosat2map.errors import Geosat2mapError


def helper_rank() -> bool:
    """Under torchrun, a rank other than 0: rank 0 reports for all."""
    return int(os.environ.get("RANK", "0")) > 0


def rank_named() -> str:
    """What a helper rank's own lines carry, ' (rank N)', so they say whose they are; '' elsewhere."""
    return f" (rank {os.environ['RANK']})" if helper_rank() else ""


def parse_resolution(ctx, param, value: str):
    if value in ("model", "native"):
        return value
    try:
        metres = float(value)
    except ValueError:
        raise click.BadParameter("use model, native or a number of metres per pixel") from None
    if metres <= 0:
        raise click.BadParameter("metres per pixel must be positive")
    return metres


class LazyBar:
    """A tqdm progress bar made at its first update, so a command that fails early prints only
    its error line; closed, the next update starts a new one."""

    def __init__(self, **options) -> None:
        self.options = options
        self.bar = None

    def get(self, **more):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(**self.options, **more)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def is_pattern(source: str) -> bool:
    """Whether ``source`` is a file pattern to expand: it has ``*``, ``?`` or ``[``, is not an
    address GDAL reads (a URL's "?" starts its query) and names no file as it is (a scene named
    ``scene[1].tif`` is that file, not a pattern matching ``scene1.tif``)."""
    from geosat2map.reader import is_gdal_path

    return glob.has_magic(source) and not is_gdal_path(source) and not os.path.lexists(source)


def expand_globs(sources: tuple[str, ...]) -> tuple[str, ...]:
    """Expand quoted patterns such as 'scenes/*.tif' (for shells that do not, or long lists)."""
    out: list[str] = []
    for pattern in sources:
        if is_pattern(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise Geosat2mapError(f"no file matches {pattern}")
            out.extend(matches)
        else:
            out.append(pattern)
    return tuple(out)


#: evaluate's columns: (key, heading, decimals).
METRIC_COLUMNS = [("rmse", "RMSE", 2), ("acc5", "acc@5", 4), ("acc10", "acc@10", 4), ("psnr", "PSNR dB", 2),
                   ("ssim", "SSIM", 4)]


def metric(key: str, heading: str, decimals: int, value: float, se: float | None = None) -> str:
    """One score as evaluate prints it in a line: 'RMSE 22.09 +- 0.51', 'PSNR 27.63 dB'."""
    spread = f" +- {se:.{decimals}f}" if se is not None and math.isfinite(se) else ""
    return f"{heading.removesuffix(' dB')} {value:.{decimals}f}{spread}" + (" dB" if key == "psnr" else "")


def scores(val: dict, keys: tuple[str, ...] = ("rmse", "acc5", "acc10", "psnr", "ssim")) -> str:
    """Held-out scores (those of ``keys`` a record holds: older runs scored fewer) as evaluate prints them."""
    return "  ".join(metric(k, heading, d, val[k]) for k, heading, d in METRIC_COLUMNS
                     if k in keys and isinstance(val.get(k), (int, float)))


def echo_val(provenance: dict, dtype: str = "float32") -> None:
    """The held-out scores a weights file records (``dtype``: its stored types, as info reads them).
    Files exported or averaged into fp16, int8 or int4 record their own score (``val_storage``) and
    the fp32 one before it; older files and the trainer's fp16 snapshots, the fp32 weights' only."""
    stored = provenance.get("val_storage", "fp32") != "fp32"
    before = "val_storage" not in provenance and dtype != "float32"
    for key, label in (("val_before_storage", ", before storage"),
                       ("val", ", as stored" if stored else ", scored before storage" if before else "")):
        val = provenance.get(key)
        if val:
            click.echo(f"held-out pairs ({int(val['count'])}{label}): {scores(val)}")
    if "val_before_storage" in provenance and "val" not in provenance:
        click.echo("not scored as stored: the run's data folder was not found")
