"""Llama / Qwen2 import and export against transformers (PyTorch), tiny random models."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sft_jax.hf import io
from sft_jax.hf.llama import export_llama, load_llama
from sft_jax.models.llama import LlamaConfig

TOL = 1e-4
BASE = dict(
    vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
)  # fmt: skip
LLAMA3 = dict(
    rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
    high_freq_factor=4.0, original_max_position_embeddings=16,
)  # fmt: skip
CASES = {
    "mha_untied": dict(BASE, num_key_value_heads=4),
    "gqa_tied": dict(BASE, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa_biases_head_dim6": dict(
        BASE, num_key_value_heads=1, head_dim=6, attention_bias=True, mlp_bias=True
    ),
    "rope_llama3": dict(BASE, num_key_value_heads=2, rope_parameters=LLAMA3),
    "rope_linear_theta": dict(
        BASE,
        num_key_value_heads=2,
        rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0),
    ),  # fmt: skip
    "qwen2_gqa": dict(BASE, num_key_value_heads=2, model_type="qwen2"),
    "qwen2_tied": dict(BASE, num_key_value_heads=1, model_type="qwen2", tie_word_embeddings=True),
}


def torch_lm(seed=0, model_type="llama", **config):
    """A random HF causal LM whose weights are large enough to make parity meaningful."""
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    cfg = cls(**config, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model


def lm_inputs(vocab, b=3, t=9, seed=0):
    """Ids and a mask with a full row, a right-padded row and a left-padded row."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, 6:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return ids * mask, mask


def torch_logits(model, ids, mask=None):
    """HF logits with generate's positions (cumsum(mask) - 1), so padded rows are comparable."""
    ids_t = torch.tensor(ids, dtype=torch.long)
    kw = {}
    if mask is not None:
        mask_t = torch.tensor(mask, dtype=torch.long)
        kw = dict(attention_mask=mask_t, position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids_t, **kw).logits.numpy()


def max_diff(a, b, mask=None):
    """Max |a - b| over the real positions."""
    d = np.abs(np.asarray(a) - np.asarray(b))
    return float(d.max() if mask is None else d[np.asarray(mask).astype(bool)].max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    config = dict(CASES[case])
    ref = torch_lm(**config)
    ref.save_pretrained(tmp_path)
    ours = load_llama(tmp_path)
    assert (ours.lm_head is None) == bool(config.get("tie_word_embeddings", False))
    ids, mask = lm_inputs(config["vocab_size"])
    d_mask = max_diff(ours(jnp.asarray(ids), jnp.asarray(mask)), torch_logits(ref, ids, mask), mask)
    d_full = max_diff(ours(jnp.asarray(ids)), torch_logits(ref, ids))
    print(f"{case}: padded {d_mask:.2e} unpadded {d_full:.2e}")
    assert d_mask <= TOL and d_full <= TOL


def test_config_round_trips_through_hf_dict(tmp_path):
    ref = torch_lm(**CASES["rope_llama3"])
    ref.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    cfg = LlamaConfig.from_hf_dict(hf)
    assert cfg.rope_scaling_dict["rope_type"] == "llama3" and cfg.rope_theta == 10000.0
    assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    # transformers 4 spelling: rope_theta + rope_scaling at the top level.
    old = dict(hf, rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0})
    old.pop("rope_parameters")
    assert LlamaConfig.from_hf_dict(old).rope_scaling_dict == {"type": "linear", "factor": 2.0}


@pytest.mark.parametrize("case", ["gqa_tied", "qwen2_gqa", "rope_llama3"])
def test_export_round_trip(case, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    torch_lm(seed=1, **CASES[case]).save_pretrained(src)
    ours = load_llama(src)
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    export_llama(ours, out, tokenizer_dir=src)
    ids, mask = lm_inputs(BASE["vocab_size"], seed=3)
    want = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))

    ref = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    arch = {"qwen2_gqa": "Qwen2ForCausalLM"}.get(case, "LlamaForCausalLM")
    assert type(ref).__name__ == arch
    diff = max_diff(torch_logits(ref.eval(), ids, mask), want, mask)
    print(f"{case} export -> transformers {diff:.2e}")
    assert diff <= TOL
    again = load_llama(out)
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))), want)
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= written
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    if CASES[case].get("tie_word_embeddings"):
        assert "lm_head.weight" not in io.read_safetensors(out / "model.safetensors")


def test_unused_and_missing_tensors_are_named(tmp_path):
    torch_lm(**CASES["gqa_tied"]).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = io.read_safetensors(path)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(16, np.float32)
    io.write_safetensors(tensors, path)
    with pytest.raises(ValueError) as e:
        load_llama(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "model.layers.1.mlp.up_proj" in msg
    assert "model.layers.0.self_attn.q_proj.bias" in msg


def test_load_pretrained_dispatches_causal_lm(tmp_path):
    import sft_jax
    from sft_jax.models.llama import LlamaForCausalLM

    torch_lm(**CASES["qwen2_gqa"]).save_pretrained(tmp_path)
    model = sft_jax.load_pretrained(tmp_path, task="causal_lm")
    assert isinstance(model, LlamaForCausalLM) and model.config.model_type == "qwen2"
    with pytest.raises(ValueError, match="model_type 'qwen2' is not supported.*bert"):
        sft_jax.load_pretrained(tmp_path, task="classification")
