"""What a training run folder holds: its settings, the epochs it has done and their held-out
scores, read from the files the trainer writes (``config.json``, ``history.jsonl``), so that a run
in the background can be followed without reading its log."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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

    @property
    def epochs_planned(self) -> int:
        return self.config.epochs + self.config.epochs_decay

    def best(self) -> dict | None:
        """The epoch's record with the lowest held-out RMSE (the run's best_generator), if scored."""
        scored = [r for r in self.history if isinstance(r.get("val"), dict) and fits(r["val"].get("rmse"), float)]
        return min(scored, key=lambda r: r["val"]["rmse"]) if scored else None


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
    return RunInfo(run_dir, config, history, (run_dir / CHECKPOINT).is_file(), unreadable, generators)
