"""Where a step's time goes: a ``jax.profiler`` trace of a few calls, summed per XLA operation.

``profile_ops(call, steps, logdir)`` runs ``call`` (which must block until its work is done)
``steps`` times under ``jax.profiler.trace`` and returns the operations of the trace with their
time per call, largest first. Operation names are XLA's (``ynn_fusion.12``,
``copy_bitcast_fusion.3`` on CPU; kernel names on GPU); the numeric suffix is dropped so that
one row sums every instance of a kind (``ops_by_kind``). Device events are those of the
``/device:...`` processes (GPU kernels); on CPU, where XLA runs operations on its own threads,
the events of the XLA worker threads (``tf_XLAEigen``) minus the executor's bookkeeping. On CPU
several operations can run at once, so the per-operation times can sum to more than the wall
time of a call.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Any, Callable

import jax

_BOOKKEEPING = ("ThunkExecutor", "end: ", "SlinkyThreadPool")


def _device_threads(events: list[dict]) -> set[tuple[Any, Any]]:
    """(pid, tid) of the threads whose events are XLA operations."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"
    }
    device = {pid for pid, name in procs.items() if name.startswith("/device:")}
    picked = {key for key in threads if key[0] in device}
    return picked or {key for key, name in threads.items() if name.startswith("tf_XLAEigen")}


def ops_by_kind(events: list[dict], calls: int) -> list[dict[str, Any]]:
    """Per operation kind (name without its ``.N`` suffix): ``ms`` per call, ``count`` per call
    and ``share`` of all operation time; largest first."""
    threads = _device_threads(events)
    total = collections.defaultdict(float)
    count = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or (e.get("pid"), e.get("tid")) not in threads:
            continue
        if e["name"].startswith(_BOOKKEEPING):
            continue
        kind = re.sub(r"\.\d+$", "", e["name"])
        total[kind] += float(e.get("dur", 0.0))
        count[kind] += 1
    all_us = sum(total.values()) or 1.0
    rows = [
        {"op": k, "ms": us / 1e3 / calls, "count": count[k] / calls, "share": us / all_us}
        for k, us in total.items()
    ]
    return sorted(rows, key=lambda r: -r["ms"])


def profile_ops(call: Callable[[], None], steps: int, logdir: str) -> list[dict[str, Any]]:
    """Traces ``steps`` calls of ``call`` into ``logdir`` (TensorBoard / Perfetto files stay
    there) and returns ``ops_by_kind`` of the trace."""
    os.makedirs(logdir, exist_ok=True)
    before = set(glob.glob(os.path.join(logdir, "**", "*.json.gz"), recursive=True))
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(steps):
            call()
    new = set(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True))
    paths = sorted(new - before, key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {logdir}")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return ops_by_kind(events, steps)


def format_ops(rows: list[dict[str, Any]], top: int = 20) -> str:
    """A text table of the ``top`` rows."""
    lines = [f"{'ms/step':>9} {'share':>6} {'count':>6}  op"]
    for r in rows[:top]:
        lines.append(f"{r['ms']:9.1f} {100 * r['share']:5.1f}% {r['count']:6.0f}  {r['op']}")
    return "\n".join(lines)
