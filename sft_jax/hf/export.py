"""Export any supported model to a Hugging Face directory (dispatch on the model's class)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from flax import nnx


def _exporters() -> dict[type, Callable[..., Path]]:
    """Model class -> exporter(model, out_dir, *, label_names, tokenizer_dir, tokenizer)."""
    from sft_jax.hf.bert import export_bert_classifier
    from sft_jax.hf.gpt2 import export_gpt2
    from sft_jax.hf.llama import export_llama
    from sft_jax.models.bert import BertForSequenceClassification
    from sft_jax.models.gpt2 import GPT2LMHeadModel
    from sft_jax.models.llama import LlamaForCausalLM

    def classifier(model, out_dir, *, label_names, tokenizer_dir, tokenizer, **_):
        out = export_bert_classifier(
            model, out_dir, label_names=label_names, tokenizer_dir=tokenizer_dir
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        return out

    def causal_lm(export: Callable[..., Path]) -> Callable[..., Path]:
        def run(model, out_dir, *, label_names, tokenizer_dir, tokenizer, **_):
            del label_names  # language models have no labels
            out = export(model, out_dir, tokenizer_dir=tokenizer_dir, tokenizer=tokenizer)
            if tokenizer is not None:
                add_stop_ids(out, tokenizer)
            return out

        return run

    return {
        BertForSequenceClassification: classifier,
        LlamaForCausalLM: causal_lm(export_llama),
        GPT2LMHeadModel: causal_lm(export_gpt2),
        **_image_exporters(),
    }


def _image_exporters() -> dict[type, Callable[..., Path]]:
    """ResNet / ViT -> Hugging Face directories; EfficientNet-Lite -> the reference's state-dict
    names in safetensors (see ``sft_jax.hf.efficientnet``); each with the labels and, given an
    ``image_spec``, the preprocessor config of the run's evaluation view."""
    from sft_jax.hf.efficientnet import export_efficientnet
    from sft_jax.hf.resnet import export_resnet
    from sft_jax.hf.vit import export_vit
    from sft_jax.models.efficientnet import EfficientNetForImageClassification
    from sft_jax.models.resnet import ResNetForImageClassification
    from sft_jax.models.vit import ViTForImageClassification

    def hf(export: Callable[..., Path]) -> Callable[..., Path]:
        def run(model, out_dir, *, label_names, image_spec, **_):
            return export(model, out_dir, label_names=label_names, image_spec=image_spec)

        return run

    return {
        ResNetForImageClassification: hf(export_resnet),
        ViTForImageClassification: hf(export_vit),
        EfficientNetForImageClassification: hf(export_efficientnet),
    }


def add_stop_ids(out_dir: str | Path, tokenizer: Any) -> None:
    """Adds the tokenizer's end-of-turn ids to ``generation_config.json``'s ``eos_token_id``.

    Our chat and evaluation stop at EOS and at the chat template's end-of-turn token
    (``data.lm.stop_token_ids``), which chat SFT trains the model to emit; transformers'
    ``generate`` stops only at the generation config's ``eos_token_id``. Without this, a model
    whose EOS is not its end-of-turn token (Qwen2.5 base: ``<|endoftext|>`` vs ``<|im_end|>``)
    decodes past the end of its turn in transformers where ours stops. The config's own EOS
    stays first (transformers falls back to it for padding).
    """
    from sft_jax.data.lm import stop_token_ids
    from sft_jax.hf import io

    path = Path(out_dir) / "generation_config.json"
    config = io.read_json(path) if path.is_file() else {}
    eos = config.get("eos_token_id")
    ids = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    ids += [i for i in stop_token_ids(tokenizer) if i not in ids]
    if ids:
        config["eos_token_id"] = ids[0] if len(ids) == 1 else ids
        io.write_json(config, path)


def export_model(
    model: nnx.Module,
    out_dir: str | Path,
    *,
    label_names: Sequence[str] | None = None,
    tokenizer_dir: str | Path | None = None,
    tokenizer: Any = None,
    image_spec: Any = None,
) -> Path:
    """Writes ``config.json``, ``model.safetensors`` and tokenizer files for ``model``.

    Args:
        model: A supported model (BERT classifier, Llama/Qwen2 or GPT-2 causal LM, ResNet /
            ViT / EfficientNet-Lite image classifier).
        out_dir: Destination directory.
        label_names: Class names (classifiers only).
        tokenizer_dir: Directory whose tokenizer files are copied.
        tokenizer: A transformers tokenizer to ``save_pretrained`` (e.g. from a GGUF file);
            for causal LMs its end-of-turn ids join the generation config's EOS ids
            (``add_stop_ids``).
        image_spec: An image model's input (``data.limits.ImageSpec``), written as
            ``preprocessor_config.json`` (ResNet, ViT, EfficientNet-Lite).

    Raises:
      TypeError: the model's family has no exporter yet.
    """
    exporters = _exporters()
    exporter = exporters.get(type(model))
    if exporter is None:
        raise TypeError(
            f"no Hugging Face exporter for {type(model).__name__}; "
            f"supported: {[t.__name__ for t in exporters]}"
        )
    return exporter(
        model,
        out_dir,
        label_names=label_names,
        tokenizer_dir=tokenizer_dir,
        tokenizer=tokenizer,
        image_spec=image_spec,
    )
