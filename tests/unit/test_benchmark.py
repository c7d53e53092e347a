"""The training-step benchmark: FLOP counts by hand, MFU, the peak table, tiny end-to-end runs."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from sft_jax import benchmark, benchmark_shapes, benchmark_torch, tree_util


def test_flops_of_tiny_bert_match_hand_count():
    spec = benchmark_shapes.get_spec("tiny-bert")  # H=16, L=2, 2 heads, I=32, 3 labels, B=2, T=8
    per_tok = 2 * (4 * 16 * 16 + 2 * 16 * 32)  # q, k, v, out + MLP in/out = 4096
    per_seq = 16 * 16 + 16 * 3  # pooler + classifier on [CLS] = 304
    attn = 12 * 2 * 16 * 8**2 * 2  # 12 * L * H * T^2 * B = 49152
    assert benchmark_shapes.matmul_params(spec.config, 3) == (per_tok, per_seq)
    assert benchmark_shapes.step_flops(spec) == 6 * per_tok * 16 + 6 * per_seq * 2 + attn == 446016


def test_flops_of_tiny_llama_match_hand_count():
    # H=16, L=2, 4 heads / 2 kv (D=4), I=32, V=64, tied
    spec = benchmark_shapes.get_spec("tiny-llama")
    layer = 2 * 16 * 16 + 2 * 16 * 8 + 3 * 16 * 32  # q, o; k, v; gate, up, down = 2304
    per_tok = 2 * layer + 16 * 64  # + tied LM head = 5632
    attn = 12 * 2 * 16 * 8**2 * 2  # = 49152
    assert benchmark_shapes.matmul_params(spec.config) == (per_tok, 0)
    assert benchmark_shapes.step_flops(spec) == 6 * per_tok * 16 + attn == 589824


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_matmul_params_equal_the_models_matmul_weights(name):
    """Every Dense kernel (and the tied LM head's table), none of the lookup tables."""
    spec = benchmark_shapes.get_spec(name)
    params = nnx.to_pure_dict(nnx.state(benchmark_shapes.build_model(spec), nnx.Param))
    flat = tree_util.flatten_to_dict(params)
    n = sum(x.size for k, x in flat.items() if k.endswith("kernel"))
    if spec.task == "causal_lm":  # tied: the embedding is the LM head's matrix
        n += flat["model/embed_tokens/embedding"].size
    assert sum(benchmark_shapes.matmul_params(spec.config, spec.num_labels)) == n


def test_full_size_shapes_are_the_published_ones():
    count = lambda name: sum(benchmark_shapes.matmul_params(benchmark_shapes.get_spec(name).config))
    # Llama-3.2-1B: 1.236e9 params, of which the 128256 x 2048 table is the (tied) head.
    assert count("llama-1b") == 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) + (
        128256 * 2048
    )
    assert benchmark_shapes.get_spec("smollm2-135m").seq_len == 1024
    assert benchmark_shapes.get_spec("bert-base", batch_size=4).batch_size == 4
    assert benchmark_shapes.get_spec("minilm-l6", "bfloat16").config.param_dtype == "float32"
    with pytest.raises(ValueError, match="unknown model"):
        benchmark_shapes.get_spec("gpt-5")


def test_mfu_arithmetic():
    assert benchmark_shapes.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)  # 2e12 FLOP/s of 4e12
    assert benchmark_shapes.mfu(1e12, 0.5, None) is None


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
    assert benchmark_shapes.peak_flops(kind, dtype) == want


def test_time_pipelined_waits_once_after_all_calls():
    log = []
    per_call = benchmark.time_pipelined(lambda: log.append("d"), lambda: log.append("w"), 3)
    assert log == ["w", "d", "d", "d", "w"] and per_call >= 0
    with pytest.raises(ValueError, match="at least one timed step"):
        benchmark.time_pipelined(lambda: None, lambda: None, 0)


GENERATION_TIMING = """
import time
from experiments import generation_speed

log, clock = [], iter(range(100))

class Tokens:
    def block_until_ready(self):
        log.append("wait")

class Out:
    tokens = Tokens()

def fn():
    log.append("call")
    return Out()

time.perf_counter = lambda: log.append("clock") or next(clock)
_, seconds = generation_speed._timed(fn)
print(log, seconds)
"""


