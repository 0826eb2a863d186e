"""The teacher's maps of a training set, kept on disk from one training run to the next.

Distillation (``train --distill-from``) asks the teacher for its flip-averaged map of each training
pair: two of the step's passes, a quarter of its time. Where pairs are used whole, that map is
the same in every epoch (mirrored and moved with its pair), so a run keeps the maps in memory after its
first epoch (``Trainer._teacher_maps``); it is also the same in every run with the same teacher,
the same pairs and the same arithmetic, so the maps are kept here too, in the cache, for the
next run of a chain of fine-tuning cycles taught by one teacher and for a run resumed after its
first epoch (in a new process, which has lost the maps in memory): they skip the teacher as
well. A run stopped in its first epoch has kept the maps it made by its last checkpoint, and
makes only the rest. The file is named by what the maps depend on, so a changed teacher, set of
pairs or code that makes the maps finds none.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import model
from .cache import cache_dir, prune

#: Teachers whose maps are kept (the maps set's 986 training pairs take 388 MB as fp16).
KEPT_TEACHERS = 2

PATTERN = "teacher-maps-*.safetensors"

#: The source files of the code that makes the maps: the generator and its views (how
#: median_of_views batches and pads them). Their digest is part of the file's name, so maps made by
#: code since changed are not taken for the new code's (in bf16 a regrouped pass rounds otherwise).
MAKERS = (model.__file__,)


def maps_file(teacher_digest: str, inputs: Iterable[torch.Tensor], arithmetic: str) -> Path:
    """Where the maps of a teacher (its :func:`~geosat2map.weights.model_digest`) for the pairs
    whose model inputs are ``inputs`` (uint8, in the set's order), made by the code in
    :data:`MAKERS`, are kept; ``arithmetic`` names what else changes the maps (device type,
    autocast, the torch release: its kernels may round otherwise)."""
    h = hashlib.sha256()
    for source in MAKERS:
        h.update(Path(source).read_bytes())
    for image in inputs:
        h.update(repr(tuple(image.shape)).encode())
        h.update(image.contiguous().numpy().tobytes())
    return cache_dir() / PATTERN.replace("*", f"{teacher_digest[:32]}-{h.hexdigest()[:16]}-{arithmetic}")


def load_maps(path: Path) -> dict[int, torch.Tensor]:
    """The maps kept in ``path`` by item index; none where the file is missing or unreadable (they
    are made again)."""
    try:
        maps = {int(k): v for k, v in load_file(path).items()}
        path.touch()  # recently used: kept by the pruning
    except (OSError, SafetensorError, ValueError):
        return {}
    return maps


def save_maps(path: Path, maps: dict[int, torch.Tensor]) -> bool:
    """Keep ``maps`` in ``path`` (written whole, then renamed into place) and prune the cache to the
    last ``KEPT_TEACHERS``; False where it cannot be written (the run goes on without)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({str(i): m.contiguous() for i, m in maps.items()}, tmp)
        os.replace(tmp, path)
        prune(path.parent, PATTERN, KEPT_TEACHERS)
    except OSError:
        return False
    finally:  # a full disk or Ctrl-C mid-write: no hundreds of MB left behind in the cache
        with suppress(OSError):  # renamed, never made, or no folder at all
            tmp.unlink()
    return True
