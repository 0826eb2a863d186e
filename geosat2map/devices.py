"""Choosing the torch device from a user's ``auto|cpu|cuda|mps`` string."""

from __future__ import annotations

import torch

from .errors import Geosat2mapError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; asking for an absent one is an error."""
    name = name.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Geosat2mapError("--device cuda asked for, but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise Geosat2mapError("--device mps asked for, but MPS is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise Geosat2mapError(f"unknown device {name!r} (use auto, cpu, cuda or mps)") from None