def test_generation_speed_waits_for_the_warmup_call_before_timing():
    """JAX returns before the device is done: the compiling call must be waited for before the
    clock starts, or the timed call also pays for the rest of it. (In a child process: the
    script's absl flags would otherwise join this process's.)"""
    out = subprocess.run([sys.executable, "-c", GENERATION_TIMING], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.split() == "['call', 'wait', 'clock', 'call', 'wait', 'clock'] 1".split()


def test_tiny_bert_end_to_end():
    r = benchmark.run_jax(benchmark_shapes.get_spec("tiny-bert"), warmup=1, steps_=2)
    assert r["step_ms"] > 0 and r["first_call_s"] > 0 and len(r["step_ms_all"]) == 2
    assert r["compilations"] == 1 and r["host_page_faults_per_step"] >= 0
    assert r["host_max_rss_bytes"] > 0
    assert r["tokens_per_step"] == 16
    assert r["tokens_per_s"] == pytest.approx(16 / (r["step_ms"] / 1e3))
    assert r["peak_flops"] == 76e9 and 0 < r["mfu"] < 1
    assert r["pipelined_step_ms"] > 0 and 0 < r["pipelined_mfu"] < 1
    assert r["pipelined_tokens_per_s"] == pytest.approx(16 / (r["pipelined_step_ms"] / 1e3))
    assert abs(r["loss"] - math.log(3)) < 0.1  # near-uniform logits at init
    assert r["policy"] is None and r["num_trainable_params"] == r["num_params"]  # all, AdamW
    assert r["peak_memory_source"] == "estimated" and r["peak_memory_bytes"] > 0
    assert all(c == {"count": 0, "bytes": 0} for c in r["collectives"].values())  # one device


def test_tiny_llama_data_parallel_bfloat16():
    spec = benchmark_shapes.get_spec("tiny-llama", "bfloat16")
    r = benchmark.run_jax(spec, warmup=0, steps_=1, mesh_shape=(2, 1, 1), peak=1e9)
    assert r["num_devices"] == 2 and r["peak_flops"] == 2e9
    assert r["compilations"] == 1 and r["dtype"] == "bfloat16"
    assert abs(r["loss"] - math.log(64)) < 0.2
    # Data parallel: the gradients (and metrics) are summed; nothing else moves.
    moved = {op for op, c in r["collectives"].items() if c["count"]}
    assert moved == {"all-reduce"} and r["collectives"]["all-reduce"]["bytes"] > 0, r


def test_torch_side_runs_the_same_shape():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    r = benchmark_torch.run_torch(benchmark_shapes.get_spec("tiny-bert"), warmup=0, steps_=2)
    assert r["step_ms"] > 0 and len(r["step_ms_all"]) == 2 and r["pipelined_step_ms"] > 0
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


# Parameter counts of the tiny shapes, by hand. tiny-bert (H=16, L=2, I=32, V=64, 32 positions,
# 2 token types, 3 labels): embeddings 1024 + 512 + 32 + LayerNorm 32 = 1600; per layer q/k/v/out
# 4 * (256 + 16) + LayerNorm 32 + MLP (512 + 32) + (512 + 16) + LayerNorm 32 = 2224; pooler 272;
# classifier 16 * 3 + 3 = 51. bitfit: classifier + every bias: embeddings LayerNorm 16, per layer
# 4 * 16 + 16 + 32 + 16 + 16 = 144, pooler 16. lora:8 (q, k, v, attention output, intermediate,
# output; each (in + out) * 8): per layer 4 * 256 + 2 * 384 = 1792, plus the classifier.
TINY_BERT = {"head_only": 51, "bitfit": 51 + 16 + 2 * 144 + 16, "lora:8": 2 * 1792 + 51,
             "full": 1600 + 2 * 2224 + 272 + 51}  # fmt: skip
# tiny-llama (H=16, 4 heads / 2 kv of dim 4, I=32, V=64, tied): embedding 1024; per layer q 256,
# k 128, v 128, o 256, gate/up/down 3 * 512, two RMSNorms 32 = 2336; final norm 16. lora:8: per
# layer q (16+16)*8, k (16+8)*8, v (16+8)*8, o (16+16)*8, gate/up (16+32)*8, down (32+16)*8.
# head_only: the tied embedding is the LM head.
TINY_LLAMA = {
    "head_only": 1024,
    "lora:8": 2 * (256 + 192 + 192 + 256 + 3 * 384),
    "full": 1024 + 2 * 2336 + 16,
}


@pytest.mark.parametrize("name,expected", [("tiny-bert", TINY_BERT), ("tiny-llama", TINY_LLAMA)])
def test_policies_train_the_expected_parameters(name, expected):
    assert TINY_BERT == {"head_only": 51, "bitfit": 371, "lora:8": 3635, "full": 6371}
    spec = benchmark_shapes.get_spec(name)
    state_bytes = {}
    for policy, n in expected.items():
        state, _, _, _, trainable = benchmark.build_step(spec, policy=policy)
        assert tree_util.count(state.params, trainable) == n, policy
        # AdamW: two float32 moments per trainable scalar, plus a few int32 step counters.
        state_bytes[policy] = tree_util.nbytes(state.opt_state)
        assert 8 * n <= state_bytes[policy] <= 8 * n + 64, policy
    ordered = [p for p in ("head_only", "lora:8", "full") if p in state_bytes]
    assert [state_bytes[p] for p in ordered] == sorted(state_bytes[p] for p in ordered)
    assert len(set(state_bytes.values())) == len(state_bytes)


def test_policy_optimizer_and_inapplicable_policies():
    bert, llama = benchmark_shapes.get_spec("tiny-bert"), benchmark_shapes.get_spec("tiny-llama")
    state, *_ = benchmark.build_step(bert, policy="full", optimizer="sgd")
    assert 4 * 6371 <= tree_util.nbytes(state.opt_state) <= 4 * 6371 + 64  # momentum only
    # No biases for BitFit, and a causal LM has no new task head.
    with pytest.raises(ValueError, match="leaves no trainable parameter"):
        benchmark.build_step(llama, policy="bitfit")
    with pytest.raises(ValueError, match="needs a policy"):
        benchmark.build_step(bert, optimizer="sgd")


def test_policy_run_reports_sizes_and_estimated_peak():
    spec = benchmark_shapes.get_spec("tiny-bert")
    r = benchmark.run_jax(spec, warmup=0, steps_=1, policy="lora:8")
    assert (r["policy"], r["optimizer"], r["num_trainable_params"]) == ("lora:8", "adamw", 3635)
    assert r["num_params"] == 6371 + 2 * 1792  # base model + adapters
    assert r["compilations"] == 1  # the memory analysis reused the step's compilation
    m = r["compiled_memory"]
    assert m["estimated_peak_bytes"] == (
        m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"]
    )
    assert m["argument_bytes"] >= 4 * r["num_params"] + r["optimizer_state_bytes"]
    assert r["peak_bytes"] is None  # CPU: no device statistics
    assert (r["peak_memory_bytes"], r["peak_memory_source"]) == (
        m["estimated_peak_bytes"],
        "estimated",
    )


def test_command_line_policies_table(tmp_path):
    out = tmp_path / "b.json"
    cmd = [sys.executable, "-m", "experiments.benchmark", "--models", "tiny-llama", "--policies",
           "bitfit,lora:8", "--steps", "1", "--warmup", "0", "--out", str(out)]  # fmt: skip
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "tiny-llama / bitfit: freezing policy 'bitfit' leaves no trainable parameter" in text
    row = next(line for line in text.splitlines() if " lora:8 " in line).split()
    assert row[:4] == ["tiny-llama", "lora:8", "2x8", "4,096"] and row[6] == "est"
    results = json.load(open(out))["results"]
    assert [r["policy"] for r in results] == ["bitfit", "lora:8"] and "error" in results[0]


def test_image_shapes_count_convolution_flops():
    """ResNet-50 and ViT-B/16 at 224 px: the published forward GMACs (4.09 and 17.56)."""
    resnet, vit = (benchmark_shapes.get_spec(n, batch_size=1) for n in ("resnet-50", "vit-b16"))
    assert resnet.task == vit.task == "image_classification" and resnet.unit == "images"
    assert benchmark_shapes.forward_flops(resnet) == 8_178_368_512
    assert benchmark_shapes.forward_flops(vit) == 35_127_656_448
    assert benchmark_shapes.step_flops(vit) == 3 * 35_127_656_448
    assert benchmark_shapes.get_spec("vit-b16", seq_len=384).config.image_size == 384


def test_image_step_trains_and_keeps_batch_norm_statistics_out_of_the_optimizer():
    r = benchmark.run_jax(benchmark_shapes.get_spec("tiny-resnet"), warmup=0, steps_=1)
    assert r["unit"] == "images" and r["throughput_per_s"] == 2 / (r["step_ms"] / 1e3)
    # BatchNorm running statistics are in the state but neither trained nor in AdamW's moments.
    assert np.isfinite(r["loss"]) and r["num_trainable_params"] < r["num_params"]
    assert r["optimizer_state_bytes"] <= 8 * r["num_trainable_params"] + 64


def test_profile_lists_the_step_operations(tmp_path):
    r = benchmark.run_jax(
        benchmark_shapes.get_spec("tiny-bert"), warmup=0, steps_=1, profile_dir=str(tmp_path)
    )
    ops = r["profile_ops"]
    assert ops and all(o["ms"] >= 0 and o["count"] > 0 for o in ops)
    assert [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True)
    assert sum(o["share"] for o in ops) <= 1.0 + 1e-9
    assert not any(o["op"].startswith(("ThunkExecutor", "end: ")) for o in ops)
