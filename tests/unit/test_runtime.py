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


_KERNELS = """
import os
from sft_jax import lm_loss
from sft_jax.models import attention, cudnn_attention, dropout
from sft_jax.runtime import setup_runtime
info = setup_runtime({"attention": "cudnn", "dropout": "hash", "cpu_matmul": "onednn",
                      "loss_chunk": 64, "packed_max_segments": 1})
import jax, jax.numpy as jnp
assert attention._IMPLEMENTATION.get() == "cudnn" and dropout._IMPLEMENTATION.get() == "hash"
assert lm_loss.loss_chunk() == 64 == info["loss_chunk"]
assert cudnn_attention.MAX_SEGMENTS.get() == 1 == info["packed_max_segments"]
x = jnp.ones((64, 64))
text = jax.jit(lambda a: a @ a).lower(x).compile().as_text()
print(info["cpu_matmul"], "onednn" in os.environ["XLA_FLAGS"], "onednn" in text)
"""


def test_kernel_choices_reach_the_layers_and_xla(tmp_path):
    env = {**os.environ, "SFT_JAX_COMPILATION_CACHE": "off"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", _KERNELS], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["onednn", "True", "True"]


def test_cpu_matmul_after_the_backend_started_is_an_error():
    import jax.numpy as jnp
    import pytest

    from sft_jax.runtime import set_cpu_matmul

    jnp.ones(1).block_until_ready()  # the backend is up in this test process
    set_cpu_matmul("xla")  # nothing to change: fine
    with pytest.raises(ValueError, match="before JAX starts a backend"):
        set_cpu_matmul("onednn")
    with pytest.raises(ValueError, match="runtime.cpu_matmul='mkl'"):
        set_cpu_matmul("mkl")


def test_kernel_choices_scope_restores_every_choice():
    from sft_jax import lm_loss
    from sft_jax.kernel_choices import Kernels
    from sft_jax.models import attention, cudnn_attention, dropout, remat

    def now():
        return (attention._IMPLEMENTATION.get(), dropout._IMPLEMENTATION.get(),
                lm_loss.loss_chunk(), cudnn_attention.MAX_SEGMENTS.get(),
                remat.REMAT.get())  # fmt: skip

    before = now()
    with Kernels("cudnn_packed", "hash", 32, 4, "full").scope():
        assert now() == ("cudnn_packed", "hash", 32, 4, "full")
    assert now() == before == ("xla", "threefry", 0, 16, "none")
    assert Kernels.from_config({"loss_chunk": 8}.get) == Kernels(loss_chunk=8)
