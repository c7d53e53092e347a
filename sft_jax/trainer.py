"""The training loop: build -> resume or load pretrained -> train / evaluate / checkpoint / log.

The trainer knows tasks and configs, not model families: the model comes from
``components.build_model`` and the loss from ``tasks``.
"""

from __future__ import annotations

import logging
import math
import os
import time

import jax
import ml_collections

from sft_jax import checkpoint as ckpt_lib
from sft_jax import (
    components,
    freezing,
    loss_scale,
    optim,
    preemption,
    runners,
    steps,
    tree_util,
)
from sft_jax import logging as log_lib
from sft_jax import resume as resume_lib
from sft_jax import sharding as sharding_lib
from sft_jax.data import feed as feed_lib
from sft_jax.evaluation import check_metric, evaluate
from sft_jax.tasks import batch_units, get_task
from sft_jax.train_state import (
    StepSetup,
    create_train_state,
    shardings_of,
    split_model,
    stats_mask,
)

log = logging.getLogger(__name__)


def track_best(progress: dict, value: float, mode: str, patience: int) -> None:
    """Updates ``progress``' early-stopping bookkeeping (``best``, ``evals_since_best``,
    ``stopped_early``) with one evaluation's metric; a NaN/Inf value never improves."""
    best = progress["best"]
    improved = math.isfinite(value) and (
        best is None or (value > best if mode == "max" else value < best)
    )
    progress["best"] = value if improved else best
    progress["evals_since_best"] = 0 if improved else progress["evals_since_best"] + 1
    progress["stopped_early"] = out_of_patience(progress, patience)


def out_of_patience(progress: dict, patience: int) -> bool:
    """Whether ``progress`` has had ``patience`` evaluations without improvement (0: never)."""
    return bool(patience and progress["evals_since_best"] >= patience)


def _is_overflow(m: dict) -> bool:
    """Whether a skipped step's metrics ``m`` show a float16 gradient overflow: a finite loss
    at a loss scale above 1, which the halved scale answers (as GradScaler's skipped steps),
    rather than a divergence."""
    return float(m.get("loss_scale", 1.0)) > 1.0 and math.isfinite(float(m["loss"]))


class NonFiniteError(FloatingPointError):
    """Too many consecutive updates skipped for a NaN/Inf loss or gradient."""


