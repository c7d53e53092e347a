"""Export any supported model to a Hugging Face directory (dispatch on the model's class)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from flax import nnx


def export_model(
    model: nnx.Module,
    out_dir: str | Path,
    *,
    label_names: Sequence[str] | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Writes ``config.json``, ``model.safetensors`` and tokenizer files for ``model``.

    Raises:
      TypeError: the model's family has no exporter yet.
    """
    from sft_jax.hf.bert import export_bert_classifier
    from sft_jax.models.bert import BertForSequenceClassification

    exporters: dict[type, Any] = {BertForSequenceClassification: export_bert_classifier}
    exporter = exporters.get(type(model))
    if exporter is None:
        raise TypeError(
            f"no Hugging Face exporter for {type(model).__name__}; "
            f"supported: {[t.__name__ for t in exporters]}"
        )
    return exporter(model, out_dir, label_names=label_names, tokenizer_dir=tokenizer_dir)
