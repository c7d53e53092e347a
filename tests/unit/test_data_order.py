"""The data order hash: its exact value, the same from any split of the rows over processes,
and how a resumed run checks it against metrics.jsonl."""

import hashlib
import json
import logging

import numpy as np
import pytest
from jax.experimental import multihost_utils

from sft_jax import logging as log_lib
from sft_jax import resume


def batches(n: int = 3, rows: int = 4) -> list[dict]:
    """``n`` batches of ``rows`` rows: input ids [rows, 5] and labels [rows]."""
    rng = np.random.default_rng(0)
    return [
        {
            "input_ids": rng.integers(0, 100, (rows, 5)).astype(np.int32),
            "attention_mask": np.ones((rows, 5), np.int32),  # not hashed
            "labels": rng.integers(0, 3, rows).astype(np.int32),
        }
        for _ in range(n)
    ]


def part(ds: list[dict], rows: slice) -> list[dict]:
    return [{k: v[rows] for k, v in b.items()} for b in ds]


def test_hash_is_of_every_row_digest_in_order():
    ds = batches()
    row_digests = b"".join(
        hashlib.sha256(b["input_ids"][r].tobytes() + b["labels"][r].tobytes()).digest()
        for b in ds
        for r in range(4)
    )
    assert resume.epoch_hash(ds, 0, 3) == hashlib.sha256(row_digests).hexdigest()[:16]
    assert resume.epoch_hash(ds, 0, 2) != resume.epoch_hash(ds, 0, 3)  # batches 0-1 only
    swapped = [dict(b) for b in ds]
    swapped[1]["labels"] = swapped[1]["labels"][::-1].copy()
    assert resume.epoch_hash(swapped, 0, 3) != resume.epoch_hash(ds, 0, 3)


@pytest.mark.parametrize(
    "held",
    [
        [slice(0, 2), slice(2, 4)],  # two processes, half the rows each
        [slice(2, 4), slice(0, 2), slice(0, 2)],  # the tensor axis spans processes 1 and 2
    ],
)
def test_processes_holding_parts_of_each_batch_get_the_whole_batches_hash(monkeypatch, held):
    """Each process digests its rows; the gathered digests hash as one process's whole
    batches do. (The gather is faked: each process's arrays are computed here.)"""
    ds = batches()
    fake_allgather(monkeypatch, [part(ds, rows) for rows in held], held)
    got = resume.epoch_hash(part(ds, held[0]), 0, 3, rows=held[0])
    assert got == resume.epoch_hash(ds, 0, 3)


def fake_allgather(monkeypatch, streams: list[list[dict]], held: list[slice]) -> None:
    """``process_allgather`` as every process's ``whole_rows`` call would fill it: process i
    built ``streams[i]``, rows ``held[i]`` of each batch ([1 + R, N, 8]: the first row's index,
    then the row digests)."""
    sent = []
    for stream, rows in zip(streams, held, strict=True):
        digests = np.stack([resume._row_digests(b) for b in stream], axis=1)  # [R, N, 8]
        sent.append(np.concatenate([np.full_like(digests[:1], rows.start), digests]))
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack(sent))


def test_processes_holding_the_same_rows_must_agree(monkeypatch):
    """Processes 1 and 2 hold rows 2..3 (the tensor axis spans them) but built other labels
    there: named, rather than one of them trained on silently."""
    ds = batches()
    other = [dict(b, labels=(b["labels"] + 1) % 3) for b in ds]
    held = [slice(0, 2), slice(2, 4), slice(2, 4)]
    fake_allgather(monkeypatch, [part(ds, held[0]), part(ds, held[1]), part(other, held[2])], held)
    with pytest.raises(ValueError, match="process 2 holds other values for rows 2.. of the batch"):
        resume.epoch_hash(part(ds, held[0]), 0, 3, rows=held[0])


def write_rows(workdir, *rows: dict) -> None:
    with open(workdir / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_resume_checks_the_logged_hash(tmp_path):
    ds, logger = batches(), log_lib.MetricsLogger(str(tmp_path), tensorboard=False)
    resume.check_data_order(str(tmp_path), logger, ds, 0, 3)  # logs epoch 0
    (row,) = log_lib.read_metrics(str(tmp_path))
    assert row == {"step": 0, "split": "data", "epoch": 0, "row_order_hash": row["row_order_hash"]}
    resume.check_data_order(str(tmp_path), logger, ds, 2, 3)  # the same batches: no new row
    assert len(log_lib.read_metrics(str(tmp_path))) == 1
    other = [dict(b, labels=(b["labels"] + 1) % 3) for b in ds]
    with pytest.raises(resume.DataOrderError, match=f"{tmp_path}: epoch 0 batches hash to"):
        resume.check_data_order(str(tmp_path), logger, other, 1, 3)


def test_an_epoch_logged_in_the_older_format_is_not_checked(tmp_path, caplog):
    """Runs logged before ``row_order_hash`` resume: their whole-batch ``order_hash`` cannot be
    recomputed from parts of batches, so it is named in a warning and left alone."""
    write_rows(tmp_path, {"step": 0, "split": "data", "epoch": 0, "order_hash": "0123456789abcdef"})
    logger = log_lib.MetricsLogger(str(tmp_path), tensorboard=False)
    with caplog.at_level(logging.WARNING):
        resume.check_data_order(str(tmp_path), logger, batches(), 1, 3)
    assert "epoch 0 data order not checked" in caplog.text and "order_hash" in caplog.text
    assert len(log_lib.read_metrics(str(tmp_path))) == 1  # nothing added
