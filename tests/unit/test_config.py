"""The text classification config: variants, locking, overrides from the command line."""

import json
import subprocess
import sys

import pytest

from configs import text_cls


def test_variants_shrink_or_freeze():
    assert text_cls.get_config("debug").train.num_steps == 12
    assert text_cls.get_config("probe").freeze.policy == "head_only"
    full = text_cls.get_config("full")
    assert full.data.max_train_examples == 0 and full.train.num_epochs == 2
    both = text_cls.get_config("debug,probe")
    assert both.freeze.policy == "head_only" and both.train.num_steps == 12


def test_unknown_argument_and_unknown_key_are_errors():
    with pytest.raises(ValueError, match="unknown argument"):
        text_cls.get_config("fast")
    cfg = text_cls.get_config()
    with pytest.raises(AttributeError):
        cfg.optimizer.learning_rte = 1e-3  # a typo must not silently add a key
    with pytest.raises(TypeError):
        cfg.optimizer.learning_rate = "fast"  # wrong type


def _train_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", "--workdir", "unused", "--dry_run", *args],
        capture_output=True,
        text=True,
    )


def test_command_line_overrides():
    out = _train_cli(
        "--config=configs/text_cls.py:debug",
        "--config.optimizer.learning_rate=3e-5",
        "--config.data.batch_size=8",
        "--config.data.buckets=(16,32)",
    )
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert cfg["optimizer"]["learning_rate"] == 3e-5
    assert cfg["data"]["batch_size"] == 8 and cfg["data"]["buckets"] == [16, 32]
    assert cfg["train"]["num_steps"] == 12  # the :debug variant still applies


def test_command_line_unknown_key_fails_naming_it():
    out = _train_cli("--config=configs/text_cls.py", "--config.optimizer.learning_rte=1")
    assert out.returncode != 0
    assert "learning_rte" in out.stderr
