"""Export a run's checkpoint as a Hugging Face directory.

  python -m experiments.export --workdir DIR --out OUT_DIR [--checkpoint best|latest|STEP]

OUT_DIR gets config.json (with id2label), model.safetensors and the tokenizer files, loadable
with transformers' Auto classes (AutoModelForSequenceClassification) and by load_pretrained.
"""

import json

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments.train.")
_OUT = flags.DEFINE_string("out", None, "Output directory (created).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    from sft_jax.logging import setup_cli_logging

    setup_cli_logging()
    from sft_jax.hf.export import export_model
    from sft_jax.restore import restore_run

    run = restore_run(_WORKDIR.value, _CHECKPOINT.value)
    out = export_model(
        run.model,
        _OUT.value,
        label_names=run.info["label_names"],
        tokenizer_dir=run.info["model_dir"],
    )
    print(json.dumps({"exported": str(out), "checkpoint_step": run.step}))


if __name__ == "__main__":
    app.run(main)
