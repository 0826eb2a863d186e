"""How fast the CPU side of translate can feed a model that takes no time (a stand-in for a GPU).

    python benchmarks/pipeline.py [--size 8192] [--batch-size 32] [--repeat 3] [--resolution native|model]

Everything the host does runs for real; the model (and on the GPU path, the device's whole share)
takes no time. Two set-ups, run alternately on the same scene (a sample-based uint8 RGB GeoTIFF,
as benchmarks/translate.py):

- ``cpu``: the CPU engines' order: read and cut tiles, run (the engine returns each tile as its
  own map, at once), blend, write (compression on the writer thread), overviews;
- ``gpu``: the GPU path's host side (geosat2map.device_rows): each tile row's band read (GDAL
  decoding on every core) and staged for the device, the finished rows handed back and written
  with GDAL compressing on every core, overviews. The device's share (``DeviceRowBlender._blend``:
  cutting, the model, blending) is left out: the finished rows are the band's first rows, copied
  into the output buffer (a memcpy the real path leaves to the copy engine), so they compress
  like imagery.

The tiles/s of ``gpu`` is the most a GPU could be fed on this machine; a GPU slower than that
never waits for the CPU. Peak RSS is per process (each run is its own).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from translate import make_scene  # noqa: E402  (the same scenes as the translate benchmark)

CHILD = """
import json, resource, sys
import torch
import geosat2map.device_rows as device_rows
import geosat2map.pipeline as pipeline
from geosat2map import load_generator, translate
src, dst, setup, batch, resolution = sys.argv[1:6]

class NullEngine:
    name = "null"
    asynchronous = setup == "gpu"
    device = torch.device("cpu")
    def __call__(self, tiles):
        return tiles[:, :3]
    def submit(self, tiles):
        out = tiles[:, :3]
        return lambda: out

class HostSide(device_rows.DeviceRowBlender):
    def _blend(self, row, band, mask, has_data, n):
        return band[:3, :n]

pipeline.make_engine = lambda *a, **k: NullEngine()
pipeline._blend_on_device = lambda engine, grid: setup == "gpu"
device_rows.DeviceRowBlender = HostSide
r = translate(src, dst, model=load_generator(None), resolution=resolution, batch_size=int(batch), overwrite=True)
print(json.dumps({"seconds": r.seconds, "tiles": r.tiles_computed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SETUPS = ("cpu", "gpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--resolution", choices=["native", "model"], default="native",
                        help="model: the 0.5 m scene resampled to the model's 2.12 m, translate's default (each "
                             "tile read from about 18 times as many source pixels)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {s: [] for s in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "scene.tif"
        make_scene(src, args.size)
        for _ in range(args.repeat):
            for setup in SETUPS:
                cmd = [sys.executable, "-c", CHILD, str(src), str(Path(tmp) / "out.tif"), setup, str(args.batch_size),
                       args.resolution]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[setup].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{args.size} x {args.size} sample-based scene, {args.resolution} resolution, batch {args.batch_size}, "
          f"model taking no time, best of {args.repeat} (range)")
    print(f"{'set-up':>10} {'tiles':>6} {'tiles/s (range)':>22} {'s':>7} {'peak RSS MB':>12}")
    for setup in SETUPS:
        rates = [r["tiles"] / r["seconds"] for r in runs[setup]]
        best = max(rates)
        print(f"{setup:>10} {runs[setup][0]['tiles']:>6} {f'{best:.0f} ({min(rates):.0f}-{best:.0f})':>22} "
              f"{min(r['seconds'] for r in runs[setup]):>7.2f} {max(r['peak_rss_mb'] for r in runs[setup]):>12.0f}")
    ratio = np.median([c["seconds"] / g["seconds"] for g, c in zip(runs["gpu"], runs["cpu"])])
    print(f"gpu vs cpu set-up: {ratio:.2f}x the tiles/s (median of the paired runs)")


if __name__ == "__main__":
    main()
