"""Bad command-line config overrides (issue 7): an unknown key or a value of the wrong type
stops `experiments.train` before anything runs, with a message naming the key."""

import json
import subprocess
import sys

import pytest

CONFIGS = ["configs/text_cls.py", "configs/chat_sft.py"]


def _train(workdir, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", "--dry_run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(
    "override, named",
    [
        # unknown keys: ml_collections names the key (and suggests the near miss)
        ("--config.optimizer.learning_rte=1", ["learning_rte", 'Did you mean "learning_rate"']),
        ("--config.nonsense=1", ["'nonsense'"]),
        ("--config.data.nonsense.deep=1", ["'nonsense'"]),
        # wrong types: absl names the whole flag and the bad value
        ("--config.optimizer.learning_rate=abc", ["--config.optimizer.learning_rate=abc", "float"]),
        ("--config.data.max_length=1.5", ["--config.data.max_length=1.5", "int()"]),
        ("--config.train.num_steps=x", ["--config.train.num_steps=x"]),
        ("--config.checkpoint.async_save=maybe", ["--config.checkpoint.async_save=maybe"]),
    ],
)
def test_bad_override_fails_naming_the_key(tmp_path, config, override, named):
    workdir = tmp_path / "run"
    out = _train(workdir, f"--config={config}", override)
    assert out.returncode != 0, out.stdout
    for text in named:
        assert text in out.stderr, out.stderr[-2000:]
    assert not out.stdout  # the resolved config was never printed
    assert not workdir.exists()  # nothing written


@pytest.mark.parametrize("config", CONFIGS)
def test_good_override_is_accepted(tmp_path, config):
    out = _train(tmp_path / "run", f"--config={config}", "--config.optimizer.learning_rate=0.25")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["optimizer"]["learning_rate"] == 0.25


@pytest.mark.parametrize(
    "flag, named",
    [
        ("--temperature=-1", "flag --temperature=-1"),  # it was greedy, silently
        ("--max_new_tokens=0", "flag --max_new_tokens=0"),
        ("--top_k=-3", "flag --top_k=-3"),
    ],
)
def test_bad_chat_sampling_flags_are_named(flag, named):
    cmd = [sys.executable, "-m", "experiments.chat", "--model=unused", "--prompt=hi", flag]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and named in out.stderr, out.stderr[-2000:]
    assert not out.stdout
