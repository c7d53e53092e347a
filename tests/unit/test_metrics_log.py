"""metrics.jsonl reading survives a process killed in the middle of writing a row; only
process 0 writes."""

import json
import os
from unittest import mock

import pytest

from sft_jax import logging as log_lib


def test_cut_off_last_row_is_dropped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "split": "tr'
    )
    assert log_lib.read_metrics(str(tmp_path)) == [{"step": 1, "split": "train", "loss": 1.0}]
    log_lib.truncate_after(str(tmp_path), 5)  # what a resume does: the damaged row is gone
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"step": 1, "split": "train", "loss": 1.0}\n'
    )


def test_damaged_row_in_the_middle_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON row"):
        log_lib.read_metrics(str(tmp_path))


def test_missing_file_reads_empty(tmp_path):
    assert log_lib.read_metrics(str(tmp_path)) == []


def test_interrupted_truncation_keeps_the_whole_log(tmp_path):
    """A resume rewrites metrics.jsonl; Ctrl-C (or a kill) in the middle of it must leave the old
    log whole, not cut at the row being written."""
    rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 101)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real, written = json.dumps, []

    def interrupted(obj, *args, **kwargs):
        written.append(obj)
        if len(written) == 30:
            raise KeyboardInterrupt
        return real(obj, *args, **kwargs)

    with mock.patch("json.dumps", interrupted), pytest.raises(KeyboardInterrupt):
        log_lib.truncate_after(str(tmp_path), 90)
    assert log_lib.read_metrics(str(tmp_path)) == rows
    log_lib.truncate_after(str(tmp_path), 90)
    assert log_lib.read_metrics(str(tmp_path)) == rows[:90]


def test_only_process_0_writes_the_run_files(tmp_path, monkeypatch):
    """In a multi-host run every process computes the rows; process 1 writes nothing (no
    second copy of a row, no two processes replacing one file)."""
    import jax
    import ml_collections

    log_lib.MetricsLogger(str(tmp_path), tensorboard=False).write(1, "train", {"loss": 1.0})
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    logger = log_lib.MetricsLogger(str(tmp_path), tensorboard=True)
    logger.write(2, "train", {"loss": 0.5})
    logger.close()
    log_lib.truncate_after(str(tmp_path), 0)
    log_lib.write_run_files(ml_collections.ConfigDict({"a": 1}), str(tmp_path), {"b": 2})
    assert log_lib.read_metrics(str(tmp_path)) == [{"step": 1, "split": "train", "loss": 1.0}]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
