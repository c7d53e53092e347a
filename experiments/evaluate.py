"""Evaluate a run's checkpoint on a split.

  python -m experiments.evaluate --workdir DIR [--split test] [--checkpoint best|latest|STEP]

Writes DIR/eval_<split>.json (accuracy, macro/per-class precision/recall/F1, confusion matrix,
loss, and which checkpoint step was used).
"""

import json
import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments.train.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from sft_jax.logging import setup_cli_logging

    setup_cli_logging()
    from flax import nnx

    from sft_jax import components, steps
    from sft_jax import sharding as sharding_lib
    from sft_jax.evaluation import evaluate_classification
    from sft_jax.restore import restore_run
    from sft_jax.tasks import get_task
    from sft_jax.train_state import shardings_of

    run = restore_run(_WORKDIR.value, _CHECKPOINT.value)
    data, tokenizer = components.load_data(run.cfg)
    ds = components.batches(run.cfg, data, tokenizer, _SPLIT.value, train=False)
    graphdef, params = nnx.split(run.model, nnx.Param)
    params = nnx.to_pure_dict(params)
    batch_sh = sharding_lib.batch_sharding(run.mesh)
    eval_step = steps.make_eval_step(
        graphdef, get_task(run.cfg.model.task), shardings_of(params), batch_sh
    )
    result = evaluate_classification(eval_step, params, ds, run.info["label_names"], batch_sh)
    result.update(split=_SPLIT.value, checkpoint_step=run.step, checkpoint=_CHECKPOINT.value)
    out = os.path.join(_WORKDIR.value, f"eval_{_SPLIT.value}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "confusion_matrix"}))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
