"""Hugging Face <-> sft_jax for Llama-family decoders (Llama, SmolLM2, Qwen2): table, loader,
exporter.

``transformers.AutoModelForCausalLM.from_pretrained`` loads an exported directory and gives the
same logits. The tokenizer travels as files (copied from a directory) or as a transformers
tokenizer object (``save_pretrained``, e.g. the one built from a GGUF file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from sft_jax.hf import io
from sft_jax.hf.mapping import (
    Rule,
    assign_params,
    embedding,
    export_weights,
    flat_params,
    import_weights,
    linear,
)
from sft_jax.models.llama import MODEL_TYPES, LlamaConfig, LlamaForCausalLM

_LAYER = r"model.layers.{i:\d+}"
LLAMA_RULES = [
    *embedding("model.embed_tokens"),
    *linear(_LAYER + ".self_attn.{p:q_proj|k_proj|v_proj|o_proj}"),
    *linear(_LAYER + ".mlp.{p:gate_proj|up_proj|down_proj}"),
    Rule(_LAYER + ".{n:input_layernorm|post_attention_layernorm}.weight", _LAYER + ".{n}.scale"),
    Rule("model.norm.weight", "model.norm.scale"),
    *linear("lm_head"),
]
# Non-persistent RoPE buffers written by old transformers versions.
LLAMA_IGNORE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)


def dtype_overrides(dtype: Any, param_dtype: Any) -> dict[str, Any]:
    """The non-None dtype overrides, as config field values."""
    return {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}


def read_llama_config(model_dir: str | Path, **overrides: Any) -> LlamaConfig:
    """Reads ``config.json`` (``model_type`` llama or qwen2) into a ``LlamaConfig``.

    Raises:
        ValueError: Another ``model_type``.
    """
    path = Path(model_dir) / "config.json"
    hf = io.read_json(path)
    if hf.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}, expected {MODEL_TYPES}")
    return LlamaConfig.from_hf_dict(hf, **overrides)


def abstract_model(cls: type, config: Any) -> Any:
    """``cls(config)`` with shape-only Params (no random init): a loader fills every one."""
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def load_llama_tensors(
    model: LlamaForCausalLM, tensors: dict[str, np.ndarray], source: str
) -> LlamaForCausalLM:
    """Imports HF-named tensors into ``model`` in place (strict: unused/missing keys fail).

    ``model`` may be abstract (``abstract_model``): every Param is assigned.

    A tied model ignores a stored ``lm_head.weight`` (older checkpoints save the tied copy).
    """
    ignore = LLAMA_IGNORE + ((r"lm_head\.weight",) if model.config.tie_word_embeddings else ())
    loaded = import_weights(tensors, flat_params(model), LLAMA_RULES, source=source, ignore=ignore)
    assign_params(model, loaded)
    return model


def load_llama(
    model_dir: str | Path,
    *,
    seed: int = 0,
    dtype: Any = None,
    param_dtype: Any = None,
) -> LlamaForCausalLM:
    """Loads a Hugging Face Llama / Qwen2 directory as ``LlamaForCausalLM``.

    Args:
        model_dir: Directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
        seed: Unused (every weight comes from the checkpoint); accepted so that callers can
            pass one seed to ``load_pretrained`` for any task.
        dtype: Compute dtype override (default float32).
        param_dtype: Parameter storage dtype override.
    """
    config = read_llama_config(model_dir, **dtype_overrides(dtype, param_dtype))
    tensors, source = io.read_model_tensors(model_dir)
    del seed
    return load_llama_tensors(abstract_model(LlamaForCausalLM, config), tensors, str(source))


def write_generation_config(config: Any, out_dir: Path) -> None:
    """Writes ``generation_config.json`` from the config's bos/eos/pad ids."""
    eos = config.eos_token_id
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id,
    }
    io.write_json(
        {k: v for k, v in gen.items() if v is not None}, out_dir / "generation_config.json"
    )


def save_tokenizer(
    out_dir: Path, tokenizer_dir: str | Path | None = None, tokenizer: Any = None
) -> list[str]:
    """Copies tokenizer files from ``tokenizer_dir`` and/or saves a transformers ``tokenizer``.

    Returns:
        The names of the files copied (empty when only ``tokenizer`` was saved).

    Raises:
        FileNotFoundError: ``tokenizer_dir`` holds none of ``TOKENIZER_FILES``.
    """
    import shutil

    names: list[str] = []
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        if not names:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
        for name in names:
            shutil.copyfile(src / name, out_dir / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
        _add_portable_tokenizer_fields(tokenizer, out_dir)
    return names


def _add_portable_tokenizer_fields(tokenizer: Any, out_dir: Path) -> None:
    """Makes a transformers-5 tokenizer save readable by transformers 4 as well.

    transformers 5 writes the chat template to ``chat_template.jinja`` only, names the class
    ``TokenizersBackend`` and skips ``special_tokens_map.json``; 4.x wants all three the old way.
    """
    path = out_dir / "tokenizer_config.json"
    config = io.read_json(path)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the same class under its old name
    if isinstance(tokenizer.chat_template, str):
        config.setdefault("chat_template", tokenizer.chat_template)
    io.write_json(config, path)
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    if special and not (out_dir / "special_tokens_map.json").is_file():
        io.write_json(special, out_dir / "special_tokens_map.json")


def export_llama(
    model: LlamaForCausalLM,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    tokenizer: Any = None,
) -> Path:
    """Writes a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` directory (float32).

    Writes ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer
    (files copied from ``tokenizer_dir``, and/or ``tokenizer.save_pretrained``).

    Args:
        model: The model to export.
        out_dir: Destination directory (created).
        tokenizer_dir: Directory to copy tokenizer files from (those present of
            ``TOKENIZER_FILES``; a copied ``generation_config.json`` wins over ours).
        tokenizer: A transformers tokenizer to save (e.g. ``load_gguf_tokenizer``'s).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {p: np.asarray(v[...], dtype=np.float32) for p, v in flat_params(model).items()}
    io.write_safetensors(export_weights(params, LLAMA_RULES), out / io.SAFETENSORS_NAME)
    io.write_json({**model.config.to_hf_dict(), "dtype": "float32"}, out / "config.json")
    write_generation_config(model.config, out)
    save_tokenizer(out, tokenizer_dir, tokenizer)
    return out
