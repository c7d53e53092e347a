"""Graceful stop on SIGTERM / SIGINT: the training loop finishes its step, saves, and returns.

Preemptible machines (and schedulers, and Ctrl-C) send SIGTERM or SIGINT some seconds before
killing a job. Inside ``StopRequest()`` such a signal only sets ``requested``; the trainer checks
it after every step, writes a checkpoint with the data position and returns, so the next run of
the same command resumes there. A second signal while the first is pending raises
``KeyboardInterrupt`` at once (press Ctrl-C twice to abort without saving).

Several processes (a multi-host run) must stop after the same step, since the checkpoint is a
collective operation, but a signal may reach them at different steps (or reach one alone).
``stop_after(step)`` makes them agree through the JAX coordination service's key-value store:
the first process with a signal publishes its step + ``AGREEMENT_MARGIN`` and every process
reads the agreed step after each step. The processes are at most a step or two apart (every
step's gradients are all-reduced, and the trainer reads a step's results after issuing the
next), so none has passed the agreed step when it reads it.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
AGREEMENT_MARGIN = 3  # steps between the first signal and the agreed stop (several processes)
_requests = itertools.count()  # each process opens its StopRequests in the same order


class StopRequest:
    """Context manager that turns SIGTERM / SIGINT into a flag (main thread only; elsewhere
    it installs nothing and ``requested`` stays False)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}
        self._client: Any = None  # the coordination service's client (several processes)
        self._key = ""
        self._published = False
        self._agreed: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def stop_after(self, step: int) -> bool:
        """Whether to stop (and save) after ``step``: a signal, or with several processes the
        step they agreed on (module doc)."""
        if self._client is None:
            return self.requested
        if self.requested and not self._published:
            self._published = True
            try:
                self._client.key_value_set(self._key, str(step + AGREEMENT_MARGIN))
            except Exception:  # noqa: BLE001 (another process published first: its step holds)
                pass
        if self._agreed is None:
            try:
                self._agreed = int(self._client.key_value_try_get(self._key))
                log.warning("the processes stop after step %d", self._agreed)
            except Exception:  # noqa: BLE001 (no stop published yet)
                return False
        if step > self._agreed:
            raise RuntimeError(f"step {step} is past the agreed stop at step {self._agreed}")
        return step == self._agreed

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
        import jax

        self._key = f"sft_jax/stop_after_step/{next(_requests)}"
        if jax.process_count() > 1:
            from jax._src import distributed  # the client jax.distributed.initialize made

            self._client = distributed.global_state.client
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
