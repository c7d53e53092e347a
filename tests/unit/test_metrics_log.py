"""metrics.jsonl reading survives a process killed in the middle of writing a row."""

import json
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
