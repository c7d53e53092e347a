"""GGUF import: tiny files written with gguf's GGUFWriter, and the real SmolLM2-135M-Instruct."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

import sft_jax
from sft_jax.hf.gguf import (
    load_gguf,
    load_gguf_tokenizer,
    permute_rows,
    read_gguf_metadata,
    unpermute_rows,
)
from sft_jax.pretrained import resolve_model_dir
from tests.hf.test_llama_hf import lm_inputs, max_diff, torch_lm, torch_logits

TOL = 1e-4
BYTES = list(bytes_to_unicode().values())  # the 256 byte-level symbols
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "he ll"]
SPECIAL = ["<|im_start|>", "<|im_end|>"]
TOKENS = BYTES + [m.replace(" ", "") for m in MERGES] + SPECIAL
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
TINY = dict(
    vocab_size=len(TOKENS), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, rms_norm_eps=1e-5, rope_theta=500.0, max_position_embeddings=64,
    bos_token_id=len(TOKENS) - 2, eos_token_id=len(TOKENS) - 1,
)  # fmt: skip
CASES = {
    "llama_gqa_tied": dict(TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "llama_mha_untied": dict(TINY, num_key_value_heads=4),
    "qwen2_biases": dict(TINY, num_key_value_heads=2, model_type="qwen2"),
}
_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def gguf_tensor_name(hf_name: str) -> str:
    """transformers' name -> llama.cpp's (the convert_hf_to_gguf.py mapping)."""
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{_NAMES[module]}.{leaf}"


def write_gguf(model, path, arch):
    """Writes ``model`` as llama.cpp's converter would: F32 tensors, Q/K rows permuted (llama)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_merges(MERGES)
    w.add_token_types([1] * (len(TOKENS) - 2) + [3, 3])  # NORMAL..., CONTROL x2
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_chat_template(TEMPLATE)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname, value = gguf_tensor_name(name), p.detach().numpy().astype(np.float32)
        kind = gname.split(".")[-2]  # attn_q in blk.0.attn_q.weight
        if arch == "llama" and kind in heads:
            value = permute_rows(value, heads[kind])
        w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def transformers_gguf_lm(path):
    """transformers' own GGUF reading (config, dequantization, Q/K un-permutation) into its
    PyTorch model; ``from_pretrained(gguf_file=...)`` does the same but needs ``accelerate``."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert not missing or config.tie_word_embeddings
    return model.eval()


def test_permute_round_trip():
    w = np.arange(24 * 3).reshape(24, 3)
    assert not np.array_equal(permute_rows(w, 2), w)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 2), 2), w)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_gguf_matches_source_and_transformers(case, tmp_path):
    config = dict(CASES[case])
    ref = torch_lm(seed=5, **config)
    path = tmp_path / f"{case}.gguf"
    write_gguf(ref, path, config.get("model_type", "llama"))
    ours = load_gguf(path)
    cfg = ours.config
    assert (cfg.num_key_value_heads, cfg.rope_theta, cfg.vocab_size) == (
        config["num_key_value_heads"], 500.0, len(TOKENS))  # fmt: skip
    assert cfg.tie_word_embeddings == config.get("tie_word_embeddings", False)
    ids, mask = lm_inputs(len(TOKENS))
    got = ours(jnp.asarray(ids), jnp.asarray(mask))
    d_src = max_diff(got, torch_logits(ref, ids, mask), mask)
    # transformers reading the same file undoes the permutation its own way.
    d_hf = max_diff(got, torch_logits(transformers_gguf_lm(path), ids, mask), mask)
    print(f"gguf {case}: vs source {d_src:.2e}, vs transformers' GGUF load {d_hf:.2e}")
    assert d_src <= TOL and d_hf <= TOL


def test_tiny_gguf_tokenizer_and_metadata(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(torch_lm(**CASES["llama_gqa_tied"]), path, "llama")
    meta = read_gguf_metadata(path)
    assert meta["tokenizer.chat_template"] == TEMPLATE and meta["llama.block_count"] == 2
    assert meta["tokenizer.ggml.tokens"] == len(TOKENS)  # long arrays become lengths
    tok = load_gguf_tokenizer(path)
    assert tok.chat_template == TEMPLATE
    assert (tok.bos_token, tok.eos_token) == tuple(SPECIAL)
    assert tok.convert_ids_to_tokens(tok("hell the").input_ids) == ["hell", "Ġthe"]
    text = tok.apply_chat_template([{"role": "user", "content": "hell"}], tokenize=False)
    assert tok(text).input_ids == [TINY["bos_token_id"], TOKENS.index("hell"), TINY["eos_token_id"]]


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    path = resolve_model_dir("smollm2-135m-instruct")
    tok = load_gguf_tokenizer(path)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = np.asarray([tok(text).input_ids], np.int32)
    ours = sft_jax.load_pretrained("smollm2-135m-instruct", task="causal_lm")
    assert ours.config.tie_word_embeddings and ours.config.num_key_value_heads == 3
    assert ours.config.eos_token_id == tok.eos_token_id == 2
    got = np.asarray(ours(jnp.asarray(ids)))
    reference = transformers_gguf_lm(path)
    want = torch_logits(reference, ids)
    diff = max_diff(got, want)
    # 30 layers, logits up to ~38: float32 summation order alone moves them by ~1e-4 (9.9e-5
    # between ours and torch on an AVX-512 Xeon, 1.1e-4 on an AVX2 EPYC). So compare both with
    # torch in float64 too: ours must be as close to it as torch's own float32 run is.
    with torch.no_grad():
        exact = reference.double()(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    ours_err, torch_err = max_diff(got, exact), max_diff(want, exact)
    print(f"SmolLM2 GGUF ({ids.shape[1]} tokens): max abs diff {diff:.2e}; vs float64 torch: "
          f"ours {ours_err:.2e}, torch float32 {torch_err:.2e}")  # fmt: skip
    assert ours_err <= max(TOL, 1.25 * torch_err)
    assert diff <= 2 * TOL
    assert (got.argmax(-1) == want.argmax(-1)).all()