class Trainer:
    """Holds a run's pieces; ``run()`` trains to the end (or early stop) and returns the final
    validation metrics."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
        self.cfg, self.workdir = cfg, workdir
        self.task = get_task(cfg.model.task)
        self.data, tokenizer = components.load_data(cfg)
        self.label_names = components.label_names(self.data)
        self.ckpt_opts = ckpt_lib.CheckpointOptions.from_config(cfg.checkpoint)
        best = self.ckpt_opts.best_metric
        check_metric("checkpoint.best_metric", best, cfg.model.task, self.label_names)
        self.mode = cfg.mesh.get("mode", "jit")
        self.mesh = self._make_mesh()
        self.processor = tokenizer
        self.train_rows = sharding_lib.feed_rows(self.mesh, cfg.data.batch_size)
        one_epoch = self._batches("train", self.train_rows)
        self.steps_per_epoch = len(one_epoch)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"train split has {len(self.data.sources['train'])} examples, less than one "
                f"batch of data.batch_size={cfg.data.batch_size}"
            )
        self.train_ds = one_epoch.repeat()  # reshuffled every epoch; batch i is fixed
        self.feed = feed_lib.BatchFeed(self.train_ds, feed_lib.config_threads(cfg))
        self.val_ds = self._batches(
            "validation", sharding_lib.feed_rows(self.mesh, cfg.data.eval_batch_size)
        )
        self.total_steps = cfg.train.num_steps or self.steps_per_epoch * cfg.train.num_epochs
        self.eval_every = cfg.train.eval_every_steps or self.steps_per_epoch
        self._build_state(components.build_model(cfg, len(self.label_names)))
        os.makedirs(workdir, exist_ok=True)  # only once data, model and config are good
        log_lib.write_run_files(cfg, workdir, self._run_info())
        self.mngr = ckpt_lib.make_manager(os.path.join(workdir, "checkpoints"), self.ckpt_opts)
        self.logger: log_lib.MetricsLogger | None = None  # opened by _resume (_open_log)
        self._pending = None  # (step, metrics) of the last step issued, not yet read on the host

    def _make_mesh(self):
        if self.mode == "pmap" and jax.process_count() > 1:
            raise ValueError(
                f"mesh.mode=pmap runs in one process; this run has {jax.process_count()}: use "
                "mesh.mode=jit (its mesh spans every process's devices)"
            )
        # pmap replicates the state itself; its canonical copy lives on one device.
        return sharding_lib.make_mesh((1, 1, 1) if self.mode == "pmap" else self.cfg.mesh.shape)

    def _batches(self, split: str, rows: slice | None):
        """One pass of ``split``'s batches; of each batch only ``rows`` (None: all of them)."""
        train = split == "train"
        return components.batches(
            self.cfg, self.data, self.processor, split, train=train, process_rows=rows
        )

    def _build_state(self, model) -> None:
        cfg = self.cfg
        mesh = self.mesh
        _, params = split_model(model)
        stats = stats_mask(model)
        self.groups = freezing.groups_from_config(cfg.freeze, params, model, never=stats)
        self.trainable = self.groups.trainable
        freezing.configure_batch_norm(
            model, self.trainable, cfg.model.get("batch_norm", "auto"), self.groups.unfreeze_step
        )
        graphdef, _ = split_model(model)  # after configure_batch_norm: its flags are static
        self.learned = stats if stats is None else jax.tree.map(lambda m: not m, stats)
        scaled = loss_scale.needed(components.compute_dtype(cfg))
        tx, lr = optim.build_optimizer(
            cfg.optimizer, self.groups, self.total_steps, loss_scale=scaled
        )
        self.state = create_train_state(model, tx, mesh, cfg.seed)
        self.setup = StepSetup(
            graphdef=graphdef,
            tx=tx,
            trainable=self.trainable,
            lr_schedule=lr,
            mesh=mesh,
            state_shardings=shardings_of(self.state),
            batch_sharding=sharding_lib.batch_sharding(mesh),
            stats=stats,
        )
        self.runner = runners.make_runner(
            self.mode, self.setup, self.task, cfg.optimizer.accumulation_steps
        )
        self.state = self.runner.place(self.state)  # from here on: placed for the runner
        self.eval_step = steps.make_eval_step(
            graphdef, self.task, self.setup.state_shardings.params, self.setup.batch_sharding
        )

    def _run_info(self) -> dict:
        state = self.runner.canonical(self.state)
        params = state.params
        return {
            "label_names": self.label_names,
            "model_dir": str(components.model_dir(self.cfg)),
            "num_params": tree_util.count(params, self.learned),  # running statistics excluded
            "num_trainable_params": tree_util.count(params, self.trainable),
            "optimizer_state_bytes": tree_util.nbytes(state.opt_state),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "num_devices": jax.device_count(),
            "mesh_shape": dict(self.setup.mesh.shape),
        }

    def _resume(self) -> dict:
        progress = {"next_batch": 0, "best": None, "evals_since_best": 0, "stopped_early": False}
        restored = resume_lib.restore_latest(
            self.mngr, self.runner.canonical(self.state), optim.has_eval_params(self.cfg.optimizer)
        )
        if restored is None:  # a fresh start; drop rows of an attempt that saved no checkpoint
            self._open_log(kept=-1)  # its epoch-0 data row too
            return progress
        state, progress, step = restored
        self.state = self.runner.place(state)
        # Batch i of the (seeded, repeated) training stream is always the same batch, so the data
        # position is the step itself; the saved position is a consistency check.
        if progress["next_batch"] != int(state.step):
            raise RuntimeError(
                f"checkpoint {step} in {self.workdir}: data position "
                f"{progress['next_batch']} != step {int(state.step)}"
            )
        self._open_log(kept=step)
        # An early stop follows this run's patience (raised or 0: the stopped run goes on).
        patience = self.cfg.train.early_stopping_patience
        progress["stopped_early"] = out_of_patience(progress, patience)
        log.info("resumed from step %d in %s", step, self.workdir)
        return progress

    def _open_log(self, kept: int) -> None:
        """Drops the log rows (and TensorBoard events) written after step ``kept`` by an earlier
        attempt, so that a resumed run's log equals an uninterrupted one, and opens the log."""
        log_lib.truncate_after(self.workdir, kept)
        self.logger = log_lib.MetricsLogger(self.workdir, purge_step=kept + 1)

    def _averaged_params(self):
        """Schedule-Free's averaged parameters (what evaluation scores), else None."""
        if not optim.has_eval_params(self.cfg.optimizer):
            return None
        state = self.runner.canonical(self.state)
        return optim.eval_params(self.cfg.optimizer, state.opt_state, state.params)

    def _save(self, progress: dict, metrics: dict | None = None, averaged=None) -> None:
        """Checkpoints the current state; Schedule-Free's averaged parameters (``averaged``, or
        computed here) go in as the checkpoint's parameters, so that evaluation and export see
        them."""
        if averaged is None:
            averaged = self._averaged_params()
        state = self.runner.canonical(self.state)
        ckpt_lib.save(self.mngr, state, progress, metrics, eval_params=averaged)

    def evaluate(self, averaged=None) -> dict:
        """Validation metrics of the current state, at Schedule-Free's averaged point
        (``averaged``, or computed here) where the optimizer keeps one."""
        if averaged is None:
            averaged = self._averaged_params()
        params = self.runner.canonical(self.state).params if averaged is None else averaged
        limit = self.cfg.train.max_eval_batches
        val_ds = self.val_ds[:limit] if limit else self.val_ds  # read no batch past the limit
        return evaluate(
            self.cfg.model.task,
            self.eval_step,
            params,
            feed_lib.read_ahead(val_ds, self.feed.threads),
            self.setup.batch_sharding,
            label_names=self.label_names,
        )

    def _after_eval(self, step: int, metrics: dict, progress: dict, averaged=None) -> bool:
        """Logs, checkpoints with the metric, updates early stopping. True = stop."""
        self.logger.write(step, "validation", metrics)
        name = self.ckpt_opts.best_metric  # one of metric_names (checked in __init__)
        value = metrics[name]
        patience = self.cfg.train.early_stopping_patience
        track_best(progress, value, self.ckpt_opts.best_mode, patience)
        progress["next_batch"] = step
        if not math.isfinite(value):  # ranks nowhere: a checkpoint, never the best one
            log.warning("step %d: validation %s=%s; not a candidate for best", step, name, value)
        self._save(progress, {name: value} if math.isfinite(value) else None, averaged)
        shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
        log.info("step %d validation %s", step, " ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        return progress["stopped_early"]

    def _batch(self, step: int) -> dict:
        """Host batch ``step`` of the training stream (the same batch for the same step): the
        rows this process builds (``train_rows``; all of them with one process)."""
        return self.feed.get(step)

    def _log_train(self, done: int, m: dict, meter: dict) -> None:
        m = jax.device_get(m)
        dt = time.time() - meter["t0"]
        rate = f"{meter['unit']}_per_sec"
        m.update(
            {rate: meter["count"] / dt},
            steps_per_sec=(done - meter["step0"]) / dt,
            epoch=done / self.steps_per_epoch,
            num_compilations=self.runner.num_compilations(),
        )
        self.logger.write(done, "train", m)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", **{rate: f"{m[rate]:.0f}"})
        if self.bar.disable:  # no terminal: a log line instead of the bar
            log.info(
                "step %d/%d loss=%.4f lr=%.2e %.0f %s/s",
                done,
                self.total_steps,
                m["loss"],
                m["learning_rate"],
                m[rate],
                meter["unit"],
            )
        meter.update(t0=time.time(), count=0, step0=done)

    def _count_nonfinite(self, done: int, m: dict, progress: dict) -> bool:
        """Counts skipped (non-finite) updates; True when there are more in a row than allowed.
        A float16 gradient overflow (``_is_overflow``) is logged, not counted."""
        if not float(m["nonfinite"]):
            progress["skipped_in_a_row"] = 0
            return False
        if _is_overflow(m):
            log.info(
                "step %d: float16 gradient overflow at loss scale %g; update skipped, scale halved",
                done,
                float(m["loss_scale"]),
            )
            return False
        progress["skipped_in_a_row"] = progress.get("skipped_in_a_row", 0) + 1
        limit = self.cfg.train.max_skipped_steps
        log.warning(
            "step %d: non-finite loss or gradient (loss=%s); update skipped (%d in a row, "
            "limit %d)",
            done,
            float(m["loss"]),
            progress["skipped_in_a_row"],
            limit,
        )
        return progress["skipped_in_a_row"] > limit

    def _stop_nonfinite(self, done: int, progress: dict, meter: dict) -> None:
        """Saves and raises after too many non-finite updates in a row up to step ``done``.

        Runs one step late (see ``_settle``): the state saved is the current one, which may
        hold one more update (skipped or not) than step ``done``; that step's train row is
        logged, and where it is an evaluation step it is evaluated before the save, as a run
        that goes on would have (the resumed run starts after it)."""
        skipped, limit = progress["skipped_in_a_row"], self.cfg.train.max_skipped_steps
        # A run resumed after this stop (typically with a lower learning rate) starts with the
        # full allowance rather than stopping at its first non-finite update.
        progress["skipped_in_a_row"] = 0
        if self._pending is not None:  # the step the current state holds too
            last, m = self._pending
            self._pending = None
            self._log_row(last, m, meter)
        step = int(self.runner.canonical(self.state).step)
        progress["next_batch"] = step
        if self._is_eval_step(step):
            averaged = self._averaged_params()
            self._after_eval(step, self.evaluate(averaged), progress, averaged)
        else:
            self._save(progress)
        self.mngr.wait_until_finished()
        raise NonFiniteError(
            f"{skipped} non-finite updates in a row up to step {done} "
            f"(limit train.max_skipped_steps={limit}); saved the parameters at step "
            f"{step} in {self.workdir} (skipped updates leave them unchanged). Lower the "
            "learning rate or check the data."
        )

    def _is_eval_step(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total_steps

    def _log_row(self, done: int, m: dict, meter: dict) -> None:
        """Counts step ``done``'s real tokens (images) of the global batch (``units``, read on
        the host with the step's other metrics); its train row at the logging interval (and at
        the last step)."""
        meter["count"] += int(m.pop("units"))
        if done % self.cfg.train.log_every_steps == 0 or done == self.total_steps:
            self._log_train(done, m, meter)

    def _settle(self, progress: dict, meter: dict) -> None:
        """Host-side bookkeeping of the last step issued: the non-finite count and the train log
        row. ``_train_one`` settles a step after issuing the next one, so that reading the
        metrics (which waits for the step) never leaves the device idle; ``run`` calls this
        before anything that reads the state (evaluation, checkpoints) and at the end."""
        previous, self._pending = self._pending, None
        self._settle_step(previous, progress, meter)

    def _settle_step(self, pending: tuple[int, dict] | None, progress: dict, meter: dict) -> None:
        if pending is None:
            return
        done, m = pending
        stop = self._count_nonfinite(done, m, progress)
        self._log_row(done, m, meter)
        if stop:
            self._stop_nonfinite(done, progress, meter)

    def _train_one(self, step: int, progress: dict, meter: dict) -> int:
        if self.cfg.train.check_data_order and (step % self.steps_per_epoch == 0 or meter["first"]):
            self._settle(progress, meter)  # the last step's row first, as in a resumed run
            resume_lib.check_data_order(
                self.workdir, self.logger, self.train_ds, step, self.steps_per_epoch,
                self.train_rows,
            )  # fmt: skip
        meter["first"] = False
        batch = self._batch(step)
        self.state, m = self.runner(self.state, batch)
        previous, self._pending = self._pending, (step + 1, m)
        self._settle_step(previous, progress, meter)  # the previous step, while this one runs
        if meter["unit"] is None:  # what the step's ``units`` count: tokens or images
            meter["unit"] = batch_units(batch)[0]
        self.bar.update(1)
        return step + 1

    def run(self, stop_after_step: int | None = None) -> dict:
        """Trains from the latest good checkpoint (or the start) to the end.

        SIGTERM / SIGINT (``sft_jax.preemption``) end the run after the current step with a
        checkpoint; the returned dict then has ``preempted: True``.

        Args:
          stop_after_step: stop early, as if preempted, after this step (a checkpoint is saved
            there so that the next ``run`` resumes from it).
        """
        progress = self._resume()
        start = int(self.runner.canonical(self.state).step)
        if progress["stopped_early"] or start >= self.total_steps:
            log.info("run in %s is already complete at step %d", self.workdir, start)
        self.bar = log_lib.progress_bar(self.total_steps, start)
        meter = {"t0": time.time(), "count": 0, "unit": None, "step0": start, "first": True}
        try:
            last_eval, preempted = self._loop(start, progress, meter, stop_after_step)
        finally:  # also when a step raises: a checkpoint still being written is finished
            self.feed.close()
            self.bar.close()
            self.mngr.wait_until_finished()
            self.logger.close()
        if last_eval is None:  # nothing left to train: report the run's last evaluation
            rows = [r for r in log_lib.read_metrics(self.workdir) if r["split"] == "validation"]
            last_eval = (
                {k: v for k, v in rows[-1].items() if k not in ("step", "split")} if rows else {}
            )
        return {**last_eval, "preempted": True} if preempted else last_eval

    def _loop(
        self, start: int, progress: dict, meter: dict, stop_after_step: int | None
    ) -> tuple[dict | None, bool]:
        """Steps from ``start`` to the end, an early stop or a preemption; returns the last
        evaluation's metrics (None if none ran) and whether the run was preempted."""
        last_eval, preempted = None, False
        every = self.cfg.checkpoint.every_steps
        with preemption.StopRequest() as stop:
            for step in range(start, self.total_steps):
                if progress["stopped_early"]:
                    break
                done = self._train_one(step, progress, meter)
                preempted = stop.stop_after(done) or done == stop_after_step
                evaluate = self._is_eval_step(done)
                save = preempted or bool(every and done % every == 0)
                if evaluate or save:
                    self._settle(progress, meter)
                if evaluate:
                    averaged = self._averaged_params()  # computed once: scored, then saved
                    last_eval = self.evaluate(averaged)
                    meter.update(t0=time.time(), count=0, step0=done)  # throughput: training only
                    if self._after_eval(done, last_eval, progress, averaged):
                        log.info("early stopping at step %d", done)
                        break
                elif save:
                    progress["next_batch"] = done
                    self._save(progress)
                if preempted:
                    log.info("stopped after step %d; run again to resume", done)
                    break
            self._settle(progress, meter)
        return last_eval, preempted
