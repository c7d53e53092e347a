"""Process setup: the persistent compilation cache is written, reused, and can be turned off."""

import os
import subprocess
import sys

from sft_jax.runtime import compilation_cache_dir

_PROGRAM = """
from sft_jax.runtime import setup_runtime
info = setup_runtime()
import jax, jax.numpy as jnp
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((16, 16))).block_until_ready()
print(info["compilation_cache_dir"])
"""


def run(env_value):
    env = {**os.environ, "SFT_JAX_COMPILATION_CACHE": env_value}
    env.pop("XLA_FLAGS", None)  # one device is enough
    out = subprocess.run(
        [sys.executable, "-c", _PROGRAM], capture_output=True, text=True, check=True, env=env
    )
    return out.stdout.strip().splitlines()[-1]


def test_cache_is_written_then_reused(tmp_path):
    cache = tmp_path / "xla"
    assert run(str(cache)) == str(cache)
    first = sorted(p.name for p in cache.iterdir())
    assert first  # the compiled executable was stored
    run(str(cache))
    assert sorted(p.name for p in cache.iterdir()) == first  # a hit: nothing new written


def test_cache_can_be_disabled(tmp_path, monkeypatch):
    assert run("off") == "None"
    monkeypatch.setenv("SFT_JAX_COMPILATION_CACHE", "")
    assert compilation_cache_dir() is None
    assert compilation_cache_dir(str(tmp_path)) == str(tmp_path)
    monkeypatch.delenv("SFT_JAX_COMPILATION_CACHE")
    assert compilation_cache_dir().endswith(".cache/sft_jax/xla")
