"""metrics.jsonl reading survives a process killed in the middle of writing a row."""

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
