"""Choosing the torch device from a user's ``auto|cpu|cuda|mps`` string."""

from __future__ import annotations

import warnings

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


PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware: CUDA GPUs that support it, and CPUs with AMX
    or AVX512-BF16. There bf16 runs the generator 2-2.5x faster than fp32 (2 cores with AMX:
    145 against 58 tiles/s, width 32); CPUs without emulate it, many times slower (2 AVX2 cores of
    an AMD EPYC, session 59: 0.4 against 10 tiles/s, width 48)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # torch's own probes of the CPU (private, hence the fallback to "no" if a release drops them).
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(probe() for probe in probes if probe is not None)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to compute in bf16 (autocast) for ``precision``: ``auto`` does where it is native.
    bf16 asked for on a CPU that only emulates it is done, with a warning: it is no faster there."""
    if precision not in PRECISIONS:
        raise Geosat2mapError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision == "auto":
        return native_bf16(device)
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        warnings.warn("this CPU has no bf16 arithmetic (AMX or AVX512-BF16): bf16 is emulated, many times slower "
                      "than fp32 here (--precision auto uses fp32 on it)", stacklevel=2)
    return precision == "bf16"
