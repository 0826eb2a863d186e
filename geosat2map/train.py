"""Pix2Pix training: the original recipe, resumable to the step, runnable under torchrun.

Layout of a run directory::

    config.json              the TrainConfig (a resumed run reads it back)
    checkpoint.pt            models, optimisers, schedules, position and RNG (weights_only-loadable)
    generator.safetensors    the generator after the latest epoch
    best_generator.safetensors  the generator with the best validation RMSE so far
    history.jsonl            one line per epoch: mean losses, validation metrics, time
    samples/epochNNN.png     validation triplets (input | output | target)
    snapshots/epochNNN.safetensors  each epoch's generator, fp16 (with keep_snapshots)
    trained_generator.safetensors  with a weight average kept (ema_decay): the weights being
                             trained after the latest epoch (generator.safetensors is the average)
    snapshots/epochNNN.trained.safetensors  with a weight average kept: each epoch's trained weights
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from . import datasets, teacher_maps
from .devices import resolve_device, use_bf16
from .distributed import DistContext, any_rank, convert_batchnorm, init_distributed, shutdown_distributed
from .errors import DataError, Interrupted, OutputError, TrainingError, first_line
from .evaluate import evaluate_generator, write_triplets
from .files import write_text_whole
from .model import (TTA, PatchDiscriminator, UNetGenerator, init_weights, modes_kept, moved, narrow_generator,
                    widen_generator)
from .records import field_problem, fits
from .stop_request import StopRequest
from .storage_aware import StoredRounding, rounded_as_stored
from .weights import TRAINED_WEIGHTS, ModelSpec, as_stored, load_generator, model_digest, save_generator

CHECKPOINT = "checkpoint.pt"
#: The TrainConfig fields every saved generator's provenance records (how it was trained).
RECORDED_SETTINGS = ("direction", "load_size", "crop_size", "batch_size", "lr", "lr_d", "beta1", "beta2",
                     "lambda_gan", "lambda_l1", "lambda_l2", "epochs", "epochs_decay", "ndf", "holdout", "seed",
                     "ema_decay", "freeze_batchnorm", "no_dropout", "rot90", "shift", "colour_jitter", "distill_from",
                     "distill_weight", "distill_views", "storage_aware")
#: The most memory the teacher's kept maps take (Trainer._taught, fp16): the maps set's 986 training
#: pairs at 256 x 256 take 388 MB; a larger set keeps the first pairs' and asks the teacher for the rest.
TEACHER_MAPS_BYTES = 2 * 2**30
#: What ``storage_aware`` can train for: the lossy storages of weights files.
STORAGE_AWARE = ("int8", "int4")


@dataclass
class TrainConfig:
    """Defaults are the pix2pix recipe (Isola et al. 2017)."""

    #: One folder of pairs, or several trained on as one (see :func:`datasets.load_pairs`).
    data: str | list[str]
    out: str
    direction: str = "AtoB"
    #: Generator width; None: 64 (the recipe's), or with ``init_from`` that generator's own.
    ngf: int | None = None
    ndf: int = 64
    batch_size: int = 1
    load_size: int = 286
    crop_size: int = 256
    lr: float = 2e-4
    #: The discriminator's learning rate (None: ``lr``, as the recipe has it). Fine-tuning a trained
    #: generator against a fresh discriminator, a lower one keeps the discriminator from winning:
    #: at lr 3e-5 for both, D's loss fell from 0.67 to 0.26 in three epochs while the generator's
    #: adversarial loss rose from 0.80 to 2.29 and its maps got worse (model card, session 29).
    lr_d: float | None = None
    beta1: float = 0.5
    beta2: float = 0.999
    #: Weight of the adversarial term (1: the recipe's, beside lambda_L1 = 100). 0 trains the
    #: generator on its pixel terms alone and skips the discriminator: no pass through it at all.
    #: For fine-tuning where lambda_L1 has grown so large that the adversarial term is noise (the
    #: default model's late cycles: 1e5, the GAN loss 0.72 against 4 400 of L1), yet the
    #: discriminator's passes were most of every step.
    lambda_gan: float = 1.0
    lambda_l1: float = 100.0
    #: Weight of a squared-error term beside the L1 one (0: none, the pix2pix recipe). Where the
    #: maps that fit an image disagree (which side of a road edge a pixel falls), L1 pulls a
    #: pixel to their median colour and squared error to their mean: the mean is what RMSE and
    #: PSNR score, and what the flip average (``--tta``) gains by. Applies to the teacher's map
    #: too, in the same shares.
    lambda_l2: float = 0.0
    epochs: int = 100
    epochs_decay: int = 100
    checkpoint_every: int = 500
    holdout: int = 10
    seed: int = 0
    device: str = "auto"
    #: fp32, bf16 (autocast: the convolutions in bf16, weights, optimiser and losses in fp32) or
    #: auto: bf16 where the hardware multiplies it (CUDA; CPUs with AMX, where a width-32 step
    #: took 0.15 s against fp32's 0.29 s).
    precision: str = "auto"
    gsd_m: float | None = None
    init_from: str | None = None
    max_steps: int | None = None
    samples: int = 4
    #: Training crops BatchNorm's statistics are re-estimated on at each epoch's end (None: one of
    #: every training pair; 200 crops gave scores that moved with the crops' seed by about as much
    #: as candidates differ, see the model card).
    bn_recalibration: int | None = None
    bn_recalibration_batch: int = 4
    keep_snapshots: bool = False
    #: Decay of an exponential moving average of the generator's weights, updated every step (0:
    #: off, the pix2pix recipe). When on, the average is the generator the run saves and scores.
    ema_decay: float = 0.0
    #: Fine-tuning only: train the generator with its BatchNorm layers in eval mode, on the running
    #: statistics of the generator it starts from, which stay fixed (no re-estimation at epoch
    #: ends). Translate runs the generator that way, while batch-1 training normalises every layer
    #: by the one image's own statistics; this removes that mismatch (see the model card).
    freeze_batchnorm: bool = False
    #: Train the generator with its dropout off, as translate runs it. In the pix2pix recipe the
    #: three innermost decoder levels drop half their channels at every step (the GAN's noise), so
    #: the L1 term is fitted by a thinned network while the full one makes the maps; fine-tuning
    #: with it off fits the function that is used, as ``freeze_batchnorm`` does for BatchNorm.
    no_dropout: bool = False
    #: Turn each training crop (input and target alike) by a random multiple of 90 degrees as
    #: well as mirroring it: imagery seen from above has no "up", so the eight turns and mirrors
    #: are all plausible scenes (the pix2pix recipe only mirrors).
    rot90: bool = False
    #: Move each training pair (input and target alike) by a random whole number of pixels, up to
    #: this many in each direction, its edges mirrored (:func:`~geosat2map.model.moved`): the
    #: U-Net's map of a scene depends on where the scene falls on its 256-pixel grid (see
    #: :class:`~geosat2map.model.ViewMedian`), and this shows it each pair at other places on that
    #: grid at the scale translate uses (the recipe's jitter, a 286-pixel resize cropped to 256,
    #: changes the scale too). 0: off, as the recipe.
    shift: int = 0
    #: Recolour each training input at random (:mod:`~geosat2map.recolour`: white balance, tone
    #: curve, brightness, contrast, saturation, hue), up to this share of the module's ranges (0:
    #: off, as the recipe; 1: the full ranges), its map left as it is: for imagery whose colours
    #: are not the training imagery's. A teacher sees the input as it is.
    colour_jitter: float = 0.0
    #: Self-distillation: a teacher generator whose flip-averaged output (translate --tta, which
    #: scores better on every held-out metric than one pass of the same weights) becomes a second
    #: L1 target, so that one pass of the student learns what the teacher needs two for. The L1
    #: term is then (1 - distill_weight) * L1(real map) + distill_weight * L1(teacher's map); the
    #: discriminator still sees only real maps as real.
    distill_from: str | None = None
    distill_weight: float = 0.5
    #: How the teacher's views of a pair are combined into its map: "flip", the mean of the pair
    #: and its mirror image (translate --tta); "median", the per-pixel median of 18 shifted and
    #: mirrored views (:class:`~geosat2map.model.ViewMedian`), closer to the real maps on every
    #: held-out metric, acc@5 included, at nine times the teacher's passes (made once a run where
    #: pairs are used whole, and kept for the next; see teacher_maps).
    distill_views: str = "flip"
    #: Quantisation-aware training for a weights file stored this way (int8 or int4): every step
    #: computes with the generator's weights rounded as that storage rounds them and applies the
    #: gradient to the exact weights (the straight-through estimator), so the weights learn to
    #: work once rounded. Storing the width-48 default in int4 costs its trained weights 0.07-0.09
    #: of held-out RMSE otherwise (see the model card). The run scores and saves its generators
    #: stored this way.
    storage_aware: str | None = None
    #: Set by the trainer: ``ngf`` is wider than ``init_from``'s generator, which was grown to it
    #: (:func:`widen`); a resumed run then keeps its recorded width.
    widened: bool = False
    #: Set by the trainer: ``init_from``'s generator was grown from width ``ngf`` and is narrowed
    #: back to it (:func:`model.narrow_generator`); a resumed run keeps that width.
    narrowed: bool = False

    def check(self) -> None:
        """Refuse settings that cannot train, in one line, before the run folder is made (they
        used to fail steps later with a traceback from PyTorch, or train nothing)."""
        problems = [
            (self.batch_size < 1, f"batch size must be at least 1, not {self.batch_size}"),
            # Written so that NaN fails too (every comparison with it is false); inf is refused.
            (not 0 < self.lr < math.inf, f"the learning rate must be a positive number, not {self.lr}"),
            (self.lr_d is not None and not 0 < self.lr_d < math.inf,
             f"the discriminator's learning rate must be a positive number, not {self.lr_d}"),
            (not 0 <= self.lambda_gan < math.inf,
             f"the adversarial weight must be a number, 0 or more, not {self.lambda_gan}"),
            (not 0 <= self.lambda_l1 < math.inf, f"the L1 weight must be a number, 0 or more, not {self.lambda_l1}"),
            (not 0 <= self.lambda_l2 < math.inf,
             f"the squared-error weight must be a number, 0 or more, not {self.lambda_l2}"),
            (min(self.epochs, self.epochs_decay) < 0,
             f"--epochs and --epochs-decay count epochs: 0 or more, not {self.epochs} and {self.epochs_decay}"),
            (self.epochs + self.epochs_decay < 1,
             f"nothing to train: {self.epochs} epochs and {self.epochs_decay} of decay"),
            # The U-Net halves a crop 8 times; below 256 its innermost BatchNorm sees one value.
            (self.crop_size < 256 or self.crop_size % 256,
             f"crop size must be a multiple of 256 (the U-Net halves it 8 times), not {self.crop_size}"),
            (not 0 <= self.shift <= datasets.largest_shift(self.crop_size),
             f"--shift must be from 0 to {datasets.largest_shift(self.crop_size)} pixels, not {self.shift}"),
            (not 0.0 <= self.colour_jitter <= 1.0, f"--colour-jitter must be from 0 to 1, not {self.colour_jitter}"),
            (not 0.0 <= self.ema_decay < 1.0,
             f"--ema-decay must be 0 (none) or more and under 1, not {self.ema_decay}"),
            ((self.ngf is not None and self.ngf < 1) or self.ndf < 1,
             f"network widths must be at least 1, not {self.ngf} and {self.ndf}"),
            (self.checkpoint_every < 0,
             f"--checkpoint-every must be 0 (epoch ends only) or more, not {self.checkpoint_every}"),
            (self.holdout < 0, f"--holdout must be 0 (none) or more, not {self.holdout}"),
            (self.max_steps is not None and self.max_steps < 1,
             f"--max-steps must be at least 1, not {self.max_steps}"),
            (bool(self.distill_from) and not 0.0 < self.distill_weight <= 1.0,
             f"the distillation weight must be in (0, 1], not {self.distill_weight}"),
            (self.distill_views not in TTA,
             f"the teacher's views are combined as {' or '.join(TTA)}, not {self.distill_views}"),
            (self.storage_aware not in (None, *STORAGE_AWARE),
             f"storage-aware training is for {' or '.join(STORAGE_AWARE)} storage, not {self.storage_aware}"),
            (self.freeze_batchnorm and not self.init_from,
             "freezing BatchNorm (--freeze-batchnorm) needs a generator to start from (--init-from), whose "
             "statistics it keeps"),
        ]
        for failed, message in problems:
            if failed:
                raise TrainingError(message)

    @classmethod
    def from_json(cls, path: Path) -> TrainConfig:
        """The config a run recorded, or a :class:`TrainingError` saying why there is none."""
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            raise TrainingError(f"nothing to resume: {path.parent} holds no training run ({path.name} is "
                                "missing)") from None
        except (OSError, ValueError) as exc:
            raise TrainingError(f"the run's {path} is unreadable: {first_line(exc)}") from None
        # A file edited by hand (or by another tool) is checked field by field, so that a wrong
        # type is named here rather than met as a traceback steps into the run.
        if not isinstance(stored, dict):
            raise TrainingError(f"the run's {path} is unreadable: not a JSON object of settings")
        known = {f.name for f in fields(cls)}
        kept = {name: value for name, value in stored.items() if name in known}  # older runs' settings: ignored
        problem = field_problem(cls, kept)
        if problem:
            raise TrainingError(f"the run's {path} is unreadable: {problem}")
        return cls(**kept)


def _append_line(path: Path, line: str) -> None:
    """``line`` appended to ``path`` as a line of its own: a run killed while writing the line
    before leaves it cut short, without its newline, and the next must not join it."""
    with open(path, "a+b") as f:
        if f.tell():  # opened for appending: at the end, past the last line's end if it has one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode() + b"\n")


def _write_config(config: TrainConfig, path: Path) -> None:
    """The run's settings written whole or not at all: a resumed run with a new schedule replaces
    them, and a kill or a full disk mid-write must not leave the run unresumable."""
    try:
        write_text_whole(path, json.dumps(asdict(config), indent=2))
    except OSError as exc:
        raise OutputError(f"writing {path} failed: {exc.strerror or exc}") from None


def _atomic_torch_save(obj: dict, path: Path) -> None:
    """``obj`` saved whole at ``path`` or not at all (the checkpoint before it is kept)."""
    tmp = path.with_name(path.name + ".part")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise OutputError(f"writing {path} failed (disk full?): {first_line(exc)}") from None


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters need no gradient inside the block."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _lr_lambda(epochs: int, epochs_decay: int) -> Callable[[int], float]:
    """Constant for ``epochs``, then linear to zero over ``epochs_decay`` (reference 'linear' policy)."""

    def factor(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)

    return factor


class Trainer:
    """Holds the models, optimisers and data of one run; :meth:`run` trains to the end or ``max_steps``."""

    def __init__(self, config: TrainConfig, dist_ctx: DistContext | None = None) -> None:
        self.cfg = config
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        if dist_ctx is None:
            dist_ctx = init_distributed(self.device.type)
        self.dist = dist_ctx
        if self.device.type == "cuda" and dist_ctx.enabled:
            self.device = torch.device("cuda", dist_ctx.local_rank)
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)

        pairs, names = datasets.load_pairs(config.data, "train", config.direction, config.holdout)
        if not pairs:  # e.g. one image, which --holdout keeps for validation
            raise DataError(f"no training pairs in {datasets.folders_text(config.data)}: its images all went to "
                            f"validation (--holdout {config.holdout}) or its train/ folder is empty")
        self.train_set = datasets.PairDataset(pairs, names, config.load_size, config.crop_size, True, config.seed,
                                              rot90=config.rot90, shift=config.shift,
                                              colour_jitter=config.colour_jitter)
        val_pairs, val_names = datasets.load_pairs(config.data, "val", config.direction, config.holdout)
        self.val_set = (
            datasets.PairDataset(val_pairs, val_names, config.crop_size, config.crop_size, False) if val_pairs else None
        )
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=dist_ctx.world_size, rank=dist_ctx.rank, shuffle=True, seed=config.seed
        )

        self.G, self.D, gsd, self.lineage = _starting_models(config, self.train_set)
        self.spec = ModelSpec(ngf=config.ngf, gsd_m=gsd, tile_size=config.crop_size)  # the scale it validates at
        self.amp = use_bf16(config.precision, self.device)
        # Contiguous for fp32 on the CPU: the step took 0.60 against 0.71 s in channels_last (the
        # recipe from scratch) and 0.84 against 0.94 s (the default model's storage-aware
        # fine-tuning), width 48 on 2 AVX2 cores, every interleaved pair faster (session 30).
        # Under bf16 autocast on the CPU channels_last is a little faster (0.405 against 0.422 s,
        # the fine-tuning recipe on 2 AVX512-BF16 cores) unless the step rounds the weights as
        # stored, which groups them in contiguous order: there contiguous, 0.48-0.49 against
        # 0.51-0.57 s (session 31). channels_last on CUDA, not measured against contiguous there.
        cpu_contiguous = self.device.type == "cpu" and (not self.amp or config.storage_aware is not None)
        self.layout = torch.contiguous_format if cpu_contiguous else torch.channels_last
        self.teacher, self.teacher_lineage = _teacher(config, self.device, self.layout)
        # The teacher's map of each training pair, whole and unmirrored, kept once made: where a
        # pair reaches the model whole (load size = crop size, no turns), mirrored or moved, its
        # teacher's map is that map mirrored and moved with it (FlipAveraged and ViewMedian are
        # mirror-symmetric; a moved pair's map is the teacher's map of the place, moved with it),
        # so epochs after the first skip the teacher's passes (the flip average's two are a
        # quarter of the step). Kept up to TEACHER_MAPS_BYTES, and in the cache at each checkpoint (see
        # teacher_maps): the next run with this teacher and these pairs skips it from the start.
        self._taught: dict[int, torch.Tensor] = {}
        self._taught_file: Path | None = None
        if self.teacher is not None and self.train_set.kept is not None and self.train_set.placement(0) is not None:
            self._taught_file = teacher_maps.maps_file(
                self.teacher_lineage["sha256"], (a for a, _ in self.train_set.kept),
                f"{self.device.type}-{'bf16' if self.amp else 'fp32'}-torch{torch.__version__}"
                + ("" if config.distill_views == "flip" else f"-{config.distill_views}"))
            # All of them, or those a run stopped in its first epoch made (see save_checkpoint).
            self._taught = {i: m for i, m in teacher_maps.load_maps(self._taught_file).items()
                            if i < len(self.train_set)}
        self._taught_saved = len(self._taught)  # how many of them the cache holds
        if dist_ctx.enabled:
            convert_batchnorm(self.G)
            convert_batchnorm(self.D)
        self.G.to(self.device, memory_format=self.layout)
        self.D.to(self.device, memory_format=self.layout)
        # The weight average: per-epoch generators of this recipe wander around a solution (see
        # docs/model_card.md: the mean of two epochs' weights beat either), and a running mean of
        # the weights is the standard remedy (Yazici et al. 2019, "The unusual effectiveness of
        # averaging in GAN training").
        self.G_ema: nn.Module | None = copy.deepcopy(self.G).eval() if config.ema_decay > 0 else None
        betas = (config.beta1, config.beta2)
        # Adam's update in one fused kernel rather than a loop of elementwise ops over each tensor:
        # 24 against 124 ms per step for the width-48 generator on 2 AVX2 cores, the same weights
        # to float rounding (session 24). Fused Adam runs on the CPU and CUDA.
        fused = self.device.type in ("cpu", "cuda")
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=config.lr, betas=betas, fused=fused)
        lr_d = config.lr if config.lr_d is None else config.lr_d
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas, fused=fused)
        factor = _lr_lambda(config.epochs, config.epochs_decay)
        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, factor)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, factor)
        if dist_ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.G_ddp: nn.Module = DistributedDataParallel(self.G, device_ids=ids)
            self.D_ddp: nn.Module = DistributedDataParallel(self.D, device_ids=ids)
        else:
            self.G_ddp, self.D_ddp = self.G, self.D
        self.rounding = StoredRounding(config.storage_aware, self.device) if config.storage_aware else None
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_rmse = math.inf

    def release(self) -> None:
        """Drop the DDP wrappers: their reducers must go before the process group is destroyed."""
        self.G_ddp, self.D_ddp = self.G, self.D
        gc.collect()

    @property
    def total_epochs(self) -> int:
        return self.cfg.epochs + self.cfg.epochs_decay

    # --- checkpoints -------------------------------------------------------------------
    def state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(),
            "sched_D": self.sched_D.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_rmse": self.best_rmse,
            "rng": rng,
            "lineage": json.dumps(self.lineage),
            "teacher": json.dumps(self.teacher_lineage),
            **({"G_ema": self.G_ema.state_dict()} if self.G_ema is not None else {}),
        }

    def save_checkpoint(self) -> None:
        """The run's state, and the teacher's maps made so far (the first epoch's end writes a
        checkpoint, so all of them by then): a run stopped in its first epoch (Ctrl-C, a session's
        end) makes only the rest when resumed; a width-64 teacher's median of 18 views took half an
        hour of a two-core epoch (model card, session 54)."""
        if not self.dist.is_main:
            return
        _atomic_torch_save(self.state(), self.out / CHECKPOINT)
        if self._taught_file is not None and len(self._taught) > self._taught_saved:
            if teacher_maps.save_maps(self._taught_file, {i: m.cpu() for i, m in self._taught.items()}):
                self._taught_saved = len(self._taught)
            if len(self._taught) == len(self.train_set):
                self._taught_file = None  # all kept (or the cache cannot be written: the run goes on)

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            self.G.load_state_dict(state["G"])
            self.D.load_state_dict(state["D"])
            self.opt_G.load_state_dict(state["opt_G"])
            self.opt_D.load_state_dict(state["opt_D"])
            self.sched_G.load_state_dict(state["sched_G"])
            self.sched_D.load_state_dict(state["sched_D"])
            if self.G_ema is not None:
                self.G_ema.load_state_dict(state["G_ema"])
        except FileNotFoundError:
            raise TrainingError(f"nothing to resume: {path} does not exist") from None
        except (RuntimeError, KeyError, EOFError, ValueError) as exc:
            raise TrainingError(f"checkpoint {path} is corrupt or does not fit this run: {first_line(exc)}") from None
        for opt in (self.opt_G, self.opt_D):  # the moments in their weights' layout (older runs trained channels_last)
            for p, moments in opt.state.items():
                for key, value in moments.items():
                    if value.shape == p.shape:
                        moments[key] = torch.empty_like(p).copy_(value)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_rmse = state["global_step"], state["best_rmse"]
        if "lineage" in state:  # (checkpoints before it was kept: as computed above)
            self.lineage = json.loads(state["lineage"])
        started_with = json.loads(state.get("teacher", "null"))
        if started_with and started_with["sha256"] != self.teacher_lineage["sha256"]:
            now = self.teacher_lineage["sha256"]
            raise TrainingError(f"the teacher {self.cfg.distill_from} has changed since this run started "
                                f"(sha256 {started_with['sha256'][:12]}..., now {now[:12]}...)")
        # The rate comes from this run's schedule, not the saved optimiser: a schedule extended on
        # resume (see train()) would otherwise continue at the old, decayed rate.
        factor = _lr_lambda(self.cfg.epochs, self.cfg.epochs_decay)(self.epoch)
        for opt, sched in ((self.opt_G, self.sched_G), (self.opt_D, self.sched_D)):
            for group, base in zip(opt.param_groups, sched.base_lrs):
                group["lr"] = base * factor
        torch.set_rng_state(state["rng"]["cpu"].cpu())
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)

    # --- one optimisation step ----------------------------------------------------------
    def train_step(self, real_a: torch.Tensor, real_b: torch.Tensor,
                   taught: torch.Tensor | None = None) -> dict[str, float]:
        """Update D on (real, fake) pairs, then G on GAN + lambda*L1 (+ lambda_L2 * squared error
        when asked), as the reference does (with ``storage_aware``, G's forward and backward passes
        with its weights rounded as stored). ``taught``: the teacher's maps of ``real_a``, if
        known (else the teacher makes them)."""
        with rounded_as_stored(self.G, self.rounding):
            losses = self._losses_and_gradients(real_a, real_b, taught)
        self.opt_G.step()
        if self.G_ema is not None:
            self._update_ema()
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingError(
                f"loss became non-finite at step {self.global_step} ({losses}); "
                f"the last good checkpoint is kept in {self.out / CHECKPOINT}"
            )
        return losses

    def _losses_and_gradients(self, real_a: torch.Tensor, real_b: torch.Tensor,
                              taught: torch.Tensor | None = None) -> dict[str, float]:
        """D's update, and G's loss backpropagated (its optimiser step is the caller's); with
        ``lambda_gan`` 0, G's pixel terms alone and no pass through D."""
        adversarial = self.cfg.lambda_gan > 0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            fake_b = self.G_ddp(real_a)
        losses = {}
        if adversarial:
            losses["D"] = self._update_discriminator(real_a, real_b, fake_b.detach())
        # G's update needs gradients through D, not D's own: D's weights are frozen while this
        # graph is built, so the backward pass skips their gradients (as the reference does), and
        # ranks have none to synchronise.
        with _frozen(self.D), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss_gan = None
            if adversarial:
                no_sync = self.D_ddp.no_sync() if self.dist.enabled else nullcontext()
                with no_sync:
                    pred = self.D_ddp(torch.cat([real_a, fake_b], 1))
                loss_gan = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred))
            fake = fake_b.float()
            loss_l1 = F.l1_loss(fake, real_b.float())
            pixel, loss_teacher = self._pixel_loss(fake, real_b.float(), loss_l1), None
            if self.teacher is not None:
                if taught is None:
                    taught = self._ask_teacher(real_a).float()
                loss_teacher = F.l1_loss(fake, taught)
                share = self.cfg.distill_weight
                pixel = (1 - share) * pixel + share * self._pixel_loss(fake, taught, loss_teacher)
            loss_g = pixel if loss_gan is None else self.cfg.lambda_gan * loss_gan + pixel
        self.opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        if loss_gan is not None:
            losses["G_GAN"] = loss_gan.item()
        losses["G_L1"] = loss_l1.item()
        if loss_teacher is not None:  # G_L1 stays the distance to the real map, comparable across runs
            losses["G_L1_teacher"] = loss_teacher.item()
        return losses

    def _update_discriminator(self, real_a: torch.Tensor, real_b: torch.Tensor, fake_b: torch.Tensor) -> float:
        """One step of D on the real pair and the generated one; its loss."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            pred_fake = self.D_ddp(torch.cat([real_a, fake_b], 1))
            pred_real = self.D_ddp(torch.cat([real_a, real_b], 1))
            loss_d = 0.5 * (
                F.binary_cross_entropy_with_logits(pred_fake, torch.zeros_like(pred_fake))
                + F.binary_cross_entropy_with_logits(pred_real, torch.ones_like(pred_real))
            )
        self.opt_D.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_D.step()
        return loss_d.item()

    def _pixel_loss(self, fake: torch.Tensor, target: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
        """lambda_L1 * ``l1`` (the L1 distance to ``target``, which the caller also logs), plus
        lambda_L2 * the mean squared error when that term is on."""
        loss = self.cfg.lambda_l1 * l1
        return loss + self.cfg.lambda_l2 * F.mse_loss(fake, target) if self.cfg.lambda_l2 else loss

    @torch.no_grad()
    def _update_ema(self) -> None:
        """Move the average towards the weights just updated. The decay ramps up over the first
        steps ((1 + t) / (10 + t)), so a run from random weights does not average them in for long."""
        t = self.global_step
        keep = min(self.cfg.ema_decay, (1 + t) / (10 + t))
        for avg, p in zip(self.G_ema.parameters(), self.G.parameters()):
            avg.lerp_(p, 1.0 - keep)

    def _batches(self):
        self.sampler.set_epoch(self.epoch)
        self.train_set.set_epoch(self.epoch)
        indices = list(self.sampler)
        bs = self.cfg.batch_size
        for start in range(self.step_in_epoch * bs, len(indices), bs):
            batch = indices[start : start + bs]
            items = [self.train_set[i] for i in batch]
            a = torch.stack([x for x, _ in items]).to(self.device, memory_format=self.layout)
            b = torch.stack([y for _, y in items]).to(self.device, memory_format=self.layout)
            yield a, b, batch

    def _teacher_maps(self, batch: list[int]) -> torch.Tensor | None:
        """The teacher's maps of the items ``batch``, placed as the items are this epoch: kept from
        an earlier epoch or made now from the whole pairs and kept (see ``_taught``); None without
        a teacher, or where the items change from epoch to epoch by more than a mirroring and a
        move (the step then asks the teacher)."""
        if self.teacher is None:
            return None
        placements = [self.train_set.placement(i) for i in batch]
        if None in placements:
            return None
        made: dict[int, torch.Tensor] = {}
        missing = [i for i in batch if i not in self._taught]
        if missing:
            whole = torch.stack([self.train_set.whole(i)[0] for i in missing])
            made = dict(zip(missing, self._ask_teacher(whole.to(self.device, memory_format=self.layout))))
            size = made[missing[0]].nelement() * made[missing[0]].element_size()
            if (len(self._taught) + len(made)) * size <= TEACHER_MAPS_BYTES:
                self._taught.update((i, m.clone()) for i, m in made.items())  # not views of the batch
        maps = []
        for i, (mirrored, dy, dx) in zip(batch, placements):
            m = self._taught[i] if i in self._taught else made[i]
            maps.append(moved(m.flip(-1) if mirrored else m, dy, dx))
        return torch.stack(maps).to(self.device).float()

    def _ask_teacher(self, real_a: torch.Tensor) -> torch.Tensor:
        """The teacher's maps of ``real_a`` (its views combined as ``distill_views`` says), in fp16 as
        they are kept (rounded by at most a thirtieth of a level), so that a step trains alike on a
        kept map and on one asked for."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.teacher(real_a).half()

    # --- the loop -------------------------------------------------------------------------
    def run(self, progress: Callable[[dict], None] | None = None) -> dict:
        """Train until the schedule ends or ``max_steps`` more steps have run; returns the last record.
        Ctrl-C or SIGTERM stops it at the next step's start with a checkpoint (:class:`Interrupted`)."""
        self.out.mkdir(parents=True, exist_ok=True)
        with StopRequest() as stop:
            return self._run(progress, stop)

    def _run(self, progress: Callable[[dict], None] | None, stop: StopRequest) -> dict:
        steps_left = self.cfg.max_steps
        record: dict = {}
        self._train_mode()
        while self.epoch < self.total_epochs:
            sums: dict[str, float] = {}
            count = 0
            started = time.time()
            for a, b, batch in self._batches():
                if steps_left is not None and steps_left <= 0:
                    self.save_checkpoint()
                    return record
                if any_rank(stop.requested, self.device):  # every rank stops before the same step
                    self.save_checkpoint()
                    raise Interrupted(f"stopped at step {self.global_step} ({self.step_in_epoch} of epoch "
                                      f"{self.epoch + 1}), its checkpoint saved; the same command with --resume "
                                      "continues")
                taught = self._teacher_maps(batch)
                if self.train_set.colour_jitter:
                    if self.teacher is not None and taught is None:
                        taught = self._ask_teacher(a).float()  # the teacher sees the pair as it is
                    a = self.train_set.recoloured(a, batch).contiguous(memory_format=self.layout)
                losses = self.train_step(a, b, taught)
                self.step_in_epoch += 1
                self.global_step += 1
                count += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                if steps_left is not None:
                    steps_left -= 1
                if progress:
                    progress({"epoch": self.epoch, "step": self.global_step, **losses})
                if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            record = self._end_epoch({k: v / max(count, 1) for k, v in sums.items()}, time.time() - started)
        return record

    def _train_mode(self) -> None:
        """Both models in training mode, the generator's BatchNorm in eval mode with
        ``freeze_batchnorm`` and its dropout with ``no_dropout``. Set once: scoring and
        recalibration give each layer its own mode back."""
        self.G_ddp.train()
        self.D_ddp.train()
        if self.cfg.freeze_batchnorm:
            for m in _batchnorms(self.G):
                m.eval()
        if self.cfg.no_dropout:
            for m in self.G.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()

    @property
    def saved_generator(self) -> nn.Module:
        """The generator the run scores and saves: the weight average when it is kept."""
        return self.G_ema if self.G_ema is not None else self.G

    @torch.no_grad()
    def recalibrate_batchnorm(self) -> None:
        """Recompute the generators' BatchNorm running statistics for their current weights (see
        :func:`recalibrate_batchnorm`; with ``storage_aware``, for them rounded as stored); every
        rank runs it on the same crops."""
        for g in (self.G, self.G_ema) if self.G_ema is not None else (self.G,):
            with rounded_as_stored(g, self.rounding):
                recalibrate_batchnorm(g, self.train_set, self.cfg.bn_recalibration, self.cfg.bn_recalibration_batch,
                                      self.cfg.seed + self.epoch, self.device)

    def _end_epoch(self, losses: dict[str, float], seconds: float) -> dict:
        record = {"epoch": self.epoch + 1, "step": self.global_step, "seconds": round(seconds, 1),
                  "lr": self.opt_G.param_groups[0]["lr"], **losses}
        self.sched_G.step()
        if self.cfg.lambda_gan > 0:  # an untrained D's schedule (PyTorch warns of a step with no update)
            self.sched_D.step()
        self.epoch += 1
        self.step_in_epoch = 0
        if not self.cfg.freeze_batchnorm:
            self.recalibrate_batchnorm()
        if self.dist.is_main:
            generator = self.saved_generator
            storage = self.cfg.storage_aware  # scored and saved as stored
            if self.val_set is not None:
                metrics, outputs = evaluate_generator(self._as_saved(generator), self.val_set, self.device,
                                                      keep=self.cfg.samples)
                record["val"] = metrics
                if self.G_ema is not None:  # the weights being trained, for comparison
                    record["val_online"] = evaluate_generator(self._as_saved(self.G), self.val_set, self.device)[0]
                write_triplets(outputs, self.out / "samples" / f"epoch{self.epoch:03d}.png")
            spec = self._spec(record)
            trained_spec = self._spec(record, trained=True) if self.G_ema is not None else None
            if "val" in record and record["val"]["rmse"] < self.best_rmse:
                self.best_rmse = record["val"]["rmse"]
                save_generator(generator, spec, self.out / "best_generator.safetensors", storage or "fp32")
            save_generator(generator, spec, self.out / "generator.safetensors", storage or "fp32")
            if trained_spec:  # the trained weights too: the checkpoint's copy lacks this epoch's
                # BatchNorm statistics once its next write falls a few steps into the next epoch
                save_generator(self.G, trained_spec, self.out / "trained_generator.safetensors", storage or "fp32")
            if self.cfg.keep_snapshots:  # every epoch's generator, for `average-weights`
                snapshots = self.out / "snapshots"
                snapshots.mkdir(exist_ok=True)
                save_generator(generator, spec, snapshots / f"epoch{self.epoch:03d}.safetensors", storage or "fp16")
                if trained_spec:
                    save_generator(self.G, trained_spec, snapshots / f"epoch{self.epoch:03d}.trained.safetensors",
                                   storage or "fp16")
            _append_line(self.out / "history.jsonl", json.dumps(record))
        self.save_checkpoint()
        return record

    def _as_saved(self, generator: nn.Module) -> nn.Module:
        """``generator`` as the run saves it: with ``storage_aware``, a copy rounded as stored."""
        if self.cfg.storage_aware is None:
            return generator
        copy = as_stored(generator, self.spec, self.cfg.storage_aware)
        return copy.to(self.device, memory_format=torch.channels_last)

    def _spec(self, record: dict, trained: bool = False) -> ModelSpec:
        """Provenance of the saved generator (``trained``: of the weights being trained, not their average)."""
        prov = {"data": self.cfg.data, "epoch": self.epoch, "step": self.global_step,
                "recipe": "pix2pix", "val": record.get("val_online" if trained else "val"),
                "settings": {name: getattr(self.cfg, name) for name in RECORDED_SETTINGS}}
        if trained:
            prov["weights"] = TRAINED_WEIGHTS
        if self.cfg.storage_aware and prov["val"]:
            prov["val_storage"] = self.cfg.storage_aware
        if self.lineage:
            prov["fine_tuned_from"] = self.lineage
        if self.teacher_lineage:
            prov["distilled_from"] = self.teacher_lineage
        return replace(self.spec, provenance=prov)


