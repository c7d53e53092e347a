"""Evaluate a run's checkpoint (or a pretrained causal LM) on a split.

  python -m experiments.evaluate --workdir DIR [--split test] [--checkpoint best|latest|STEP]
  python -m experiments.evaluate --config configs/chat_sft.py --out before.json [--split test]

With --workdir, writes DIR/eval_<split>.json: for classifiers accuracy, macro/per-class
precision/recall/F1, confusion matrix and loss; for causal LMs loss and perplexity over
assistant tokens, exact match of greedy replies, how many replies stopped at end-of-turn, and
sample replies. With --config (causal LMs), evaluates the config's pretrained model as it is,
before any fine-tuning, and writes --out.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments.train.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluate this config's pretrained model."
)
_OUT = flags.DEFINE_string("out", None, "Output JSON with --config.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number.")


def _pretrained():
    from sft_jax import components

    cfg = _CONFIG.value
    if not components.is_lm(cfg) or not _OUT.value:
        raise app.UsageError("--config evaluates a pretrained causal LM and needs --out")
    return cfg, components.build_model(cfg), [], {}, _OUT.value


def _restored():
    from sft_jax.restore import restore_run

    run = restore_run(_WORKDIR.value, _CHECKPOINT.value)
    out = os.path.join(_WORKDIR.value, f"eval_{_SPLIT.value}.json")
    info = {"checkpoint_step": run.step, "checkpoint": _CHECKPOINT.value}
    return run.cfg, run.model, run.info["label_names"], info, out


def main(argv):
    del argv
    if (_WORKDIR.value is None) == (_CONFIG.value is None):
        raise app.UsageError("pass exactly one of --workdir and --config")
    from sft_jax.logging import setup_cli_logging

    setup_cli_logging()
    from sft_jax.runtime import setup_runtime

    setup_runtime()
    from sft_jax.eval_run import evaluate_model

    cfg, model, label_names, info, out = _restored() if _WORKDIR.value else _pretrained()
    result = evaluate_model(cfg, model, _SPLIT.value, label_names=label_names)
    result.update(split=_SPLIT.value, model=str(cfg.model.path), **info)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    skip = ("confusion_matrix", "samples")
    print(json.dumps({k: v for k, v in result.items() if k not in skip}))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
