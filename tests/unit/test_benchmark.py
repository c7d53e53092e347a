"""The training-step benchmark: FLOP counts by hand, MFU, the peak table, tiny end-to-end runs."""

import math
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from sft_jax import benchmark, tree_util


def test_flops_of_tiny_bert_match_hand_count():
    spec = benchmark.get_spec("tiny-bert")  # H=16, L=2, 2 heads, I=32, 3 labels, B=2, T=8
    per_tok = 2 * (4 * 16 * 16 + 2 * 16 * 32)  # q, k, v, out + MLP in/out = 4096
    per_seq = 16 * 16 + 16 * 3  # pooler + classifier on [CLS] = 304
    attn = 12 * 2 * 16 * 8**2 * 2  # 12 * L * H * T^2 * B = 49152
    assert benchmark.matmul_params(spec.config, 3) == (per_tok, per_seq)
    assert benchmark.step_flops(spec) == 6 * per_tok * 16 + 6 * per_seq * 2 + attn == 446016


def test_flops_of_tiny_llama_match_hand_count():
    spec = benchmark.get_spec("tiny-llama")  # H=16, L=2, 4 heads / 2 kv (D=4), I=32, V=64, tied
    layer = 2 * 16 * 16 + 2 * 16 * 8 + 3 * 16 * 32  # q, o; k, v; gate, up, down = 2304
    per_tok = 2 * layer + 16 * 64  # + tied LM head = 5632
    attn = 12 * 2 * 16 * 8**2 * 2  # = 49152
    assert benchmark.matmul_params(spec.config) == (per_tok, 0)
    assert benchmark.step_flops(spec) == 6 * per_tok * 16 + attn == 589824


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_matmul_params_equal_the_models_matmul_weights(name):
    """Every Dense kernel (and the tied LM head's table), none of the lookup tables."""
    spec = benchmark.get_spec(name)
    params = nnx.to_pure_dict(nnx.state(benchmark.build_model(spec), nnx.Param))
    flat = tree_util.flatten_to_dict(params)
    n = sum(x.size for k, x in flat.items() if k.endswith("kernel"))
    if spec.task == "causal_lm":  # tied: the embedding is the LM head's matrix
        n += flat["model/embed_tokens/embedding"].size
    assert sum(benchmark.matmul_params(spec.config, spec.num_labels)) == n


def test_full_size_shapes_are_the_published_ones():
    count = lambda name: sum(benchmark.matmul_params(benchmark.get_spec(name).config))
    # Llama-3.2-1B: 1.236e9 params, of which the 128256 x 2048 table is the (tied) head.
    assert count("llama-1b") == 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) + (
        128256 * 2048
    )
    assert benchmark.get_spec("smollm2-135m").seq_len == 1024
    assert benchmark.get_spec("bert-base", batch_size=4).batch_size == 4
    assert benchmark.get_spec("minilm-l6", "bfloat16").config.param_dtype == "float32"
    with pytest.raises(ValueError, match="unknown model"):
        benchmark.get_spec("gpt-5")


def test_mfu_arithmetic():
    assert benchmark.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)  # 2e12 FLOP/s of 4e12
    assert benchmark.mfu(1e12, 0.5, None) is None


@pytest.mark.parametrize(
    "kind,dtype,want",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 67e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v5p", "float32", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("TPU v4", "bfloat16", 275e12),
        ("cpu", "float32", 76e9),
        ("Quantum Abacus", "bfloat16", None),
    ],
)
def test_peak_table_lookup(kind, dtype, want):
    assert benchmark.peak_flops(kind, dtype) == want


def test_tiny_bert_end_to_end():
    r = benchmark.run_jax(benchmark.get_spec("tiny-bert"), warmup=1, steps_=2)
    assert r["step_ms"] > 0 and r["first_call_s"] > 0 and len(r["step_ms_all"]) == 2
    assert r["compilations"] == 1
    assert r["tokens_per_step"] == 16
    assert r["tokens_per_s"] == pytest.approx(16 / (r["step_ms"] / 1e3))
    assert r["peak_flops"] == 76e9 and 0 < r["mfu"] < 1
    assert abs(r["loss"] - math.log(3)) < 0.1  # near-uniform logits at init


def test_tiny_llama_data_parallel_bfloat16():
    spec = benchmark.get_spec("tiny-llama", "bfloat16")
    r = benchmark.run_jax(spec, warmup=0, steps_=1, mesh_shape=(2, 1, 1), peak=1e9)
    assert r["num_devices"] == 2 and r["peak_flops"] == 2e9
    assert r["compilations"] == 1 and r["dtype"] == "bfloat16"
    assert abs(r["loss"] - math.log(64)) < 0.2


def test_torch_side_runs_the_same_shape():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    r = benchmark.run_torch(benchmark.get_spec("tiny-bert"), warmup=0, steps_=2)
    assert r["step_ms"] > 0 and len(r["step_ms_all"]) == 2
    assert np.isfinite(r["loss"]) and abs(r["loss"] - math.log(3)) < 0.1


def test_library_imports_no_training_stack_packages():
    """The GPU machine has none of these: importing the benchmark must not need them."""
    banned = ["ml_collections", "grain", "tensorflow_datasets", "tensorboardX", "gguf", "torch"]
    code = (
        "import sys, sft_jax.benchmark; "
        f"print([m for m in {banned!r} + ['transformers', 'tensorflow'] if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
