"""The README's and model card's figures for a generator: held-out triplets and NAIP water.

    python docs/figures.py [--weights W] [--naip-map out/demo_naip_map.tif] [--png docs/images/heldout_samples.png]

- the held-out New York pairs 11.jpg and 31.jpg (holdout 10) as aerial | output | real map rows,
  written to ``--png`` (skipped when ../shared/data/maps_train is absent);
- on the NAIP sample's translation (``make demo`` writes it), where the map's water colour falls,
  judged by the scene's own near-infrared band (``geosat2map.evaluate.water_by_ndwi``, as
  tests/test_default_model.py checks it). Printed: precision (water-coloured pixels that are
  water), land painted as water, water found.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import rasterio

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ("11.jpg", "31.jpg")


def heldout_png(weights: str | None, data: Path, png: Path) -> None:
    import torch

    from geosat2map import datasets
    from geosat2map.evaluate import per_image_metrics, write_triplets
    from geosat2map.weights import load_generator

    pairs, names = datasets.load_pairs(data, "val", "AtoB", 10)
    keep = [names.index(name) for name in PAIRS]
    model, spec = load_generator(weights)
    subset = datasets.PairDataset([pairs[i] for i in keep], [names[i] for i in keep], spec.tile_size,
                                  spec.tile_size, augment=False)
    _, triplets = per_image_metrics(model, subset, torch.device("cpu"), keep=len(keep))
    write_triplets(triplets, png)
    print(f"wrote {png}: held-out {', '.join(PAIRS)} (aerial | output | real map)")


def naip_water(naip_map: Path) -> None:
    from geosat2map.evaluate import water_by_ndwi

    w = water_by_ndwi(ROOT / "sample_data" / "naip_4band_5m.tif", naip_map)
    print(f"NAIP water ({naip_map}): precision {w['precision']:.3f}, land painted as water "
          f"{w['land_as_water'] * 100:.2f} %, water found {w['water_found'] * 100:.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="default: the shipped model")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "maps_train")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "images" / "heldout_samples.png")
    parser.add_argument("--naip-map", type=Path, default=ROOT / "out" / "demo_naip_map.tif")
    args = parser.parse_args()
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    if args.data.is_dir():
        heldout_png(args.weights, args.data, args.png)
    else:
        print(f"no {args.data}: held-out figure skipped")
    if args.naip_map.exists():
        naip_water(args.naip_map)
    else:
        print(f"no {args.naip_map}: run make demo first (NAIP water skipped)")


if __name__ == "__main__":
    main()