def _starting_models(config: TrainConfig,
                     train_set: datasets.PairDataset) -> tuple[nn.Module, nn.Module, float | None, dict | None]:
    """The generator a run starts from, a fresh discriminator, the ground sampling distance the
    run records, and the lineage of the generator it was fine-tuned from (None for a fresh one).

    With ``init_from`` the generator is that file's, fine-tuned as it is, grown to a wider
    ``ngf`` or narrowed back to the width it was grown from; ``config`` then records the width
    trained (``ngf``, ``widened``, ``narrowed``). The lineage is kept in the checkpoint: the file
    behind ``init_from``, e.g. the shipped default, can change."""
    # As the model sees the tiles: resized to the crop size, as validation and translate run it.
    gsd = config.gsd_m if config.gsd_m is not None else datasets.data_gsd(config.data, config.crop_size)
    lineage: dict | None = None
    if config.init_from:
        pretrained, pspec = load_generator(None if config.init_from == "default" else config.init_from)
        grown_from = _grown_from(pspec.provenance)
        if config.ngf is not None and config.ngf < pspec.ngf and config.ngf != grown_from:
            grown = f" grown from width {grown_from}" if grown_from else ""
            back = f", or narrow it back to {grown_from}" if grown_from else ""
            raise TrainingError(f"--init-from {config.init_from} is a width-{pspec.ngf} generator{grown}: --ngf "
                                f"can widen it{back}, not narrow it to {config.ngf} (leave --ngf out to "
                                "fine-tune it)")
        config.widened = config.ngf is not None and config.ngf > pspec.ngf
        config.narrowed = config.ngf is not None and config.ngf < pspec.ngf
        if not (config.widened or config.narrowed):
            config.ngf = pspec.ngf  # config.json records the width it trains
        gsd = gsd if gsd is not None else pspec.gsd_m
        lineage = {"file": config.init_from, "sha256": model_digest(pretrained), "provenance": pspec.provenance,
                   **({"widened_from_ngf": pspec.ngf} if config.widened else {}),
                   **({"narrowed_from_ngf": pspec.ngf} if config.narrowed else {})}
    elif config.ngf is None:
        config.ngf = 64
    # A fresh generator is initialised even when one is loaded: the seed's random stream then
    # reaches the discriminator's initialisation as it always has.
    generator = UNetGenerator(3, 3, config.ngf)
    discriminator = PatchDiscriminator(6, config.ndf)
    init_weights(generator)
    init_weights(discriminator)
    if config.init_from:
        if config.widened:
            pretrained = widen(pretrained, config.ngf, train_set, config.seed)
        elif config.narrowed:
            pretrained = narrow_generator(pretrained, config.ngf)
        generator = pretrained.train()
    return generator, discriminator, gsd, lineage


