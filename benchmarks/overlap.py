"""How much overlap hides the seams, and what it costs: the measurement behind the default.

    python benchmarks/overlap.py [--scene ../shared/data/scenes/naip_4band_5m.tif] [--weights W]

Translates one real scene at several overlaps with the same model and prints, per overlap, the
tile count (cost) and the seam ratio along columns and rows (geosat2map.grid.seam_ratio: the
gradient across tile borders over the gradient inside tiles; about 1 or below means no seam).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import rasterio

from geosat2map.grid import TileGrid, seam_ratio
from geosat2map import translate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", default=str(ROOT.parent / "shared/data/scenes/naip_4band_5m.tif"))
    parser.add_argument("--weights", default=None, help="default: the shipped model")
    parser.add_argument("--overlaps", default="0,16,32,64,96,128")
    args = parser.parse_args()
    print(f"scene {args.scene}")
    print(f"{'overlap':>7} {'tiles':>6} {'seconds':>8} {'seam x':>7} {'seam y':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for overlap in (int(o) for o in args.overlaps.split(",")):
            out = Path(tmp) / f"o{overlap}.tif"
            r = translate(args.scene, out, weights=args.weights, overlap=overlap, device="cpu")
            with rasterio.open(out) as dst:
                image = dst.read()
            grid = TileGrid(r.width, r.height, 256, overlap)
            print(f"{overlap:>7} {r.tiles_computed:>6} {r.seconds:>8.1f} "
                  f"{seam_ratio(image, grid.xs, 256, 2):>7.3f} {seam_ratio(image, grid.ys, 256, 1):>7.3f}")


if __name__ == "__main__":
    main()
