"""Two JAX processes (2 CPU devices each, gloo collectives) train and evaluate like one process
with 4: the bare step, and the whole trainer (preempted, resumed, logged, checkpointed)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from sft_jax import logging as log_lib

pytestmark = pytest.mark.slow

# Three steps of the benchmark's tiny BERT train step, data parallel over every device; each
# process feeds the rows of the global batch its devices hold (sharding.local_rows, put_batch).
# Then the trainer's evaluation of a batch (each process feeds its rows; the per-example
# predictions, labels and masks are read whole on every process).
_WORKER = """
import json
from sft_jax.runtime import setup_runtime
info = setup_runtime({"distributed": %(distributed)s})
import jax
import numpy as np
from sft_jax import benchmark, benchmark_shapes, evaluation, sharding, steps, tasks
from sft_jax.train_state import shardings_of, split_model
spec = benchmark_shapes.get_spec("tiny-bert", batch_size=8)
state, step_fn, batch, mesh, _ = benchmark.build_step(spec, mesh_shape=(-1, 1, 1))
losses = []
for _ in range(3):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
kernel = state.params["classifier"]["kernel"]
graphdef, _ = split_model(benchmark_shapes.build_model(spec))
batch_sh = sharding.batch_sharding(mesh)
eval_step = steps.make_eval_step(
    graphdef, tasks.get_task("classification"), shardings_of(state.params), batch_sh)
mine = sharding.local_rows(benchmark_shapes.make_batch(spec, seed=1), batch_sh)
scores = evaluation.evaluate_classification(eval_step, state.params, [mine], ["a", "b", "c"],
                                            batch_sh)
print("RESULT " + json.dumps({
    "process": info["process"], "processes": info["num_processes"],
    "devices": jax.device_count(), "local": jax.local_device_count(), "losses": losses,
    "kernel_sum": float(np.asarray(jax.experimental.multihost_utils.process_allgather(
        kernel, tiled=True)).sum()),
    "eval": [scores["loss"], scores["accuracy"], scores["confusion_matrix"]],
}))
"""


def _spawn(devices: int, distributed: bool, **env: str) -> subprocess.Popen:
    env = {**os.environ, "SFT_JAX_COMPILATION_CACHE": "off", **env}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    program = _WORKER % {"distributed": distributed}
    return subprocess.Popen(
        [sys.executable, "-c", program], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_devices():
    address = f"localhost:{_free_port()}"
    workers = [
        _spawn(
            2, True, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
        )  # fmt: skip
        for i in range(2)
    ]
    reference = _spawn(4, False)  # one process, the same 4 devices
    results = [_result(p) for p in workers]
    single = _result(reference)
    assert [(r["process"], r["processes"], r["devices"], r["local"]) for r in results] == [
        (0, 2, 4, 2),
        (1, 2, 4, 2),
    ]
    assert (single["processes"], single["devices"]) == (1, 4)
    for r in results:
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-6)
        np.testing.assert_allclose(r["kernel_sum"], single["kernel_sum"], rtol=1e-6)
        np.testing.assert_allclose(r["eval"][0], single["eval"][0], rtol=1e-6)
        assert r["eval"][1:] == single["eval"][1:]  # accuracy, confusion matrix
    assert single["losses"][0] != single["losses"][-1]  # the steps did train


# The trainer on the tiny text-classification setup (tests/tiny_text.py): argv = root, model
# directory, files (JSON), workdir, stop_after_step (0: none), steps (evaluations at half and
# at the end), seconds of pause before each step.
_TRAINER = """
import json, pathlib, sys
from sft_jax.runtime import setup_runtime
setup_runtime({"distributed": %(distributed)s, "compilation_cache_dir": "off"})
import jax
from tests.tiny_text import make_config
from sft_jax.trainer import Trainer
root, model_dir, files, workdir, stop, steps, pause = sys.argv[1:8]


