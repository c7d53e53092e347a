"""Restoring and resuming: a checkpoint written under another configuration is an error that
moves nothing, a damaged one is moved aside, retention always keeps the newest step."""

import os

import jax
import numpy as np
import pytest

from sft_jax import checkpoint as ckpt
from sft_jax import resume
from sft_jax.train_state import abstract_of
from tests.unit.test_steps import build, run


def saved_run(directory, policy="full", steps=2, **opt):
    """Checkpoints of steps 1..steps of a toy run; returns the last state."""
    opts = ckpt.CheckpointOptions(keep_latest=steps, keep_best=0, async_save=False)
    state, setup, step_fn = build(policy=policy, **opt)
    mngr = ckpt.make_manager(str(directory), opts)
    for step in range(1, steps + 1):
        state, _ = run(state, setup, step_fn, n=1)
        ckpt.save(mngr, state, {"next_batch": step})
    mngr.wait_until_finished()
    return state, opts


def test_resume_under_another_optimizer_moves_nothing_and_names_the_keys(tmp_path):
    _, opts = saved_run(tmp_path)  # AdamW
    like, _, _ = build(name="sgd")  # the same model, another optimizer state
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"optimizer\.\*, freeze\.\*"):
        resume.restore_latest(ckpt.make_manager(str(tmp_path), opts), like)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # valid checkpoints are not "corrupt"


def test_restore_into_a_state_with_more_optimizer_state_is_a_mismatch(tmp_path):
    # Orbax alone returns the checkpoint's smaller (head_only) optimizer state for a full-policy
    # target, and the train step then fails far from the cause.
    _, opts = saved_run(tmp_path, policy="head_only")
    like, _, _ = build(policy="full")
    mngr = ckpt.make_manager(str(tmp_path), opts)
    with pytest.raises(ckpt.CheckpointMismatchError, match="missing 6"):
        ckpt.restore_train_state(mngr, 2, like)
    with pytest.raises(ckpt.CheckpointMismatchError):
        resume.restore_latest(mngr, like)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_restores(tmp_path):
    state, opts = saved_run(tmp_path, steps=2)
    # Array data of step 2 truncated; its metadata still reads (the layout check passes).
    for root, _, files in os.walk(tmp_path / "2" / "train"):
        for name in files:
            if name != "_METADATA":
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)
    like, _, _ = build()
    restored, progress, step = resume.restore_latest(ckpt.make_manager(str(tmp_path), opts), like)
    assert (step, progress, int(restored.step)) == (1, {"next_batch": 1}, 1)
    assert any(name.startswith("2.corrupt-") for name in os.listdir(tmp_path))
    assert jax.tree.structure(restored) == jax.tree.structure(like)
    assert not np.array_equal(restored.params["dense"]["kernel"], state.params["dense"]["kernel"])


def test_a_damaged_progress_item_is_named_and_resume_moves_it_aside(tmp_path):
    """Step 2's progress JSON cut short: a params-only restore (evaluation, export) names the
    file and the kept steps instead of a bare JSON error; resume moves step 2 aside and goes on
    from step 1."""
    saved_run(tmp_path, steps=2)
    (tmp_path / "2" / "progress" / "metadata").write_text('{"next_batch": ')
    opts = ckpt.CheckpointOptions(keep_latest=2, keep_best=0, async_save=False)
    like, _, _ = build()
    mngr = ckpt.make_manager(str(tmp_path), opts)
    with pytest.raises(
        ckpt.CheckpointDamagedError,
        match=rf"step 2: its progress item {tmp_path}/2/progress does not parse "
        r"\(JSONDecodeError: .*\); the checkpoint is damaged: use another step \(kept: \[1, 2\]\)",
    ):
        ckpt.restore_params(mngr, 2, abstract_of(like.params))
    _, progress, step = resume.restore_latest(mngr, like)
    assert (step, progress) == (1, {"next_batch": 1})
    assert any(name.startswith("2.corrupt-") for name in os.listdir(tmp_path))


def test_a_restore_that_fails_for_the_machine_moves_nothing(tmp_path, monkeypatch):
    """Out of device memory while restoring says nothing about the files: the error names the
    step, every checkpoint stays where it is, and the next attempt restores the newest."""
    saved_run(tmp_path, steps=2)
    opts = ckpt.CheckpointOptions(keep_latest=2, keep_best=0, async_save=False)
    like, _, _ = build()
    real = ckpt.restore_train_state

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4 bytes")

    monkeypatch.setattr(ckpt, "restore_train_state", out_of_memory)
    with pytest.raises(RuntimeError, match="checkpoint step 2 .* could not be restored now"):
        resume.restore_latest(ckpt.make_manager(str(tmp_path), opts), like)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    monkeypatch.setattr(ckpt, "restore_train_state", real)
    _, progress, step = resume.restore_latest(ckpt.make_manager(str(tmp_path), opts), like)
    assert (step, progress) == (2, {"next_batch": 2})


@pytest.mark.parametrize(
    "error, transient",
    [
        (MemoryError(), True),
        (PermissionError(13, "denied"), True),
        (OSError(28, "No space left on device"), True),
        (ValueError("RESOURCE_EXHAUSTED: out of memory"), True),
        (ValueError("Failed to decode the array"), False),
        (OSError(5, "Input/output error"), False),
        (KeyError("params"), False),
    ],
)
def test_which_restore_failures_are_transient(error, transient):
    assert resume.is_transient(error) == transient


def test_no_checkpoint_left_but_moved_aside_ones_is_an_error_not_a_fresh_start(tmp_path):
    """Every checkpoint damaged: the first resume moves them aside and fails; a second one must
    not start over from step 0 silently (the moved checkpoints name the way out)."""
    saved_run(tmp_path, steps=1)
    for root, _, files in os.walk(tmp_path / "1" / "train"):
        for name in files:
            if name != "_METADATA":
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)
    opts = ckpt.CheckpointOptions(keep_latest=1, keep_best=0, async_save=False)
    like, _, _ = build()
    with pytest.raises(RuntimeError, match=r"none of the checkpoints \[1\]"):
        resume.restore_latest(ckpt.make_manager(str(tmp_path), opts), like)
    with pytest.raises(RuntimeError, match=r"only ones moved aside as damaged: \['1.corrupt-"):
        resume.restore_latest(ckpt.make_manager(str(tmp_path), opts), like)
    assert resume.restore_latest(ckpt.make_manager(str(tmp_path / "new"), opts), like) is None


@pytest.mark.parametrize("keep_latest, keep_best", [(0, 2), (0, 0), (1, -1)])
def test_retention_that_would_drop_the_newest_checkpoint_is_an_error(
    tmp_path, keep_latest, keep_best
):
    # Orbax's LatestN(0) keeps no recent step: a preemption checkpoint (no metric) would be
    # deleted as soon as written and the run would resume from an older step.
    opts = ckpt.CheckpointOptions(keep_latest=keep_latest, keep_best=keep_best, async_save=False)
    with pytest.raises(ValueError, match="checkpoint.keep_latest"):
        ckpt.make_manager(str(tmp_path), opts)
