"""Test setup: 8 fake CPU devices for sharding tests, offline hub, quiet TF logs, and one
persistent XLA compilation cache for the whole run (every test process and the experiment
scripts the tests start), so that a step compiled again (a resumed run, a second trainer on the
same config) is read back instead of recompiled."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_CACHE_ENV = "SFT_JAX_COMPILATION_CACHE"  # read by sft_jax.runtime in experiment scripts
_created_cache = None


def pytest_configure(config):
    """The first pytest process (the xdist controller, or a lone process) makes a fresh cache
    directory; the xdist workers it starts inherit it through the environment. Set
    SFT_JAX_COMPILATION_CACHE to reuse a directory across runs, or to "off"."""
    global _created_cache
    if _CACHE_ENV not in os.environ:
        _created_cache = tempfile.mkdtemp(prefix="sft_jax_test_xla_cache_")
        os.environ[_CACHE_ENV] = _created_cache
    from sft_jax.runtime import compilation_cache_dir

    cache = compilation_cache_dir()
    if cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if _created_cache is not None:
        shutil.rmtree(_created_cache, ignore_errors=True)
