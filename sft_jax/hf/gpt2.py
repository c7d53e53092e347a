"""Hugging Face <-> sft_jax for GPT-2: the weight table, loader and exporter.

Reads both ``GPT2LMHeadModel`` checkpoints (``transformer.*``) and bare ``GPT2Model`` ones
(``wte.*``, ``h.*``, e.g. the original ``gpt2`` upload). HF's ``Conv1D`` weights are already
[in, out], so every kernel maps without a transpose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sft_jax.hf import io
from sft_jax.hf.llama import (
    abstract_model,
    dtype_overrides,
    save_tokenizer,
    write_generation_config,
)
from sft_jax.hf.mapping import (
    Rule,
    add_prefix,
    assign_params,
    embedding,
    export_weights,
    flat_params,
    import_weights,
    layer_norm,
)
from sft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel

_BLOCK = r"transformer.h.{i:\d+}"
_CONV = _BLOCK + r".{m:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj}"
GPT2_RULES = [
    *embedding("transformer.{e:wte|wpe}"),
    *layer_norm(_BLOCK + ".{n:ln_1|ln_2}"),
    *layer_norm("transformer.ln_f"),
    # Conv1D: weight [in, out] is our kernel as is (no transpose).
    Rule(f"{_CONV}.weight", f"{_CONV}.kernel"),
    Rule(f"{_CONV}.bias", f"{_CONV}.bias"),
]
# The tied head, and the causal-mask buffers older checkpoints store.
GPT2_IGNORE = (
    r"lm_head\.weight",
    r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",
)
_BASE_ROOTS = ("wte", "wpe", "h", "ln_f")


def read_gpt2_config(model_dir: str | Path, **overrides: Any) -> GPT2Config:
    """Reads ``config.json`` (``model_type`` gpt2) into a ``GPT2Config``.

    Raises:
        ValueError: Another ``model_type``.
    """
    path = Path(model_dir) / "config.json"
    hf = io.read_json(path)
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}, expected 'gpt2'")
    return GPT2Config.from_hf_dict(hf, **overrides)


def load_gpt2(
    model_dir: str | Path,
    *,
    seed: int = 0,
    dtype: Any = None,
    param_dtype: Any = None,
) -> GPT2LMHeadModel:
    """Loads a Hugging Face GPT-2 directory as ``GPT2LMHeadModel``.

    Args:
        model_dir: Directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
        seed: Unused (every weight comes from the checkpoint); accepted for ``load_pretrained``.
        dtype: Compute dtype override (default float32).
        param_dtype: Parameter storage dtype override.
    """
    overrides = dtype_overrides(dtype, param_dtype)
    config = read_gpt2_config(model_dir, **overrides)
    tensors, source = io.read_model_tensors(model_dir)
    tensors = add_prefix(tensors, "transformer.", _BASE_ROOTS)
    del seed
    model = abstract_model(GPT2LMHeadModel, config)
    loaded = import_weights(
        tensors, flat_params(model), GPT2_RULES, source=str(source), ignore=GPT2_IGNORE
    )
    assign_params(model, loaded)
    return model


def export_gpt2(
    model: GPT2LMHeadModel,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    tokenizer: Any = None,
) -> Path:
    """Writes a Hugging Face ``GPT2LMHeadModel`` directory (float32 weights, tied head).

    Args:
        model: The model to export.
        out_dir: Destination directory (created).
        tokenizer_dir: Directory to copy tokenizer files from (tokenizer.json, vocab.json,
            merges.txt, tokenizer_config.json, ... those present).
        tokenizer: A transformers tokenizer to ``save_pretrained`` into ``out_dir``.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {p: np.asarray(v[...], dtype=np.float32) for p, v in flat_params(model).items()}
    io.write_safetensors(export_weights(params, GPT2_RULES), out / io.SAFETENSORS_NAME)
    io.write_json({**model.config.to_hf_dict(), "dtype": "float32"}, out / "config.json")
    write_generation_config(model.config, out)
    save_tokenizer(out, tokenizer_dir, tokenizer)
    return out