class Paced(Trainer):  # a step at least `pause` seconds long, so that a signal lands mid-run
    def _batch(self, step):
        time.sleep(float(pause))
        batch = super()._batch(step)
        # The rows this process built: its share of the batch, nothing more.
        seen = pathlib.Path(workdir, f"rows_of_process_{jax.process_index()}")
        seen.write_text(str(len(batch["labels"])))
        return batch


import time
cfg = make_config(pathlib.Path(root), pathlib.Path(model_dir), json.loads(files),
                  num_steps=int(steps), eval_every_steps=int(steps) // 2)
print("RESULT " + json.dumps(Paced(cfg, workdir).run(stop_after_step=int(stop) or None)))
"""


def _trainers(n: int, args: list[str], devices: int) -> list[subprocess.Popen]:
    """``n`` trainer processes (one: not distributed) of ``devices`` CPU devices each."""
    address = f"localhost:{_free_port()}"
    procs = []
    for i in range(n):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        if n > 1:
            env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(n),
                       JAX_PROCESS_ID=str(i))  # fmt: skip
        program = _TRAINER % {"distributed": n > 1}
        cmd = [sys.executable, "-c", program, *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    return procs


def rows(workdir) -> list[dict]:
    """metrics.jsonl without the fields that time the run (or count its compilations)."""

    timing = ("steps_per_sec", "tokens_per_sec", "num_compilations")
    return [{k: v for k, v in r.items() if k not in timing}
            for r in log_lib.read_metrics(str(workdir))]  # fmt: skip


def test_a_signal_to_one_process_stops_both_and_the_resumed_pair_trains_like_one_process(
    tmp_path,
):
    """The whole trainer on 2 processes x 2 devices, SIGTERM to process 1 alone (not the one
    writing the log): both stop after the step they agreed on, with one checkpoint; resumed,
    the pair ends as one process with 4 devices does: the same final evaluation, metrics.jsonl
    row for row (one copy of each, written by process 0) and checkpoint directories."""
    from tests.tiny_text import make_tiny_setup

    root, model_dir, files = make_tiny_setup(tmp_path)
    setup = [str(root), str(model_dir), json.dumps(files)]
    (one,) = _trainers(1, [*setup, str(tmp_path / "one"), "0", "24", "0"], 4)
    single = _result(one)  # (also builds the data files both runs read)
    workdir = tmp_path / "two"
    procs = _trainers(2, [*setup, str(workdir), "0", "24", "0.15"], devices=2)
    deadline = time.time() + 240
    while not [r for r in log_lib.read_metrics(str(workdir)) if r["split"] == "train"]:
        assert time.time() < deadline and procs[0].poll() is None, "no training step logged"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    stopped = [_result(p) for p in procs]
    assert all(r["preempted"] for r in stopped)
    (step,) = (int(s) for s in os.listdir(workdir / "checkpoints"))
    assert step < 24 and max(r["step"] for r in log_lib.read_metrics(str(workdir))) == step
    resumed = [_result(p) for p in _trainers(2, [*setup, str(workdir), "0", "24", "0"], 2)]
    assert resumed[0] == resumed[1] == single
    # Each of the two processes built 4 rows of every 8-row batch; one process, all 8.
    assert [(workdir / f"rows_of_process_{i}").read_text() for i in (0, 1)] == ["4", "4"]
    assert (tmp_path / "one" / "rows_of_process_0").read_text() == "8"
    assert sorted(os.listdir(workdir / "checkpoints")) == sorted(
        os.listdir(tmp_path / "one" / "checkpoints")
    )

    two, one = rows(workdir), rows(tmp_path / "one")
    assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
    assert [r["split"] for r in one].count("validation") == 2  # at steps 12 and 24
    for a, b in zip(two, one):  # the step after the restore may sum in another order
        assert a.keys() == b.keys()
        for k in a:
            close = isinstance(a[k], float) and a[k] == pytest.approx(b[k], rel=1e-5)
            assert close or a[k] == b[k], (k, a, b)
