"""Reading a batch's records, and the rows of a global batch that one process builds.

Every pipeline is indexed by batch: ``ds[i]`` is global batch ``i``, the same on every process
(seeded shuffles). In a multi-process run each process builds only the rows its devices hold
(``rows``, from ``sharding.feed_rows``): it tokenizes, decodes and resamples those records
and no others, and whatever depends on the whole batch is decided from data every process
has: the padded length of a text batch from the token counts taken when the split loads, the
augmentation draws of an image batch replayed from the earlier rows' image sizes (their
records are read for that, not decoded). So the rows agree with the global batch one process
would build (tests/data/test_process_rows.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def read_records(source: Sequence[Mapping[str, Any]], indices: Sequence[int]) -> list:
    """``[source[i] for i in indices]``, through ``source.__getitems__`` when it has one (tfds
    array_record sources read a batch in parallel, ~10x faster than one by one)."""
    indices = [int(i) for i in indices]
    if not indices:
        return []
    getitems = getattr(source, "__getitems__", None)
    return list(getitems(indices)) if getitems else [source[i] for i in indices]


def check_rows(rows: slice | None, batch_size: int) -> range:
    """The positions ``rows`` selects in a batch of ``batch_size`` rows (all for None); a
    ValueError unless it is a non-empty contiguous slice inside the batch."""
    if rows is None:
        return range(batch_size)
    picked = range(batch_size)[rows]
    exact = (rows.start, rows.stop, rows.step or 1) == (picked.start, picked.stop, 1)
    if not picked or not exact:
        raise ValueError(f"rows {rows} is not a non-empty contiguous part of {batch_size} rows")
    return picked
