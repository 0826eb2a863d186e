"""The rounding of storage-aware training (``train --storage-aware``): at every step the generator
computes with its weights as a weights file stored that way loads them back."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import first_line
from .weights import INT4_GROUP, int4_coded, int4_rounded, stored_value

log = logging.getLogger(__name__)


class StoredRounding:
    """Rounds generator parameters to what a file stored as ``storage`` holds
    (:func:`stored_value`), and puts their exact values back afterwards.

    Each parameter's data is swapped with a spare tensor of its shape and layout, kept from step
    to step, into which the rounding is written; putting the exact values back swaps them again.
    Fresh tensors of the generator's size at every step cost more than the rounding itself, in
    page faults (glibc maps each afresh); copying the exact values aside and back, as sessions 31
    to 46 did, cost more than the swaps: rounding and restoring the width-48 generator took
    0.070-0.083 s so, 0.041-0.055 s swapped (session 47, 2 AMX cores, contiguous), of a 0.3 s step.

    On the CPU the int4-coded tensors (28.3 M of the width-48 generator's 30.6 M weights) are
    rounded by :func:`int4_rounded` compiled with torch.compile into one fused pass over each
    tensor viewed as its groups, which inductor writes in place with no temporary of the tensor's
    size: 0.046-0.049 against 0.096 s for rounding into new tensors (session 31, 2 AVX-512 cores,
    contiguous), 0.091-0.098 against 0.119-0.127 s for channels_last weights, which are rounded
    through one contiguous scratch tensor (the trainer keeps weights it rounds contiguous on the
    CPU for that reason). Compiling takes 13-23 s once per process. Each tensor shape's first
    compiled result is checked equal to stored_value's; where compiling fails (no C++ compiler)
    or a result differs, stored_value rounds from then on, so the compiled path only ever reaches
    the same values sooner.
    """

    def __init__(self, storage: str, device: torch.device) -> None:
        self.storage = storage
        #: True once the compiled rounding is in use, False once it has been given up.
        self.fused: bool | None = None if storage == "int4" and device.type == "cpu" else False
        self._checked: set[tuple[int, ...]] = set()
        self._spare: list[torch.Tensor] = []  # outside round_ ... restore_: the rounded values' tensors
        self._exact: list[torch.Tensor] = []  # inside: the exact values' tensors, swapped out
        self._scratch = torch.empty(0)

    def round_(self, params: Sequence[torch.Tensor]) -> None:
        """Swap ``params``' exact values out for their rounding (no autograd history)."""
        if [(t.shape, t.stride(), t.dtype, t.device) for t in self._spare] != \
                [(p.shape, p.stride(), p.dtype, p.device) for p in params]:
            self._spare = [torch.empty_like(p) for p in params]  # in each parameter's own layout
        self._exact = []
        with torch.no_grad():
            for param, rounded in zip(params, self._spare):
                exact = param.data
                param.data = rounded
                self._exact.append(exact)
                self._round(param.detach(), exact)
        self._spare = []

    def restore_(self, params: Sequence[torch.Tensor]) -> None:
        """Put back the exact values :meth:`round_` swapped out."""
        for param, exact in zip(params, self._exact):
            self._spare.append(param.data)
            param.data = exact
        self._exact = []

    def _round(self, param: torch.Tensor, exact: torch.Tensor) -> None:
        if self.fused is False or not int4_coded(exact):
            param.copy_(stored_value(exact, self.storage))
            return
        target = param if param.is_contiguous() else self._scratch_for(exact)
        # Itself unless laid out channels_last (CPU storage-aware runs keep weights contiguous).
        source = exact.contiguous()
        try:
            _compiled_int4_into(target.view(-1, INT4_GROUP), source.view(-1, INT4_GROUP))
        except Exception as exc:  # noqa: BLE001 - inductor's failures (no C++ compiler, ...) have many types
            self._give_up(param, exact, f"torch.compile failed ({first_line(exc)[:200]})")
            return
        if target is not param:
            param.copy_(target.view(exact.shape))
        if tuple(exact.shape) not in self._checked:
            if not torch.equal(param, stored_value(exact, self.storage)):
                self._give_up(param, exact, "its result differed from the stored rounding")
                return
            self._checked.add(tuple(exact.shape))
            self.fused = True

    def _scratch_for(self, exact: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of ``exact``'s shape, for weights in another layout (channels_last)."""
        if self._scratch.numel() < exact.numel() or self._scratch.device != exact.device:
            self._scratch = torch.empty(exact.numel(), dtype=exact.dtype, device=exact.device)
        return self._scratch[: exact.numel()].view(exact.shape)

    def _give_up(self, param: torch.Tensor, exact: torch.Tensor, why: str) -> None:
        log.warning("storage-aware training rounds without torch.compile: %s", why)
        self.fused = False
        param.copy_(stored_value(exact, self.storage))


_compiled: Callable[[torch.Tensor, torch.Tensor], None] | None = None


def _round_into(out: torch.Tensor, value: torch.Tensor) -> None:
    out.copy_(int4_rounded(value))


def _compiled_int4_into(out: torch.Tensor, value: torch.Tensor) -> None:
    """``out`` = :func:`int4_rounded` of ``value``, compiled (once per process, for any shape)."""
    global _compiled
    import torch._inductor.config as inductor

    if _compiled is None:
        _compiled = torch.compile(_round_into, dynamic=True)
    # Inductor otherwise drops the scales' round trip through fp16, which the file makes.
    with inductor.patch(emulate_precision_casts=True):
        _compiled(out, value)


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
    try:
        rounding.round_(params)
        yield
    finally:  # also after a failure part-way through the rounding: what was swapped out goes back
        rounding.restore_(params)
