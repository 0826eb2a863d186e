"""What reading a scene placed by RPCs costs over a DEM (translate --rpc-dem) against its RPCs'
mean height: the measurement behind the README's Placement paragraph.

    python benchmarks/rpc_dem.py [--size 4096]

Writes a synthetic SIZE x SIZE RGB scene georeferenced by RPCs (0.5 m pixels, an oblique view: a
pixel's column moves with its ground height) and a 1000 x 1000 DEM of rolling hills (100-500 m)
under it, then reads the whole scene row band by row band as translate does, at native
resolution and at 2 m, once at the mean height and once over the DEM; prints seconds for each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.rpc import RPC
from rasterio.transform import from_origin
from rasterio.windows import Window

from geosat2map.reader import open_scene

LON0, LAT0, DEG = -115.1, 36.2, 5e-6  # the scene's centre, and degrees per pixel (about 0.5 m)


def write_inputs(folder: Path, size: int) -> tuple[Path, Path]:
    terms = [0.0] * 20
    samp, line, den = terms.copy(), terms.copy(), terms.copy()
    samp[1], line[2], den[0], samp[3] = 1.0, -1.0, 1.0, 0.02  # column ~ longitude + height, row ~ -latitude
    half = size / 2
    scene, dem = folder / "raw.tif", folder / "dem.tif"
    rng = np.random.default_rng(0)
    with rasterio.open(scene, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True,
                       compress="deflate") as dst:
        dst.write(rng.integers(0, 255, (3, size, size), dtype=np.uint8))
        dst.rpcs = RPC(height_off=500, height_scale=500, lat_off=LAT0, lat_scale=half * DEG, line_den_coeff=den,
                       line_num_coeff=line, line_off=half, line_scale=half, long_off=LON0, long_scale=half * DEG,
                       samp_den_coeff=den, samp_num_coeff=samp, samp_off=half, samp_scale=half, err_bias=0,
                       err_rand=0)
    yy, xx = np.mgrid[0:1000, 0:1000]
    reach = 1.5 * half * DEG  # the DEM covers the scene and beyond
    with rasterio.open(dem, "w", driver="GTiff", width=1000, height=1000, count=1, dtype="float32", crs="EPSG:4326",
                       transform=from_origin(LON0 - reach, LAT0 + reach, 2 * reach / 1000, 2 * reach / 1000)) as dst:
        dst.write((300 + 200 * np.sin(xx / 50) * np.cos(yy / 70)).astype(np.float32)[None])
    return scene, dem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    import warnings

    warnings.simplefilter("ignore", NotGeoreferencedWarning)  # the scene has RPCs, no geotransform
    with tempfile.TemporaryDirectory() as tmp:
        scene, dem = write_inputs(Path(tmp), args.size)
        print(f"{'resolution':>10} {'placed by':>12} {'grid':>12} {'seconds':>8}")
        for resolution in ("native", 2.0):
            for placed, options in (("mean height", {}), ("DEM", {"rpc_dem": dem})):
                started = time.perf_counter()
                with open_scene(scene, resolution=resolution, **options) as s:
                    for y in range(0, s.height, 256):
                        s.read(Window(0, y, s.width, min(256, s.height - y)))
                seconds = time.perf_counter() - started
                print(f"{resolution!s:>10} {placed:>12} {f'{s.width} x {s.height}':>12} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
