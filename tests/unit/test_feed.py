"""Training batches read ahead on threads are the batches read inline, in order, from any
step (sft_jax.data.feed)."""

import threading
import time

import grain
import numpy as np
import pytest

from sft_jax.data import feed


def _stream():
    """An infinite stream whose batch i is a function of i, slow enough for threads to race."""
    one_epoch = grain.MapDataset.range(7).shuffle(seed=3).map(lambda i: (time.sleep(0.002), i)[1])
    return one_epoch.batch(2, drop_remainder=True).repeat()


def test_read_ahead_equals_inline_from_any_step():
    inline, ahead = feed.BatchFeed(_stream(), 0), feed.BatchFeed(_stream(), 3)
    order = list(range(0, 9)) + [4, 5, 6] + [20, 21, 2]  # sequential, back, forward, back
    try:
        for step in order:
            np.testing.assert_array_equal(ahead.get(step), inline.get(step))
    finally:
        ahead.close()
    assert ahead._it is None
    # The epoch reshuffles: batch 3 (the first of epoch 2) is not batch 0.
    assert not np.array_equal(inline.get(0), inline.get(3))


def test_read_ahead_of_a_finite_split_keeps_order_and_length():
    split = grain.MapDataset.range(11).map(lambda i: (time.sleep(0.002), i * i)[1]).batch(3)
    assert [list(b) for b in feed.read_ahead(split, 4)] == [list(b) for b in split]
    assert [list(b) for b in feed.read_ahead(split, 0)] == [list(b) for b in split]


def _recording_split(read):
    """A split of 200 batches of 2 whose reads append (element, thread name) to ``read``."""

    def record(i):
        read.append((i, threading.current_thread().name))
        time.sleep(0.001)
        return i

    return grain.MapDataset.range(400).map(record).batch(2)


@pytest.mark.parametrize("threads", [0, 2])
def test_read_ahead_holds_at_most_twice_the_threads_and_none_when_inline(threads):
    """0 reads on the calling thread only what is asked for (iterating a grain MapDataset
    itself would read ahead on 16 threads, up to 500 batches); N holds at most 2N ahead."""
    read = []
    it = iter(feed.read_ahead(_recording_split(read), threads))
    for _ in range(3):
        next(it)
    time.sleep(0.2)  # time for reader threads to run ahead
    it.close()
    assert len(read) <= 2 * (3 + 2 * threads)
    threads_used = {name for _, name in read}
    if threads == 0:
        assert threads_used == {threading.current_thread().name}


def test_threads_resolve_by_backend_and_bad_values_are_named():
    assert feed.resolve_threads(-1) == 0  # a CPU backend: the cores run the step
    assert feed.resolve_threads(0) == 0 and feed.resolve_threads(4) == 4
    with pytest.raises(ValueError, match="train.prefetch_threads=-2"):
        feed.resolve_threads(-2)


def test_auto_threads_on_an_accelerator_follow_the_cores_this_process_may_use(monkeypatch):
    """A GPU job pinned to 3 of a host's cores (a container's CPU set, taskset) reads on 3
    threads, not on min(16, every core of the host)."""
    monkeypatch.setattr(feed.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(feed.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(feed.os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    assert feed.resolve_threads(-1) == 3
    monkeypatch.setattr(feed.os, "sched_getaffinity", lambda pid: set(range(40)), raising=False)
    assert feed.resolve_threads(-1) == feed.MAX_AUTO_THREADS
