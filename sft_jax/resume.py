"""Resuming safely: the newest checkpoint that restores, and the same data order as before.

``restore_latest`` walks the kept checkpoints from the newest down: a step that fails to restore
(truncated or corrupted files) is reported, moved aside to ``<step>.corrupt-<time>`` (nothing
is deleted) and the previous one is tried; one written with another configuration stops the
resume with an error instead (``checkpoint.CheckpointMismatchError``), as does a failure that
says nothing about the files (out of memory, permissions, an interrupted or timed-out read:
``is_transient``), which moves nothing. A directory whose checkpoints were all moved aside
does not start over silently: ``restore_latest`` raises until they are removed. ``check_data_order``
logs a hash of each epoch's batches (a ``split="data"`` row in metrics.jsonl) and, when the
epoch was already logged by an earlier run, checks that the resumed run sees the very same
batches. The hash is one of every row's digest, in order, so each process of a multi-host run
digests the rows it builds, and the hash does not depend on how many processes there are.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import time
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from sft_jax import checkpoint as ckpt_lib
from sft_jax import logging as log_lib
from sft_jax import sharding
from sft_jax.train_state import TrainState

log = logging.getLogger(__name__)


class DataOrderError(RuntimeError):
    """The resumed run's batches differ from those the interrupted run saw."""


_MOVED_ASIDE = ".corrupt-"  # <step>.corrupt-<time>


def _quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
    """Moves checkpoint ``step`` aside (process 0 of a multi-host run; the others go on to the
    previous step as well)."""
    src = os.path.join(str(mngr.directory), str(step))
    dst = f"{src}{_MOVED_ASIDE}{int(time.time())}"
    if log_lib.is_writer():
        os.rename(src, dst)
    mngr.reload()
    return dst


# Failures of the machine or the moment, not of the checkpoint's files: moving it aside would
# lose a good checkpoint (and, with every step moved, restart the run from step 0).
_TRANSIENT_TYPES = (MemoryError, PermissionError, TimeoutError, ConnectionError, InterruptedError)
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.ENOMEM}
_TRANSIENT_TEXT = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "DEADLINE_EXCEEDED")


def is_transient(e: BaseException) -> bool:
    """Whether a restore failure is the machine's or the moment's (memory, permissions,
    interruption, timeouts), not damaged files."""
    if isinstance(e, _TRANSIENT_TYPES):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    return any(text in str(e) for text in _TRANSIENT_TEXT)


def _moved_aside(mngr: ocp.CheckpointManager) -> list[str]:
    return sorted(glob.glob(os.path.join(str(mngr.directory), f"*{_MOVED_ASIDE}*")))


def restore_latest(
    mngr: ocp.CheckpointManager, like: TrainState, eval_params: bool = False
) -> tuple[TrainState, dict, int] | None:
    """``(state, progress, step)`` of the newest checkpoint that restores, or None if none
    exists. Checkpoints that fail are moved aside (and logged) before trying older ones.
    ``eval_params``: as in ``checkpoint.restore_train_state``.

    A checkpoint that reads fine but was written with another configuration (its trees differ
    from ``like``'s) is not damaged: that stops the resume, and nothing is moved.

    Raises:
      RuntimeError: checkpoints exist but none restores, or none exists and earlier ones were
        moved aside (remove those to start from step 0), or a restore failed for a reason
        that is not the files (``is_transient``; nothing is moved: run again).
      checkpoint.CheckpointMismatchError: the newest readable checkpoint is not ``like``'s tree.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            state, progress = ckpt_lib.restore_train_state(mngr, step, like, eval_params)
            return state, progress, step
        except ckpt_lib.CheckpointMismatchError:
            raise  # the configuration changed, the files are fine: never move them aside
        except Exception as e:  # noqa: BLE001 (Orbax raises many kinds for damaged files)
            if is_transient(e):
                raise RuntimeError(
                    f"checkpoint step {step} in {mngr.directory} could not be restored now "
                    f"({type(e).__name__}); its files were left in place: run again"
                ) from e
            moved = _quarantine(mngr, step)
            log.error(
                "checkpoint step %d cannot be restored (%s: %s); moved it to %s and trying the "
                "previous one",
                step,
                type(e).__name__,
                str(e).splitlines()[0][:200] if str(e) else "",
                moved,
            )
    if steps:
        raise RuntimeError(f"none of the checkpoints {steps} in {mngr.directory} restores")
    moved = _moved_aside(mngr)
    if moved:
        raise RuntimeError(
            f"{mngr.directory} holds no checkpoint that restores, only ones moved aside as "
            f"damaged: {[os.path.basename(m) for m in moved]}; remove them (or use a new "
            "workdir) to start again from step 0"
        )
    return None


# Batches of each epoch whose inputs are hashed: enough to tell any change of data, order,
# tokenizer, augmentation or seed, without a second pass over a long (augmented) epoch.
HASHED_BATCHES = 64


HASHED_KEYS = ("input_ids", "pixel_values", "labels", "targets")  # model inputs and labels
# The log field of the hash; runs logged by sft_jax before 2026-11-28 have ``order_hash`` (a
# digest of whole batches, which a process holding part of each batch cannot recompute).
HASH_FIELD = "row_order_hash"


def _row_digests(batch: dict) -> np.ndarray:
    """[R, 8] int32: SHA-256 of each row's ``HASHED_KEYS`` entries (its bytes, key by key)."""
    keys = [k for k in HASHED_KEYS if k in batch]
    arrays = [np.ascontiguousarray(batch[k]) for k in keys]
    out = np.empty((len(arrays[0]), 32), np.uint8)
    for r in range(len(out)):
        h = hashlib.sha256()
        for a in arrays:
            h.update(a[r].tobytes())
        out[r] = np.frombuffer(h.digest(), np.uint8)
    return out.view(np.int32)


