"""Constant-colour baselines for the maps validation pairs, with the metrics `geosat2map evaluate` uses.

    python benchmarks/constant_baselines.py [DATA] [--holdout 10]

Paints every pixel of each held-out map one colour: the mean or the median colour of all the
held-out maps (a fair baseline: one colour for every image), or the mean or median colour of that
very map (an oracle: it peeks at the answer). A model that cannot beat these has learned little.
"""

from __future__ import annotations

import argparse

import torch

from geosat2map import datasets, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default="../shared/data/maps_train")
    parser.add_argument("--holdout", type=int, default=10)
    args = parser.parse_args()
    pairs, names = datasets.load_pairs(args.data, "val", "AtoB", args.holdout)
    dataset = datasets.PairDataset(pairs, names, 256, 256, augment=False)
    maps = torch.stack([(dataset[i][1] + 1) * 127.5 for i in range(len(dataset))])
    pixels = maps.permute(1, 0, 2, 3).reshape(3, -1)
    colours = {
        "mean of all maps": lambda m: pixels.mean(dim=1),
        "median of all maps": lambda m: pixels.median(dim=1).values,
        "this map's mean (oracle)": lambda m: m.mean(dim=(1, 2)),
        "this map's median (oracle)": lambda m: m.reshape(3, -1).median(dim=1).values,
    }
    print(f"{len(maps)} held-out maps, 256 x 256")
    print(f"{'constant colour':>28} {'RMSE':>7} {'acc@5':>6} {'acc@10':>6} {'PSNR':>6} {'SSIM':>6}")
    for name, colour in colours.items():
        scores = [metrics.image_metrics(colour(m)[:, None, None].expand_as(m).clone(), m) for m in maps]
        s = metrics.summarize(scores)
        print(f"{name:>28} {s['rmse']:>7.2f} {s['acc5']:>6.3f} {s['acc10']:>6.3f} {s['psnr']:>6.2f} {s['ssim']:>6.3f}")


if __name__ == "__main__":
    main()
