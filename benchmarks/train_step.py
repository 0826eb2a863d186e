"""Seconds per Pix2Pix training step (D update + G update), as `geosat2map train` runs it.

    python benchmarks/train_step.py [--ngf 64] [--batch-size 1] [--steps 10] [--device auto]
                                    [--precision fp32] [--storage-aware int4] [--fine-tune]
                                    [--lambda-gan 1 --lambda-gan 0]

Uses the real Trainer on a small synthetic aligned folder; prints the median step time in the
channels_last and the contiguous layouts (the trainer uses contiguous on the CPU for fp32 and
wherever it rounds as stored, channels_last on CUDA and otherwise under bf16), in fp32 and under
bf16 autocast (train --precision; auto uses bf16 where the hardware multiplies it: CUDA, AMX or
AVX512-BF16 CPUs; elsewhere bf16 is emulated and slow). With --storage-aware, the same again
for the steps of train --storage-aware (the weights rounded as stored in every step). With
--fine-tune, the recipe of the default model's fine-tuning runs: from a saved generator, its
BatchNorm frozen, a teacher of the same width run at every step, and a moving average of the
weights (train --init-from --freeze-batchnorm --distill-from --ema-decay 0.999); and the same
step with the teacher's maps given, as the trainer keeps them after the first epoch for pairs used
whole (load size = crop size). Each --lambda-gan (train --lambda-gan; default 1) is timed in
turn: 0 skips the discriminator.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning

from geosat2map.devices import native_bf16
from geosat2map.model import UNetGenerator
from geosat2map.storage_aware import StoredRounding
from geosat2map.train import TrainConfig, Trainer
from geosat2map.weights import ModelSpec, save_generator


def write_pairs(folder: Path, n: int = 4) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (3, 286, 572), dtype=np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(folder / f"{i}.png", "w", driver="PNG", width=572, height=286, count=3,
                               dtype="uint8") as dst:
                dst.write(img)


def time_steps(trainer: Trainer, steps: int, memory_format: torch.memory_format, kept: bool = False) -> float:
    """Median seconds per step; ``kept``: the teacher's maps given, as from an earlier epoch."""
    for module in (trainer.G, trainer.D, trainer.teacher):
        if module is not None:
            module.to(memory_format=memory_format)
    bs = trainer.cfg.batch_size
    items = [trainer.train_set[i % len(trainer.train_set)] for i in range(bs)]
    a = torch.stack([x for x, _ in items]).to(trainer.device, memory_format=memory_format)
    b = torch.stack([y for _, y in items]).to(trainer.device, memory_format=memory_format)
    taught = None
    if kept:
        with torch.no_grad():
            taught = trainer.teacher(a).float()
    times = []
    for i in range(steps + 2):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.train_step(a, b, taught)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], action="append",
                        help="time only these (repeatable; default: both)")
    parser.add_argument("--storage-aware", choices=["int8", "int4"], default=None)
    parser.add_argument("--lambda-gan", type=float, action="append",
                        help="the adversarial term's weight (repeatable; default: 1; 0: no discriminator)")
    parser.add_argument("--fine-tune", action="store_true",
                        help="the default model's fine-tuning recipe (teacher, frozen BatchNorm, moving average)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_pairs(Path(tmp))
        cfg = TrainConfig(data=tmp, out=str(Path(tmp) / "run"), ngf=args.ngf, batch_size=args.batch_size,
                          holdout=0, device=args.device)
        if args.fine_tune:
            start = Path(tmp) / "start.safetensors"
            save_generator(UNetGenerator(3, 3, args.ngf), ModelSpec(ngf=args.ngf), start)
            cfg.init_from = cfg.distill_from = str(start)
            cfg.freeze_batchnorm, cfg.ema_decay = True, 0.999
        trainer = Trainer(cfg)
        trainer._train_mode()  # as Trainer.run sets the layers' modes (frozen BatchNorm)
        print(f"device {trainer.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"ngf {args.ngf}, batch {args.batch_size}, bf16 native: {native_bf16(trainer.device)}, "
              f"fine-tuning recipe: {args.fine_tune}")
        for storage in (None, args.storage_aware) if args.storage_aware else (None,):
            trainer.cfg.storage_aware = storage
            trainer.rounding = StoredRounding(storage, trainer.device) if storage else None
            label = f", storage-aware {storage}" if storage else ""
            for precision in args.precision or ("fp32", "bf16"):
                trainer.amp = precision == "bf16"
                for name, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
                    for kept in (False, True) if args.fine_tune else (False,):
                        for weight in args.lambda_gan or (1.0,):
                            trainer.cfg.lambda_gan = weight
                            s = time_steps(trainer, args.steps, fmt, kept)
                            what = ", the teacher's maps kept (epochs after the first)" if kept else ""
                            print(f"{precision} {name:>14}{label}{what}, lambda_gan {weight:g}: {s:.3f} s/step, "
                                  f"{args.batch_size / s:.2f} images/s")


if __name__ == "__main__":
    main()
