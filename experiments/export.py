"""Export a run's checkpoint as a Hugging Face directory.

  python -m experiments.export --workdir DIR --out OUT_DIR [--checkpoint best|latest|STEP]

OUT_DIR gets config.json, model.safetensors and the tokenizer files, loadable with
transformers' Auto classes and by load_pretrained: classifiers (config with id2label) as
AutoModelForSequenceClassification; causal LMs as AutoModelForCausalLM, LoRA adapters merged
into the base weights and the tokenizer saved with its chat template (also when the run
started from a GGUF file).
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
    from sft_jax.runtime import setup_runtime

    setup_runtime()
    from sft_jax import components
    from sft_jax.hf.export import export_model
    from sft_jax.lora import merge_lora
    from sft_jax.restore import restore_run

    run = restore_run(_WORKDIR.value, _CHECKPOINT.value)
    model = merge_lora(run.model)  # LoRA adapters (if any) folded into the base weights
    tokenizer, tokenizer_dir = None, run.info["model_dir"]
    if run.cfg.model.task == "causal_lm":
        from sft_jax.data.lm import load_chat_tokenizer

        tokenizer, tokenizer_dir = load_chat_tokenizer(tokenizer_dir), None
    spec = None
    if components.is_image(run.cfg):
        spec, tokenizer_dir = components.run_image_spec(run.cfg, run.info["model_dir"]), None
    out = export_model(
        model,
        _OUT.value,
        label_names=run.info["label_names"],
        tokenizer_dir=tokenizer_dir,
        tokenizer=tokenizer,
        image_spec=spec,
    )
    print(json.dumps({"exported": str(out), "checkpoint_step": run.step}))


if __name__ == "__main__":
    app.run(main)
