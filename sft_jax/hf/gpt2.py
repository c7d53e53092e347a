"""Hugging Face <-> sft_jax for GPT-2: the weight table, loader and exporter.

Reads both ``GPT2LMHeadModel`` checkpoints (``transformer.*``) and bare ``GPT2Model`` ones
(``wte.*``, ``h.*``, e.g. the original ``gpt2`` upload). HF's ``Conv1D`` weights are already
[in, out], so every kernel maps without a transpose; the fused ``c_attn`` columns are reordered
from HF's [(q, k, v), N, D] to our head-by-head [N, (q, k, v), D] (``models.gpt2``).
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
    Transform,
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
_CONV = _BLOCK + r".{m:attn\.c_proj|mlp\.c_fc|mlp\.c_proj}"
_QKV = _BLOCK + ".attn.c_attn"


def _qkv_order(n_head: int) -> Transform:
    """c_attn's last axis (3E) from HF's [(q, k, v), N, D] to our [N, (q, k, v), D] and back. A
    last axis that is not 3 x N x D passes unchanged (the shape check then names it)."""

    def swap(x: np.ndarray, fused: tuple[int, int]) -> np.ndarray:
        size = x.shape[-1]
        if size % (3 * n_head):
            return x
        x = x.reshape(x.shape[:-1] + fused + (size // (3 * n_head),))
        return np.swapaxes(x, -3, -2).reshape(x.shape[:-3] + (size,))

    return Transform(
        "qkv_head_major", lambda x: swap(x, (3, n_head)), lambda x: swap(x, (n_head, 3))
    )


def gpt2_rules(n_head: int) -> list[Rule]:
    """The weight table of a GPT-2 with ``n_head`` heads."""
    qkv = _qkv_order(n_head)
    return [
        *embedding("transformer.{e:wte|wpe}"),
        *layer_norm(_BLOCK + ".{n:ln_1|ln_2}"),
        *layer_norm("transformer.ln_f"),
        # Conv1D: weight [in, out] is our kernel as is (no transpose).
        Rule(f"{_CONV}.weight", f"{_CONV}.kernel"),
        Rule(f"{_CONV}.bias", f"{_CONV}.bias"),
        Rule(f"{_QKV}.weight", f"{_QKV}.kernel", qkv),
        Rule(f"{_QKV}.bias", f"{_QKV}.bias", qkv),
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
        tensors,
        flat_params(model),
        gpt2_rules(config.n_head),
        source=str(source),
        ignore=GPT2_IGNORE,
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
    weights = export_weights(params, gpt2_rules(model.config.n_head))
    io.write_safetensors(weights, out / io.SAFETENSORS_NAME)
    io.write_json({**model.config.to_hf_dict(), "dtype": "float32"}, out / "config.json")
    write_generation_config(model.config, out)
    save_tokenizer(out, tokenizer_dir, tokenizer)
    return out
