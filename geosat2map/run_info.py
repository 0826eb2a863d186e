"""What a training run folder holds: its settings, the epochs it has done and their held-out
scores, read from the files the trainer writes (``config.json``, ``history.jsonl``), so that a run
in the background can be followed without reading its log."""

from __future__ import annotations

import json
import pickle
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import TrainingError
from .records import fits
from .train import CHECKPOINT, TrainConfig


@dataclass
class RunInfo:
    """A run folder as read: ``history`` holds one record per finished epoch (losses, ``val``)."""

    path: Path
    config: TrainConfig
    history: list[dict]
    #: A checkpoint to continue from (``train --resume``) is there.
    resumable: bool
    #: Lines of ``history.jsonl`` that are not a record: a line cut short by a kill mid-write.
    unreadable_lines: int = 0
    generators: list[str] = field(default_factory=list)
    #: Where the checkpoint stands (``epoch`` from 0, ``step_in_epoch``, ``global_step``): a run's
    #: progress within an epoch, which history.jsonl records only at the epoch's end. None without
    #: a checkpoint or where it cannot be read.
    position: dict | None = None

    @property
    def epochs_planned(self) -> int:
        return self.config.epochs + self.config.epochs_decay

    def steps_per_epoch(self) -> int | None:
        """An epoch's steps: the last epoch's record's step less the one before's (None before the
        first epoch ends)."""
        last = self.history[-1] if self.history else {}
        before = self.history[-2].get("step") if len(self.history) > 1 else 0
        return last["step"] - before if fits(last.get("step"), int) and fits(before, int) else None

    @property
    def first_epoch_teaches(self) -> bool:
        """A distilled run's first epoch also asks its teacher for the maps later epochs reuse:
        with a width-48 median of 18 views, 2 429 s against the next one's 969 (session 58)."""
        return bool(self.config.distill_from)

    def epoch_seconds(self, last: int = 5) -> float | None:
        """The median time of the last ``last`` finished epochs (their records' ``seconds``), or
        None before one. The median: an epoch resumed part-way records only the part after the
        resume, and one paused or sharing the machine records that too. A distilled run's first
        epoch counts only while it is the only one (:attr:`first_epoch_teaches`)."""
        timed = self.history[1:] if self.first_epoch_teaches and len(self.history) > 1 else self.history
        times = [r["seconds"] for r in timed[-last:] if fits(r.get("seconds"), float) and r["seconds"] > 0]
        return float(statistics.median(times)) if times else None

    def seconds_to_go(self) -> float | None:
        """The rest of the planned epochs at :meth:`epoch_seconds` each, less the part of the epoch
        under way that the last checkpoint holds (None before an epoch ends; 0 once finished)."""
        per_epoch = self.epoch_seconds()
        if per_epoch is None:
            return None
        left, steps = max(self.epochs_planned - len(self.history), 0), self.steps_per_epoch()
        if left and self.position and steps and self.position["epoch"] == len(self.history):  # the next epoch's
            left -= min(self.position["step_in_epoch"] / steps, 1.0)
        return left * per_epoch

    def best(self) -> dict | None:
        """The epoch's record with the lowest held-out RMSE (the run's best_generator), if scored."""
        scored = [r for r in self.history if isinstance(r.get("val"), dict) and fits(r["val"].get("rmse"), float)]
        return min(scored, key=lambda r: r["val"]["rmse"]) if scored else None

    def trained_beat_average(self) -> dict | None:
        """The last epoch's scores of the weights being trained (``val_online``) where a run keeping
        a weight average (``--ema-decay``) saved them and they beat the average it saves on RMSE:
        the average usually wins, not always (the model card's g64_59: 21.29 against 21.35)."""
        last = self.history[-1] if self.history else {}
        val, online = last.get("val"), last.get("val_online")
        saved = "trained_generator.safetensors" in self.generators
        if not (saved and isinstance(val, dict) and isinstance(online, dict)):
            return None
        better = fits(val.get("rmse"), float) and fits(online.get("rmse"), float) and online["rmse"] < val["rmse"]
        return online if better else None


def read_run(run_dir: str | Path) -> RunInfo:
    """The run in ``run_dir``, or a :class:`TrainingError` where it holds none (no or an unreadable
    ``config.json``)."""
    run_dir = Path(run_dir)
    config = TrainConfig.from_json(run_dir / "config.json")
    history, unreadable = [], 0
    log = run_dir / "history.jsonl"
    try:
        lines = log.read_text().splitlines() if log.exists() else []
    except OSError as exc:
        raise TrainingError(f"the run's {log} is unreadable: {exc.strerror or exc}") from None
    for line in filter(str.strip, lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            history.append(record)
        else:
            unreadable += 1
    generators = [p.name for p in sorted(run_dir.glob("*generator.safetensors"))]
    checkpoint = run_dir / CHECKPOINT
    return RunInfo(run_dir, config, history, checkpoint.is_file(), unreadable, generators,
                   _position(checkpoint) if checkpoint.is_file() else None)


def _position(checkpoint: Path) -> dict | None:
    """The checkpoint's epoch and steps, read memory-mapped: its tensors (500 MB for width 48 with
    the optimisers' moments) are not read (0.03 s)."""
    try:
        state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # cut short, not a checkpoint
        return None
    keys = ("epoch", "step_in_epoch", "global_step")
    if not isinstance(state, dict) or not all(fits(state.get(k), int) for k in keys):
        return None
    return {k: state[k] for k in keys}