def _teacher(config: TrainConfig, device: torch.device,
             layout: torch.memory_format) -> tuple[nn.Module | None, dict | None]:
    """The teacher ``distill_from`` names, wrapped to give its maps as ``distill_views`` asks
    (flip-averaged or the median of views), frozen, and its lineage; (None, None) without one."""
    if not config.distill_from:
        return None, None
    teacher, tspec = load_generator(None if config.distill_from == "default" else config.distill_from)
    lineage = {"file": config.distill_from, "sha256": model_digest(teacher), "views": config.distill_views,
               "provenance": tspec.provenance}
    views = TTA[config.distill_views]
    return views(teacher.eval().requires_grad_(False)).to(device, memory_format=layout), lineage


def _batchnorms(module: nn.Module) -> list[nn.BatchNorm2d]:
    """Every BatchNorm layer of ``module`` (the cross-rank ones under torchrun included)."""
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _grown_from(provenance: dict) -> int | None:
    """The width a generator was grown from, as its file's lineage records it (the run that grew
    it, or runs fine-tuned from its result without changing width); a mean of generators
    (``average-weights``) was, where each of them was grown from that width."""
    averaged = provenance.get("averaged_from")
    if isinstance(averaged, list) and averaged:
        # An input met twice (the same snapshot) has its provenance written once (compact_lineage).
        recorded = {p.get("sha256"): p["provenance"] for p in averaged
                    if isinstance(p, dict) and isinstance(p.get("provenance"), dict)}
        widths = {_grown_from(recorded[p.get("sha256")]) if isinstance(p, dict) and p.get("sha256") in recorded
                  else None for p in averaged}
        return widths.pop() if len(widths) == 1 else None
    parent = provenance.get("fine_tuned_from")
    if not isinstance(parent, dict) or "narrowed_from_ngf" in parent:  # narrowed back since: none
        return None
    if fits(parent.get("widened_from_ngf"), int):
        return parent["widened_from_ngf"]
    above = parent.get("provenance")
    return _grown_from(above) if isinstance(above, dict) else None


