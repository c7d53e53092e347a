"""GPT-2 import and export against transformers (PyTorch), tiny random models."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sft_jax.hf import io
from sft_jax.hf.export import export_model
from sft_jax.hf.gpt2 import load_gpt2
from tests.hf.test_llama_hf import lm_inputs, max_diff, torch_logits

TOL = 1e-4
BASE = dict(vocab_size=67, n_positions=32, n_embd=16, n_layer=2, n_head=4)
CASES = {
    "base": BASE,
    "inner_relu_eps": dict(BASE, n_inner=20, activation_function="relu", layer_norm_epsilon=1e-3),
    "inverse_layer_scale": dict(BASE, n_layer=3, scale_attn_by_inverse_layer_idx=True),
}


def torch_gpt2(seed=0, **config):
    """A random HF GPT-2 with weights large enough to make parity meaningful."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**config, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if ".ln_" in name and "weight" in name else 0))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    config = CASES[case]
    ref = torch_gpt2(**config)
    ref.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    ids, mask = lm_inputs(config["vocab_size"])
    d_mask = max_diff(ours(jnp.asarray(ids), jnp.asarray(mask)), torch_logits(ref, ids, mask), mask)
    d_full = max_diff(ours(jnp.asarray(ids)), torch_logits(ref, ids))
    print(f"gpt2 {case}: padded {d_mask:.2e} unpadded {d_full:.2e}")
    assert d_mask <= TOL and d_full <= TOL


def test_bare_gpt2model_checkpoint_loads(tmp_path):
    """The original ``gpt2`` upload is a GPT2Model (no ``transformer.`` prefix)."""
    ref = torch_gpt2(seed=2, **BASE)
    ref.transformer.save_pretrained(tmp_path)  # a GPT2Model checkpoint of the same weights
    assert not any(k.startswith("transformer.") for k in io.read_safetensors(
        tmp_path / "model.safetensors"))  # fmt: skip
    ids, mask = lm_inputs(BASE["vocab_size"])
    got = load_gpt2(tmp_path)(jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff(got, torch_logits(ref, ids, mask), mask) <= TOL


def test_export_round_trip(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    torch_gpt2(seed=1, **BASE).save_pretrained(src)
    ours = load_gpt2(src)
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    export_model(ours, out, tokenizer_dir=src)  # the dispatch table routes to export_gpt2
    ids, mask = lm_inputs(BASE["vocab_size"], seed=4)
    want = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(ref).__name__ == "GPT2LMHeadModel"
    diff = max_diff(torch_logits(ref.eval(), ids, mask), want, mask)
    print(f"gpt2 export -> transformers {diff:.2e}")
    assert diff <= TOL
    np.testing.assert_array_equal(
        np.asarray(load_gpt2(out)(jnp.asarray(ids), jnp.asarray(mask))), want
    )
    assert "lm_head.weight" not in io.read_safetensors(out / "model.safetensors")
    assert {"tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}


def test_load_pretrained_dispatches_gpt2(tmp_path):
    import sft_jax
    from sft_jax.models.gpt2 import GPT2LMHeadModel

    torch_gpt2(**BASE).save_pretrained(tmp_path)
    assert isinstance(sft_jax.load_pretrained(tmp_path, task="causal_lm"), GPT2LMHeadModel)
