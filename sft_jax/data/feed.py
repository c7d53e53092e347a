"""Batches prepared ahead of the step that needs them (training, and evaluation passes).

Batch ``i`` of the trainer's stream is a function of ``i`` alone (seeded shuffle and
augmentation), so reading batches on grain's reader threads changes when they are made, never
what they hold. On an accelerator this takes decoding, augmentation and tokenization off the
path between two steps; on a CPU-only host the cores run the step itself, so batches are read
inline there by default.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax

MAX_AUTO_THREADS = 16


def config_threads(cfg: Any) -> int:
    """The reader threads of a run's config (``train.prefetch_threads``, ``resolve_threads``)."""
    return resolve_threads(cfg.train.get("prefetch_threads", -1))


def resolve_threads(threads: int) -> int:
    """``train.prefetch_threads``: -1 (auto) = 0 on a CPU backend, else min(16, the cores this
    process may run on)."""
    if threads < -1:
        raise ValueError(f"train.prefetch_threads={threads}; use -1 (auto), 0 (inline) or N > 0")
    if threads == -1:
        return 0 if jax.default_backend() == "cpu" else min(MAX_AUTO_THREADS, usable_cores())
    return threads


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (a container's or scheduler's CPU set,
    e.g. ``taskset``), not the machine's count, where the platform reports one."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def read_ahead(dataset: Any, threads: int) -> Any:
    """``dataset`` (a grain ``MapDataset``) as an iterable whose elements are read ahead, in
    order, on ``threads`` threads (at most twice as many held); 0: read inline, one element
    when asked for (iterating the ``MapDataset`` itself would read ahead with grain's default
    ``ReadOptions``: 16 threads, 500 elements)."""
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    return dataset.to_iter_dataset(options)


class BatchFeed:
    """``get(step)``: batch ``step`` of a grain ``MapDataset``. With ``threads`` > 0 the batches
    after it are read ahead on that many threads (at most twice as many batches held); asking
    for a step other than the next restarts the read-ahead there. 0 reads inline."""

    def __init__(self, dataset: Any, threads: int):
        self.dataset, self.threads = dataset, threads
        self._it, self._next = None, None

    def get(self, step: int) -> Any:
        if self.threads == 0:
            return self.dataset[step]
        if self._it is None or step != self._next:
            self.close()
            self._it = iter(read_ahead(self.dataset[step:], self.threads))
        self._next = step + 1
        return next(self._it)

    def close(self) -> None:
        """Stops the reader threads (``get`` starts them again)."""
        if self._it is not None:
            self._it.close()
            self._it = None
