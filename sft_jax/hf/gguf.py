"""GGUF (llama.cpp) checkpoints -> ``LlamaForCausalLM``, with numpy only (the ``gguf`` package).

Tensors are dequantized with ``gguf.quants.dequantize`` (float32) and mapped from llama.cpp names
(``token_embd``, ``blk.N.attn_q``, ``ffn_gate``, ``output_norm``, ``output``) onto our paths by a
declarative table. llama.cpp's converter permutes the rows of Q and K for its RoPE layout
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``) in ``llama`` files; the table undoes it exactly
as transformers' ``LlamaTensorProcessor._reverse_permute_weights`` does. ``qwen2`` files are not
permuted. The config comes from the metadata; the tokenizer is built by transformers' own GGUF
conversion (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), chat template included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sft_jax.hf.llama import abstract_model, dtype_overrides
from sft_jax.hf.mapping import IDENTITY, TRANSPOSE, Rule, Transform, assign_params, flat_params
from sft_jax.hf.mapping import import_weights as _import
from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM

ARCHITECTURES = ("llama", "qwen2")
_BLK, _LAYER = r"blk.{i:\d+}", r"model.layers.{i:\d+}"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: HF rows [n_head * D, ...] -> GGUF's interleaved rows."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of ``permute_rows`` (transformers' ``_reverse_permute_weights``)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_rows(n_head: int, kernel: bool) -> Transform:
    """GGUF rows (permuted) <-> our layout: kernel [in, out] (transposed) or bias [out]."""
    if kernel:
        return Transform(
            f"unpermute({n_head}).T",
            lambda w: unpermute_rows(w, n_head).T,
            lambda k: permute_rows(k.T, n_head),
        )
    return Transform(
        f"unpermute({n_head})",
        lambda b: unpermute_rows(b, n_head),
        lambda b: permute_rows(b, n_head),
    )


def gguf_rules(config: LlamaConfig, architecture: str) -> list[Rule]:
    """The llama.cpp name <-> our path table for one file (Q/K transforms depend on heads)."""
    rope = architecture == "llama"  # only llama.cpp's `llama` converter permutes Q/K
    rules = [Rule("token_embd.weight", "model.embed_tokens.embedding")]
    for gg, ours, heads in (
        ("attn_q", "self_attn.q_proj", config.num_attention_heads),
        ("attn_k", "self_attn.k_proj", config.num_key_value_heads),
    ):
        kernel, bias = (
            (_rope_rows(heads, True), _rope_rows(heads, False)) if rope else (TRANSPOSE, IDENTITY)
        )
        rules += [
            Rule(f"{_BLK}.{gg}.weight", f"{_LAYER}.{ours}.kernel", kernel),
            Rule(f"{_BLK}.{gg}.bias", f"{_LAYER}.{ours}.bias", bias),
        ]
    linears = {
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    for gg, ours in linears.items():
        rules += [
            Rule(f"{_BLK}.{gg}.weight", f"{_LAYER}.{ours}.kernel", TRANSPOSE),
            Rule(f"{_BLK}.{gg}.bias", f"{_LAYER}.{ours}.bias"),
        ]
    return rules + [
        Rule(f"{_BLK}.attn_norm.weight", f"{_LAYER}.input_layernorm.scale"),
        Rule(f"{_BLK}.ffn_norm.weight", f"{_LAYER}.post_attention_layernorm.scale"),
        Rule("output_norm.weight", "model.norm.scale"),
        Rule("output.weight", "lm_head.kernel", TRANSPOSE),
    ]


def _reader(path: str | Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on a bad header
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e


def _metadata(reader) -> dict[str, Any]:
    from gguf import GGUFValueType

    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        is_array = bool(field.types) and field.types[0] == GGUFValueType.ARRAY
        out[key] = len(field.data) if is_array and len(field.data) > 64 else field.contents()
    return out


def _tensors(reader) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    return {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata key -> value; long arrays (token lists, merges) become their length.

    ``tokenizer.chat_template``, ``tokenizer.ggml.bos_token_id`` and ``...eos_token_id`` are
    here, as is every architecture key (``llama.block_count``, ...).
    """
    return _metadata(_reader(path))


def read_gguf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> dequantized float32 array in numpy (HF) order [out, in]."""
    return _tensors(_reader(path))


def config_from_metadata(meta: dict[str, Any], *, tied: bool, **overrides: Any) -> LlamaConfig:
    """Builds the ``LlamaConfig`` from GGUF metadata (``read_gguf_metadata``'s dict).

    Raises:
        NotImplementedError: An architecture other than llama/qwen2, or RoPE scaling other than
            linear (llama3-style ``rope_freqs`` tensors are not supported).
    """
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise NotImplementedError(f"GGUF architecture {arch!r}; supported: {ARCHITECTURES}")
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    kwargs: dict[str, Any] = dict(
        model_type=arch, tie_word_embeddings=tied, hidden_size=hidden,
        vocab_size=int(meta.get("tokenizer.ggml.tokens") or get("vocab_size")),
        max_position_embeddings=int(get("context_length")),
        num_hidden_layers=int(get("block_count")),
        intermediate_size=int(get("feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", get("rope.dimension_count", hidden // heads))),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )  # fmt: skip
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        kwargs["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(get("rope.scaling.factor")),
        }
    elif scaling != "none":
        raise NotImplementedError(f"GGUF rope scaling {scaling!r} is not supported")
    return LlamaConfig(**{**kwargs, **overrides})


def load_gguf(
    path: str | Path, *, seed: int = 0, dtype: Any = None, param_dtype: Any = None
) -> LlamaForCausalLM:
    """Loads a llama/qwen2 GGUF file as ``LlamaForCausalLM`` (weights dequantized to float32).

    Args:
        path: The ``.gguf`` file.
        seed: Unused (every weight comes from the file); accepted for ``load_pretrained``.
        dtype: Compute dtype override (default float32).
        param_dtype: Parameter storage dtype override.

    Raises:
        ValueError: Unused, missing or mis-shaped tensors (all listed, naming the file).
        NotImplementedError: Unsupported architecture or RoPE scaling.
    """
    reader = _reader(path)
    meta, tensors = _metadata(reader), _tensors(reader)
    if "rope_freqs.weight" in tensors:
        raise NotImplementedError(f"{path}: llama3-style rope_freqs tensors are not supported")
    tied = "output.weight" not in tensors
    config = config_from_metadata(meta, tied=tied, **dtype_overrides(dtype, param_dtype))
    del seed
    model = abstract_model(LlamaForCausalLM, config)
    rules = gguf_rules(config, meta["general.architecture"])
    assign_params(model, _import(tensors, flat_params(model), rules, source=str(path)))
    return model


def load_gguf_tokenizer(path: str | Path):
    """The file's tokenizer, built by transformers' GGUF conversion (no BPE re-implementation).

    Returns:
        A transformers fast tokenizer with the file's vocabulary, merges, special tokens
        (``bos_token``/``eos_token``/``pad_token``) and ``chat_template``.
    """
    import transformers

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
