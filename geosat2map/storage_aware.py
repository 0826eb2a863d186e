"""The rounding of storage-aware training (``train --storage-aware``): at every step the generator
computes with its weights as a weights file stored that way loads them back."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import first_line
from .weights import int4_coded, int4_rounded, stored_value

log = logging.getLogger(__name__)


class StoredRounding:
    """Rounds generator tensors as a file stored as ``storage`` holds them (:func:`stored_value`).

    On the CPU the int4-coded tensors (28.3 M of the width-48 generator's 30.6 M weights) are
    rounded by :func:`int4_rounded` compiled with torch.compile into one fused pass: 0.10 against
    0.30 s per step on 2 AVX2 cores, a sixth of a storage-aware step (session 30). Compiling
    takes 13-23 s once per process. Each tensor shape's first compiled result is checked equal to
    stored_value's; where compiling fails (no C++ compiler) or a result differs, stored_value
    rounds from then on, so the compiled path only ever reaches the same values sooner.
    """

    def __init__(self, storage: str, device: torch.device) -> None:
        self.storage = storage
        #: True once the compiled rounding is in use, False once it has been given up.
        self.fused: bool | None = None if storage == "int4" and device.type == "cpu" else False
        self._checked: set[tuple[int, ...]] = set()

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        if self.fused is False or not int4_coded(value):
            return stored_value(value, self.storage)
        value = value.detach().contiguous()
        try:
            rounded = _compiled_int4(value)
        except Exception as exc:  # noqa: BLE001 - inductor's failures (no C++ compiler, ...) have many types
            return self._give_up(value, f"torch.compile failed ({first_line(exc)[:200]})")
        if tuple(value.shape) not in self._checked:
            if not torch.equal(rounded, stored_value(value, self.storage)):
                return self._give_up(value, "its result differed from the stored rounding")
            self._checked.add(tuple(value.shape))
            self.fused = True
        return rounded

    def _give_up(self, value: torch.Tensor, why: str) -> torch.Tensor:
        log.warning("storage-aware training rounds without torch.compile: %s", why)
        self.fused = False
        return stored_value(value, self.storage)


_compiled: Callable[[torch.Tensor], torch.Tensor] | None = None


def _compiled_int4(value: torch.Tensor) -> torch.Tensor:
    """:func:`int4_rounded` compiled (once per process, for any shape)."""
    global _compiled
    import torch._inductor.config as inductor

    if _compiled is None:
        _compiled = torch.compile(int4_rounded, dynamic=True)
    # Inductor otherwise drops the scales' round trip through fp16, which the file makes.
    with inductor.patch(emulate_precision_casts=True):
        return _compiled(value)


@contextmanager
def rounded_as_stored(module: nn.Module, rounding: StoredRounding | None) -> Iterator[None]:
    """Inside the block ``module``'s parameters hold their rounding (no change with None); after
    it, their exact values again. Gradients computed inside are the rounded weights'; an optimiser
    step after the block applies them to the exact weights: the straight-through estimator of
    quantisation-aware training."""
    if rounding is None:
        yield
        return
    params = list(module.parameters())
    with torch.no_grad():
        exact = [p.detach().clone() for p in params]
        for p in params:
            p.copy_(rounding(p))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, exact):
                p.copy_(value)
