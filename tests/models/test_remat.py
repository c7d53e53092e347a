"""runtime.remat='full': the same training, with each block's activations recomputed in the
backward pass (after its cotangent exists) instead of kept from the forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax import benchmark, benchmark_shapes, lora, tasks
from sft_jax.models import remat
from sft_jax.models.efficientnet import (
    BlockSpec,
    EfficientNetForImageClassification,
    EfficientNetLiteConfig,
)
from sft_jax.models.heads import HeadConfig
from tests.models.test_gpt2 import tiny_gpt2


def _grads(model, batch: dict, task_name: str, policy: str) -> list:
    """Gradients of the task's loss sum (dropout on where the model has it) under ``policy``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    task = tasks.get_task(task_name)

    def loss(params):
        return task.loss_sums(nnx.merge(graphdef, params, rest), batch, jax.random.key(3))[0]

    with remat.REMAT.scope(policy):
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama", "tiny-vit", "gpt2"])
def test_full_remat_gives_the_same_gradients(name):
    if name == "gpt2":
        model, task_name = tiny_gpt2(resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1), "causal_lm"
        batch = benchmark_shapes.make_batch(benchmark_shapes.get_spec("tiny-llama", vocab_size=40))
    else:
        spec = benchmark_shapes.get_spec(name, batch_size=4)
        model, task_name = benchmark_shapes.build_model(spec), spec.task
        batch = benchmark_shapes.make_batch(spec)
    batch = jax.tree.map(jnp.asarray, batch)
    expected = _grads(model, batch, task_name, "none")
    for a, b in zip(_grads(model, batch, task_name, "full"), expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # float32 sums reordered


def test_full_remat_recomputes_lora_dropout_with_the_forward_pass_key():
    """LoRA adapters read their dropout key from a scope the task opens around the model call;
    the backward pass is traced after it closed, so the recomputed blocks must see the key the
    forward pass saw (they saw none before: no adapter dropout, gradients off by ~1)."""
    spec = benchmark_shapes.get_spec("tiny-llama", batch_size=4)
    model = benchmark_shapes.build_model(spec)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.5, targets=lora.DEFAULT_TARGETS)
    batch = jax.tree.map(jnp.asarray, benchmark_shapes.make_batch(spec))
    expected = _grads(model, batch, spec.task, "none")
    for a, b in zip(_grads(model, batch, spec.task, "full"), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_full_remat_trains_the_same_on_a_data_fsdp_tensor_mesh_in_bfloat16():
    """The benchmark's train step (AdamW) on 2 x 2 x 2 devices, bf16 compute: the same
    losses with and without recomputation (sharding constraints inside the blocks)."""

    def losses(policy):
        with remat.REMAT.scope(policy):
            spec = benchmark_shapes.get_spec("tiny-llama", "bfloat16", batch_size=8, seq_len=16)
            state, step_fn, batch, _, _ = benchmark.build_step(spec, mesh_shape=(2, 2, 2))
            out = []
            for _ in range(3):
                state, metrics = step_fn(state, batch)
                out.append(float(metrics["loss"]))
        return out

    expected = losses("none")
    assert losses("full") == expected and expected[0] != expected[-1]


def _grads_and_running_stats(model, batch: dict, policy: str) -> tuple[list, list, int]:
    """The image task's gradients (training mode: BatchNorm on batch statistics, dropout and
    drop-connect on), the BatchNorm running statistics after the forward pass, and how many
    blocks the step recomputes (``remat``'s custom_vjp calls in the loss's jaxpr)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)  # as the train step's
    task = tasks.get_task("image_classification")

    def loss(params, rest):
        m = nnx.merge(graphdef, params, rest)
        loss_sum = task.loss_sums(m, batch, jax.random.key(3))[0]
        return loss_sum, nnx.state(m, nnx.BatchStat)

    step = jax.jit(jax.grad(loss, has_aux=True))
    with remat.REMAT.scope(policy):
        grads, stats = step(params, rest)
        recomputed = str(jax.make_jaxpr(loss)(params, rest)).count("custom_vjp_call[")
    return jax.tree.leaves(grads), jax.tree.leaves(stats), recomputed


class _TwoBlocks(EfficientNetLiteConfig):
    """EfficientNet-Lite with two MBConv blocks: a projecting one, then one with a residual
    (drop-connect rate 0.2 at drop_connect_rate=0.4)."""

    def blocks(self) -> list[BlockSpec]:
        return [BlockSpec(32, 16, 3, 1, 1), BlockSpec(16, 16, 3, 1, 6)]


@pytest.mark.parametrize("name", ["tiny-resnet", "efficientnet-lite0"])
def test_full_remat_of_cnn_blocks_keeps_gradients_and_batch_norm_statistics(name):
    """ResNet's residual layers and EfficientNet's MBConv blocks are recomputed too: the same
    gradients, and the running statistics the forward pass updated (the recomputation's own
    update is dropped)."""
    if name == "tiny-resnet":
        spec = benchmark_shapes.get_spec(name, batch_size=4)
        model, batch = benchmark_shapes.build_model(spec), benchmark_shapes.make_batch(spec)
    else:
        cfg = _TwoBlocks(variant=name, num_labels=3, drop_connect_rate=0.4)
        model = EfficientNetForImageClassification(cfg, HeadConfig(), rngs=nnx.Rngs(0))
        rng = np.random.default_rng(0)
        batch = {
            "pixel_values": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
            "labels": np.array([0, 1, 2, 1], np.int32),
            "example_mask": np.ones(4, np.float32),
        }
    batch = jax.tree.map(jnp.asarray, batch)
    grads, stats, none = _grads_and_running_stats(model, batch, "none")
    grads_full, stats_full, blocks = _grads_and_running_stats(model, batch, "full")
    assert (none, blocks) == (0, 2)  # tiny-resnet: depths (1, 1)
    assert len(stats) > 4 and len(stats_full) == len(stats)
    # float32 sums reordered: the gradients of biases that BatchNorm cancels are 0 plus noise
    # from the largest gradients' rounding.
    atol = 1e-6 * max(float(np.abs(g).max()) for g in grads)
    for a, b in zip(grads_full + stats_full, grads + stats, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)


def _temp_bytes(name: str, policy: str, **overrides) -> int:
    """The compiled train step's temporary buffers (the benchmark's step: AdamW)."""
    with remat.REMAT.scope(policy):
        spec = benchmark_shapes.get_spec(name, batch_size=4, **overrides)
        state, step_fn, batch, _, _ = benchmark.build_step(spec)
        compiled = step_fn.lower(state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_per_layer_is_the_block_input_only():
    """Each extra layer adds its kept activations to the step's temporary buffers: without
    remat the attention probabilities and MLP activations (5.5 MB a layer here), with it about
    the block's input [B, T, H] (64 kB; 73 kB measured), because the recomputation waits for
    the backward pass (jax.checkpoint left it early on XLA CPU: no saving)."""
    shape = dict(seq_len=256, hidden_size=16)
    per_layer = {}
    for policy in ("none", "full"):
        temps = [_temp_bytes("tiny-llama", policy, num_hidden_layers=n, **shape) for n in (2, 6)]
        per_layer[policy] = (temps[1] - temps[0]) / 4
    block_input = 4 * 256 * 16 * 4
    assert per_layer["full"] < 2 * block_input < 0.05 * per_layer["none"], per_layer


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="remat.*'dots'.*'none', 'full'"):
        remat.REMAT.set("dots")
