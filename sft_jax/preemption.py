"""Graceful stop on SIGTERM / SIGINT: the training loop finishes its step, saves, and returns.

Preemptible machines (and schedulers, and Ctrl-C) send SIGTERM or SIGINT some seconds before
killing a job. Inside ``StopRequest()`` such a signal only sets ``requested``; the trainer checks
it after every step, writes a checkpoint with the data position and returns, so the next run of
the same command resumes there. A second signal while the first is pending raises
``KeyboardInterrupt`` at once (press Ctrl-C twice to abort without saving).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager that turns SIGTERM / SIGINT into a flag (main thread only; elsewhere
    it installs nothing and ``requested`` stays False)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signal is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.signal = signum
        log.warning(
            "%s received: saving a checkpoint after this step, then stopping",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
