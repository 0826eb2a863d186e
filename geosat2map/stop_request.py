"""Ctrl-C or SIGTERM during training, noted and acted on between steps.

Translate keeps an interrupted run's rows wherever the interrupt lands (its partial file is whole
at any instant). A training step is not: an interrupt raised inside it can fall between the
discriminator's update and the generator's, or between two of Adam's per-tensor updates, and a
checkpoint saved there would hold half a step. So the trainer asks, before each step, whether a
stop was requested, and saves its checkpoint at that boundary.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """While entered (on the main thread; elsewhere signals cannot be caught and nothing changes),
    SIGINT and SIGTERM set :attr:`requested` instead of raising; a second one raises
    KeyboardInterrupt at once, for a user who will not wait for the step to end. The previous
    handlers come back on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
