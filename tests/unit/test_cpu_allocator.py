"""runtime.cpu_allocator: freed host memory stays in the process, so a step's large temporary
buffer is not faulted in from the OS again on every call."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sft_jax import cpu_allocator

# A step with one 256 MB intermediate XLA must materialize (between two dots); prints the page
# faults of each of 15 calls and what setup_runtime reported.
_PROGRAM = """
import json, os, resource, sys
from sft_jax import cpu_allocator
from sft_jax.runtime import setup_runtime
info = setup_runtime({"cpu_allocator": sys.argv[1], "compilation_cache_dir": "off"})
again = cpu_allocator.set_cpu_allocator(sys.argv[1])  # a second call reports the same
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w, v: (x @ w) @ v)
x, w, v = jnp.ones((16384, 8)), jnp.ones((8, 4096)), jnp.ones((4096, 8))
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w, v).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
env = {k: os.environ.get(k) for k in cpu_allocator.REUSE_ENV}
print(json.dumps({"info": info["cpu_allocator"], "again": again, "faults": faults, "env": env}))
"""

PAGES = 16384 * 4096 * 4 // 4096  # 4 KiB pages of the intermediate


def run(allocator: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device
    for k in cpu_allocator.REUSE_ENV:
        env.pop(k, None)
    out = subprocess.run(
        [sys.executable, "-c", _PROGRAM, allocator],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpu_allocator._glibc() is None, reason="needs glibc")
def test_reuse_keeps_the_step_buffer_and_system_faults_it_in_every_call():
    reuse, system = run("auto"), run("system")
    print(f"page faults per call: reuse {reuse['faults']}, system {system['faults']}, "
          f"intermediate {PAGES} pages")  # fmt: skip
    assert reuse["info"] == reuse["again"] == "reuse"
    assert system["info"] == system["again"] == "system"
    # The heap grows to its working size within the first calls (a few of them fault the buffer
    # in), then serves it again; glibc's default maps and unmaps it on every call.
    assert np.median(reuse["faults"]) < 0.01 * PAGES
    assert min(system["faults"][1:]) > 0.9 * PAGES
    assert reuse["env"] == cpu_allocator.REUSE_ENV  # child processes get the same settings
    assert system["env"] == {k: None for k in cpu_allocator.REUSE_ENV}


def test_after_the_backend_started_reuse_is_an_error_and_auto_leaves_it(monkeypatch):
    import jax.numpy as jnp

    jnp.ones(1).block_until_ready()  # the backend is up in this test process
    # (an in-process run of an entry point earlier in this worker may have applied reuse)
    monkeypatch.setattr(cpu_allocator, "_applied", False)
    assert cpu_allocator.set_cpu_allocator("auto") == "system"
    assert cpu_allocator.set_cpu_allocator("system") == "system"
    with pytest.raises(ValueError, match="cpu_allocator='reuse' must be set before JAX starts"):
        cpu_allocator.set_cpu_allocator("reuse")
    with pytest.raises(ValueError, match="runtime.cpu_allocator='jemalloc'"):
        cpu_allocator.set_cpu_allocator("jemalloc")


def test_auto_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not cpu_allocator._accelerator_installed()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert cpu_allocator._accelerator_installed()