def epoch_hash(ds: Any, epoch: int, steps_per_epoch: int, rows: slice | None = None) -> str:
    """SHA-256 (16 hex digits) of the row digests (model inputs and labels, ``HASHED_KEYS``) of
    the first ``HASHED_BATCHES`` batches of ``epoch``, batch by batch, row by row.

    Args:
      ds: The training stream: of each batch, the ``rows`` this process builds.
      rows: Which rows of the global batch ``ds`` holds (``sharding.feed_rows``; None: all of
        them). With several processes this is a collective (``sharding.whole_rows``): every
        process calls it at the same step, and all get the hash of the whole batches.
    """
    start = epoch * steps_per_epoch
    ids = range(start, start + min(steps_per_epoch, HASHED_BATCHES))
    digests = np.stack([_row_digests(ds[i]) for i in ids], axis=1)  # [R, N, 8]
    whole = sharding.whole_rows(digests, rows).transpose(1, 0, 2)  # [N, B, 8]
    return hashlib.sha256(np.ascontiguousarray(whole).tobytes()).hexdigest()[:16]


def check_data_order(
    workdir: str,
    logger: log_lib.MetricsLogger,
    ds: Any,
    step: int,
    steps_per_epoch: int,
    rows: slice | None = None,
) -> None:
    """Logs the hash of the epoch that ``step`` is in (once), or checks it against the log.
    ``ds`` and ``rows`` as ``epoch_hash``'s (with several processes, every process calls it at
    the same step). An epoch logged only in the older format (``order_hash``) is not checked.

    Raises:
      DataOrderError: the epoch was logged before with another hash (the data, the tokenizer or
        the seed changed since the checkpoint).
    """
    epoch = step // steps_per_epoch
    current = epoch_hash(ds, epoch, steps_per_epoch, rows)
    logged = [
        r for r in log_lib.read_metrics(workdir) if r["split"] == "data" and r["epoch"] == epoch
    ]
    hashes = [r[HASH_FIELD] for r in logged if HASH_FIELD in r]
    if hashes and hashes[-1] != current:
        raise DataOrderError(
            f"{workdir}: epoch {epoch} batches hash to {current}, but the run before the restart "
            f"logged {hashes[-1]}: data, tokenizer or seed changed; resume would not continue "
            "the same run (use a new workdir)"
        )
    if logged and not hashes:
        log.warning(
            "epoch %d data order not checked: %s/metrics.jsonl logged it in the format of an "
            "older sft_jax (order_hash)", epoch, workdir
        )  # fmt: skip
    if not logged:
        logger.write(epoch * steps_per_epoch, "data", {"epoch": epoch, HASH_FIELD: current})
    log.info("epoch %d data order hash %s", epoch, current)
