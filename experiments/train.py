"""Train (or resume) a run.

  python -m experiments.train --config configs/text_cls.py[:ARG] --workdir DIR \
      [--config.optimizer.learning_rate=3e-5 ...]

Writes DIR/config.json, DIR/run.json, DIR/metrics.jsonl, DIR/tb/ and DIR/checkpoints/. Running
it again with the same DIR resumes from the latest checkpoint. SIGTERM / SIGINT (preemption,
Ctrl-C) save a checkpoint after the current step and exit with status 0 and "preempted": true;
a second Ctrl-C aborts at once.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; reused to resume).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved config as JSON and exit.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if _DRY_RUN.value:
        print(_CONFIG.value.to_json(indent=2))
        return
    from sft_jax.logging import setup_cli_logging

    setup_cli_logging()
    from sft_jax.runtime import setup_runtime

    setup_runtime(_CONFIG.value.get("runtime"))
    from sft_jax.trainer import Trainer  # after flag parsing: keeps --help fast

    final = dict(Trainer(_CONFIG.value, _WORKDIR.value).run())
    preempted = final.pop("preempted", False)
    summary = {k: v for k, v in final.items() if k != "confusion_matrix"}
    out = {"workdir": os.path.abspath(_WORKDIR.value), "preempted": preempted}
    print(json.dumps({**out, "validation": summary}))


if __name__ == "__main__":
    app.run(main)
