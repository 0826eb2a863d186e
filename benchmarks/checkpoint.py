"""What the writer's checkpoints cost (the partial map made resumable after a kill, every
geosat2map.writer.CHECKPOINT_SECONDS): the figure behind the README's "20 ms at 16 384 x 16 384".

    python benchmarks/checkpoint.py [--side 16384]

Writes a SIDE x SIDE map of random pixels (ZSTD compresses them least: the most bytes to sync)
with a nodata column, checkpointing after every block row, and prints the time each checkpoint
took (close, fsync, block index check, reopen, record) and the whole write's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from affine import Affine

from geosat2map import writer
from geosat2map.writer import BLOCK, GeoTIFFWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=16384)
    args = parser.parse_args()
    side = args.side
    took: list[float] = []
    resumable = GeoTIFFWriter._make_resumable

    def timed(self) -> None:
        start = time.perf_counter()
        resumable(self)
        took.append(time.perf_counter() - start)

    GeoTIFFWriter._make_resumable = timed
    writer.CHECKPOINT_SECONDS = 0.0
    rows = np.random.default_rng(0).integers(0, 256, (3, BLOCK, side), dtype=np.uint8)
    valid = np.ones((BLOCK, side), bool)
    valid[:, :100] = False
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with GeoTIFFWriter(Path(tmp) / "map.tif", side, side, "EPSG:32633", Affine(1, 0, 500000, 0, -1, 4500000),
                           checkpoint=lambda kept: None) as out:
            for top in range(0, side, BLOCK):
                out.write_rows(top, rows[:, : min(BLOCK, side - top)], valid[: min(BLOCK, side - top)])
            out._wait()
            written = time.perf_counter() - start
    print(f"{side} x {side}: {len(took)} checkpoints, median {statistics.median(took) * 1e3:.1f} ms, "
          f"max {max(took) * 1e3:.1f} ms; {written:.1f} s to write every block row")


if __name__ == "__main__":
    main()
