"""Compare our model with the transformers (PyTorch) reference on real text.

  python -m experiments.parity [--model minilm-l6] [--num_labels 3]

Prints the max abs difference (float32) of the encoder's sequence and pooled outputs, of
classifier logits (our random head copied into BertForSequenceClassification), and of the
logits after exporting our model and reloading it with AutoModelForSequenceClassification.
Needs torch (requirements-test.txt).
"""

import json
import tempfile

import numpy as np
from absl import app, flags

_MODEL = flags.DEFINE_string("model", "minilm-l6", "Short name or local HF BERT directory.")
_NUM_LABELS = flags.DEFINE_integer("num_labels", 3, "Size of the random classification head.")

SENTENCES = [
    "I just don't trust my life in google's hands #driverless cars",
    "self-driving cars just seem lazy and a waste of money",
    "Ok.",
    "Can't wait to ride in one of these, the future is here!",
]


def main(argv):
    del argv
    import jax.numpy as jnp
    import torch
    import transformers

    from sft_jax.hf.export import export_model
    from sft_jax.pretrained import load_pretrained, resolve_model_dir

    model_dir = resolve_model_dir(_MODEL.value)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    pt = {k: torch.from_numpy(v.astype(np.int64)) for k, v in enc.items()}
    ids, mask, types = (
        jnp.asarray(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")
    )
    ours = load_pretrained(model_dir, task="classification", num_labels=_NUM_LABELS.value)
    seq, pooled = ours.bert(ids, mask, types)
    ref = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(**pt)
    seq_diff = np.abs(np.asarray(seq) - out.last_hidden_state.numpy())  # [B, T, H]
    report = {
        "model_dir": str(model_dir),
        "sequence_output_real_tokens": float(seq_diff[enc["attention_mask"] == 1].max()),
        "sequence_output_all_positions": float(seq_diff.max()),
        "pooled_output": float(np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max()),
    }
    logits = np.asarray(ours(ids, mask, types))
    with tempfile.TemporaryDirectory() as tmp:
        export_model(ours, tmp, tokenizer_dir=model_dir)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            ref_logits = hf(**pt).logits.numpy()
    report["classifier_logits_after_export"] = float(np.abs(logits - ref_logits).max())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
