"""Orbax checkpoints: latest-N plus best-k by a validation metric, resumable progress.

Each checkpoint step holds three items:
  ``params``    the model parameters (pure dict), restorable alone for evaluation/export;
                for Schedule-Free the averaged point that evaluation uses;
  ``train``     step, optimizer state and RNG (only training needs them); for Schedule-Free
                also ``params``, the trained (interpolated) point training resumes from;
  ``progress``  JSON: the next data batch index, epoch, early-stopping bookkeeping, and the
                parameter layout version (``LAYOUT_VERSION``).
Writes are atomic (Orbax finalizes a temporary directory by rename), optionally asynchronous.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from sft_jax import tree_util
from sft_jax.train_state import TrainState, abstract_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CheckpointOptions:
    keep_latest: int = 1
    keep_best: int = 2
    best_metric: str = "macro_f1"
    best_mode: str = "max"  # "max" or "min"
    async_save: bool = True

    @classmethod
    def from_config(cls, c: Any, **overrides: Any) -> "CheckpointOptions":
        """From a config's ``checkpoint`` block (keys named as the fields)."""
        fields = {f.name: c[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**fields, **overrides})


def make_manager(directory: str, opts: CheckpointOptions) -> ocp.CheckpointManager:
    """A manager that keeps the ``keep_latest`` newest and the ``keep_best`` best steps.

    ``keep_latest`` must be >= 1: Orbax's ``LatestN(0)`` keeps no recent step, so a checkpoint
    saved without a metric (preemption, ``every_steps``, the non-finite stop) would be deleted
    as soon as it is written and the run would resume from an older step, or from scratch.
    """
    if opts.best_mode not in ("max", "min"):
        raise ValueError(f"checkpoint.best_mode={opts.best_mode!r}; use 'max' or 'min'")
    if opts.keep_latest < 1 or opts.keep_best < 0:
        raise ValueError(
            f"checkpoint.keep_latest={opts.keep_latest}, checkpoint.keep_best={opts.keep_best}: "
            "keep_latest must be >= 1 (the newest checkpoint is what a run resumes from) and "
            "keep_best >= 0"
        )
    keep = [policies.LatestN(n=opts.keep_latest)]
    if opts.keep_best > 0:
        keep.append(
            policies.BestN(
                get_metric_fn=lambda m: m[opts.best_metric],
                reverse=opts.best_mode == "min",
                n=opts.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    # best_fn also makes Orbax write each step's metrics (which BestN and best_step read).
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m[opts.best_metric],
        best_mode=opts.best_mode,
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=opts.async_save,
        create=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=("params", "train", "progress")
    )


# Parameter layouts that changed meaning without changing paths or shapes (which ``check_layout``
# would catch): (version, what changed, regex of the parameter paths it affects). A checkpoint of
# an older version (no ``layout_version`` in its progress item: 1) that holds such a parameter
# is refused rather than restored into a model that reads it differently.
LAYOUT_VERSION = 2
_LAYOUT_CHANGES = (
    (2, "GPT-2's fused attn/c_attn columns are stored head by head since commit 2bae52d",
     r"(^|/)attn/c_attn/"),
)  # fmt: skip
_VERSION_KEY = "layout_version"


def save(
    mngr: ocp.CheckpointManager,
    state: TrainState,
    progress: dict,
    metrics: dict | None = None,
    eval_params: Any | None = None,
) -> None:
    """Saves ``state`` at ``state.step`` (``metrics`` ranks it for best-k).

    ``eval_params``: the parameters evaluation and export should use when they are not the
    trained ones (``optimizers.eval_params``: Schedule-Free's average); they become the
    ``params`` item and ``state.params`` go into ``train``.
    """
    step = int(state.step)
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    params = state.params
    if eval_params is not None:
        train["params"], params = state.params, eval_params
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train=ocp.args.StandardSave(train),
            progress=ocp.args.JsonSave({**progress, _VERSION_KEY: LAYOUT_VERSION}),
        ),
        metrics=metrics,
        force=True,
    )


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose tree (leaf paths or shapes) is not this run's: the
    configuration changed since it was written (optimizer, freezing policy, LoRA, model), not the
    files. Resuming must not treat it as corrupt."""


class CheckpointDamagedError(RuntimeError):
    """A checkpoint item whose files exist but do not parse (a cut or overwritten file)."""


# How many differing paths of each kind a mismatch error lists.
_SHOWN = 5


def _shapes(tree: Any) -> dict[str, tuple | None]:
    """``{"a/b/kernel": shape}`` of every leaf (arrays, ShapeDtypeStructs or Orbax metadata)."""
    flat = tree_util.flatten_to_dict(tree)
    return {
        p: None if getattr(x, "shape", None) is None else tuple(x.shape) for p, x in flat.items()
    }


def check_layout(mngr: ocp.CheckpointManager, step: int, item: str, target: Any) -> None:
    """Compares item ``item`` of checkpoint ``step`` with ``target`` by their leaf paths and
    shapes, reading only the item's metadata (an unreadable one raises Orbax's error).

    Orbax restores some mismatched trees without complaint (a ``head_only`` checkpoint into a
    ``full`` state comes back with the checkpoint's smaller optimizer state, and the step then
    fails on it) and fails on others with errors that look like damaged files.

    Raises:
      CheckpointMismatchError: naming the missing, unexpected and reshaped paths.
    """
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(mngr.directory) / str(step) / item)
    saved, wanted = _shapes(getattr(saved, "tree", saved)), _shapes(target)
    missing = sorted(wanted.keys() - saved.keys())
    unexpected = sorted(saved.keys() - wanted.keys())
    reshaped = [
        f"{p} {saved[p]} (checkpoint) vs {wanted[p]} (this run)"
        for p in sorted(saved.keys() & wanted.keys())
        if None not in (saved[p], wanted[p]) and saved[p] != wanted[p]
    ]
    if not (missing or unexpected or reshaped):
        return
    parts = [
        f"{name} {len(paths)}: {paths[:_SHOWN]}"
        for name, paths in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("reshaped", reshaped),
        )
        if paths
    ]
    raise CheckpointMismatchError(
        f"checkpoint step {step} in {mngr.directory}: its {item!r} tree is not this run's ("
        + "; ".join(parts)
        + "). It was written with another configuration (optimizer.*, freeze.*, lora.* or "
        "model.*): rerun with that configuration, or use a new workdir."
    )


def check_layout_version(mngr: ocp.CheckpointManager, step: int, saved: int, target: Any) -> None:
    """Raises CheckpointMismatchError when checkpoint ``step``, of layout version ``saved``,
    predates a layout change (``_LAYOUT_CHANGES``) of a parameter in ``target`` (the params
    tree), or comes from newer code (a layout this code does not know)."""
    if saved > LAYOUT_VERSION:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {mngr.directory} has parameter layout version {saved}; "
            f"this code reads versions up to {LAYOUT_VERSION}: update the code"
        )
    paths = list(tree_util.flatten_to_dict(target))
    for version, what, pattern in _LAYOUT_CHANGES:
        hit = next((p for p in paths if re.search(pattern, p)), None)
        if saved < version and hit is not None:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {mngr.directory} has parameter layout version "
                f"{saved}, before version {version}: {what} (e.g. {hit}), so it would restore "
                "into a model that reads it differently. Export it with the code that wrote it "
                "(a Hugging Face directory loads in any version), or train again."
            )


def restore_train_state(
    mngr: ocp.CheckpointManager, step: int, like: TrainState, eval_params: bool = False
) -> tuple[TrainState, dict]:
    """Restores the full state onto ``like``'s shapes and shardings (no extra allocation).
    ``eval_params``: the checkpoint was saved with them (the trained parameters are in
    ``train``), as ``save(..., eval_params=...)`` does.

    Raises:
      CheckpointMismatchError: the checkpoint's trees differ from ``like``'s (``check_layout``).
    """
    target = abstract_of(like)
    train_target = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
    items = {"train": ocp.args.StandardRestore(train_target)}
    if eval_params:
        train_target["params"] = target.params
    else:
        items["params"] = ocp.args.StandardRestore(target.params)
        check_layout(mngr, step, "params", target.params)
    check_layout(mngr, step, "train", train_target)
    progress, version = _restore_progress(mngr, step)
    check_layout_version(mngr, step, version, target.params)
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    train = out["train"]
    params = train["params"] if eval_params else out["params"]
    state = TrainState(step=train["step"], params=params, opt_state=train["opt_state"],
                       rng=train["rng"])  # fmt: skip
    return state, progress


def _restore_progress(mngr: ocp.CheckpointManager, step: int) -> tuple[dict, int]:
    """The ``progress`` item of ``step`` as the trainer wrote it, and its parameter layout
    version (1 where it has none: written before versions existed)."""
    try:
        out = mngr.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
        progress = dict(out["progress"])
        return progress, int(progress.pop(_VERSION_KEY, 1))
    except (ValueError, TypeError) as e:  # no JSON, not an object, or no int version (an
        # OSError is left alone: resume tells a machine's failures from damaged files)
        raise _damaged(mngr, step, e) from e


def _damaged(mngr: ocp.CheckpointManager, step: int, e: Exception) -> CheckpointDamagedError:
    where = os.path.join(str(mngr.directory), str(step), "progress")
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return CheckpointDamagedError(
        f"checkpoint step {step}: its progress item {where} does not parse "
        f"({type(e).__name__}: {first}); the checkpoint is damaged: use another step "
        f"(kept: {sorted(mngr.all_steps())})"
    )


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
    """Restores only the parameters (evaluation / export need nothing else).

    Raises:
      CheckpointMismatchError: the checkpoint's parameters differ from ``abstract_params``.
    """
    check_layout(mngr, step, "params", abstract_params)
    check_layout_version(mngr, step, _restore_progress(mngr, step)[1], abstract_params)
    out = mngr.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
    )
    return out["params"]


def best_step(mngr: ocp.CheckpointManager, opts: CheckpointOptions) -> int | None:
    """The kept step with the best ``opts.best_metric`` (None if no step has metrics)."""
    scored = []
    for step in mngr.all_steps():
        metrics = mngr.metrics(step)
        if metrics and opts.best_metric in metrics:
            scored.append((metrics[opts.best_metric], step))
    if not scored:
        return None
    sign = 1.0 if opts.best_mode == "max" else -1.0
    # Ties go to the latest step, as Orbax's BestN keeps the latest of equal scores.
    return max(scored, key=lambda vs: (sign * vs[0], vs[1]))[1]


def resolve_step(mngr: ocp.CheckpointManager, which: str, opts: CheckpointOptions) -> int:
    """``best`` | ``latest`` | a step number -> an existing step, with a clear error."""
    steps = list(mngr.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {mngr.directory}")
    if which == "latest":
        return max(steps)
    if which == "best":
        step = best_step(mngr, opts)
        if step is None:
            log.warning("no checkpoint carries metric %r; using the latest", opts.best_metric)
            return max(steps)
        return step
    if not which.isdigit() or int(which) not in steps:
        raise ValueError(
            f"--checkpoint={which!r}: use best, latest or one of the kept steps {steps}"
        )
    return int(which)