def widen(narrow: UNetGenerator, ngf: int, dataset: datasets.PairDataset, seed: int,
          crops: int = 200) -> UNetGenerator:
    """``narrow`` grown to width ``ngf``, computing exactly what it did (:func:`model.widen_generator`).

    The new channels' BatchNorm running statistics are estimated on ``crops`` training crops, so
    they start normalised when BatchNorm is frozen (``freeze_batchnorm``); the old channels keep
    the statistics the narrow generator's weights were trained with."""
    wide, fresh = widen_generator(narrow.cpu(), ngf)
    probe = copy.deepcopy(wide)
    recalibrate_batchnorm(probe, dataset, crops, 4, seed, torch.device("cpu"))
    for bn, estimated, channels in zip(_batchnorms(wide), _batchnorms(probe), fresh):
        bn.running_mean[channels] = estimated.running_mean[channels]
        bn.running_var[channels] = estimated.running_var[channels]
    return wide


def recalibrate_batchnorm(generator: nn.Module, dataset: datasets.PairDataset, count: int | None, batch: int,
                          seed: int, device: torch.device) -> int:
    """Re-estimate the generator's BatchNorm running statistics over ``count`` training crops (None:
    one of every pair); returns how many were used.

    Translate runs the generator in eval mode, on running statistics. Those are an exponential
    average over past weights and, with batch 1, of single-image statistics; re-estimating them
    over 200 training crops in batches of 4 cut validation RMSE from 44.9 to 34.2 on an early maps
    generator (see docs/model_card.md). Averaged weights need it too: the average of two
    snapshots' statistics is not the statistics of the averaged weights. With a crop of every pair
    the scores barely depend on the seed (it only shuffles the batches and the flips): 26.99 and
    27.00 RMSE for seeds 0 and 1 on the shipped model, where 200 crops gave 27.08 and 26.95.
    """
    n = len(dataset) if count is None else min(count, len(dataset))
    if n <= 0:
        return 0
    bns = _batchnorms(generator)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    with modes_kept(generator), torch.no_grad():
        generator.train()
        for start in range(0, n, batch):
            crops = [dataset[int(i)][0] for i in order[start : min(start + batch, n)]]
            generator(torch.stack(crops).to(device, memory_format=torch.channels_last))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return n


def train(
    config: TrainConfig,
    resume: bool = False,
    progress: Callable[[dict], None] | None = None,
    schedule: tuple[int | None, int | None] | None = None,
) -> dict:
    """Train a run directory from scratch, or continue it with ``resume`` (its stored config wins).

    ``max_steps`` is taken from the caller's config either way, so a resumed run can be bounded.
    ``schedule`` (epochs at the initial rate, epochs of decay; None keeps the stored value) replaces a
    resumed run's schedule, so a finished run can be trained longer with its discriminator and optimiser.
    """
    out = Path(config.out)
    if resume:
        max_steps = config.max_steps
        config = TrainConfig.from_json(out / "config.json")
        config.max_steps = max_steps
        if config.init_from and not (config.widened or config.narrowed):  # init_from's (before session 18: 64)
            config.ngf = None
        if schedule is not None:
            config.epochs = schedule[0] if schedule[0] is not None else config.epochs
            config.epochs_decay = schedule[1] if schedule[1] is not None else config.epochs_decay
    elif (out / CHECKPOINT).exists():
        raise TrainingError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    config.check()
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{out} is a file, not a run folder: choose another --out")
    made = not resume and not out.exists()
    if made:  # before the data and the networks load
        try:
            out.mkdir(parents=True)
        except OSError as exc:
            raise TrainingError(f"cannot create the run folder {out}: {exc.strerror}") from None
    try:
        trainer = Trainer(config)
    except BaseException:  # a refused run leaves no folder behind
        if made:
            with suppress(OSError):
                out.rmdir()
        raise
    try:
        if resume:
            trainer.load_checkpoint()
            if schedule is not None and trainer.dist.is_main:
                _write_config(config, out / "config.json")
        elif trainer.dist.is_main:
            _write_config(config, out / "config.json")
        return trainer.run(progress)
    finally:
        trainer.release()
        shutdown_distributed()
