"""LoRA: identity at init, exact merge and export, LoRA-only optimizer state, dropout keys."""

import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import text_cls
from sft_jax import freezing, lora, optim, sharding, steps, tree_util
from sft_jax.hf.export import export_model
from sft_jax.hf.llama import load_llama
from sft_jax.models import dropout, layers
from sft_jax.models.bert import BertConfig, BertForSequenceClassification
from sft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sft_jax.tasks import CausalLMTask, ClassificationTask
from sft_jax.train_state import StepSetup, create_train_state, shardings_of
from tests.toy import toy_batch

LLAMA = dict(
    vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
)  # fmt: skip
GPT2 = dict(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
IDS = jnp.asarray([[3, 7, 11, 5, 2, 9], [1, 4, 4, 8, 30, 6]])  # [B=2, T=6]
LLAMA_PROJ = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
              "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")  # fmt: skip
GPT2_PROJ = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")


def perturb(model, seed, scale, only=None):
    """Adds ``scale * normal`` noise to every Param (or those whose path ``only`` accepts)."""
    for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        if only is None or only(name):
            key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
            p.set_value(p[...] + scale * jax.random.normal(key, p.shape, p.dtype))
    return model


def tiny(family="llama", seed=0):
    """A tiny random model with perturbed norms (nothing trivially symmetric)."""
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**LLAMA), rngs=nnx.Rngs(seed))
    else:
        model = GPT2LMHeadModel(GPT2Config(**GPT2), rngs=nnx.Rngs(seed))
    return perturb(model, seed, 0.3)


def with_lora(family="llama", rank=2, dropout=0.0, trained=False):
    """(base, adapted copy, number of wrapped layers); ``trained``: random nonzero adapters."""
    base = tiny(family)
    model = nnx.clone(base)
    n = lora.apply_lora(model, rank=rank, alpha=4.0, targets=lora.DEFAULT_TARGETS, dropout=dropout)
    if trained:
        perturb(model, 1, 0.5, only=lora.is_lora_param)
    return base, model, n


def flat_params(model):
    return tree_util.flatten_to_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "family, blocks, projections",
    [("llama", "model/layers", LLAMA_PROJ), ("gpt2", "transformer/h", GPT2_PROJ)],
    ids=["llama", "gpt2"],
)
def test_untrained_adapter_changes_nothing(family, blocks, projections):
    base, model, n = with_lora(family)
    assert n == 2 * len(projections)
    np.testing.assert_array_equal(model(IDS), base(IDS))
    before, after = flat_params(base), flat_params(model)
    added = {f"{blocks}/{i}/{m}/lora_{ab}" for i in (0, 1) for m in projections for ab in "ab"}
    assert set(after) == set(before) | added  # base paths unchanged, adapters beside them
    for path in before:
        np.testing.assert_array_equal(after[path], before[path])
    a, b = (
        after[f"{blocks}/0/{projections[0]}/lora_a"],
        after[f"{blocks}/0/{projections[0]}/lora_b"],
    )
    assert a.shape == (16, 2) and b.shape[0] == 2 and not b.any()
    bound = 1 / np.sqrt(16)  # PEFT's kaiming_uniform(a=sqrt(5)) on fan-in 16
    assert 0.5 * bound < np.abs(a).max() <= bound


def test_adapter_shares_kernel_and_carries_logical_names():
    model = tiny()
    kernel = model.model.layers[0].self_attn.k_proj.kernel
    lora.apply_lora(model, rank=3, alpha=6.0, targets=[r"k_proj$"])
    k_proj = model.model.layers[0].self_attn.k_proj
    assert isinstance(k_proj, lora.LoRADense) and k_proj.kernel is kernel
    assert k_proj.scale == 2.0
    assert k_proj.lora_a.get_metadata()["out_sharding"] == ("embed", None)
    assert k_proj.lora_b.get_metadata()["out_sharding"] == (None, "kv")
    assert type(model.model.layers[0].self_attn.q_proj) is layers.Dense
    salts = [model.model.layers[i].self_attn.k_proj.salt for i in (0, 1)]
    assert salts[0] != salts[1]


def test_adapters_of_bfloat16_kernels_are_float32_and_merge_to_bfloat16():
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    lora.apply_lora(model, rank=2, alpha=4.0, targets=[r"q_proj$"])
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.kernel.dtype == jnp.bfloat16
    assert q_proj.lora_a.dtype == q_proj.lora_b.dtype == jnp.float32
    assert lora.merge_lora(model).model.layers[0].self_attn.q_proj.kernel.dtype == jnp.bfloat16
    lora.apply_lora(model, rank=2, alpha=4.0, targets=[r"k_proj$"], param_dtype=jnp.bfloat16)
    assert model.model.layers[0].self_attn.k_proj.lora_a.dtype == jnp.bfloat16


def rounding(logits: np.ndarray) -> float:
    """Float32 reassociation noise allowed between two ways of computing ``logits`` (merged
    vs separate adapters, jit vs eager): 1e-5 relative to the largest logit; its size depends
    on the CPU's vector width (1.5e-5 on logits of ~2 with AVX2, under 1e-5 with AVX-512)."""
    return 1e-5 * max(1.0, float(np.abs(logits).max()))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_equals_unmerged_and_restores_base_tree(family):
    base, model, _ = with_lora(family, trained=True)
    want = np.asarray(model(IDS))
    assert np.abs(want - np.asarray(base(IDS))).max() > 1e-2  # the adapters do something
    merged = lora.merge_lora(model)
    diff = np.abs(np.asarray(merged(IDS)) - want).max()
    print(f"{family}: merged vs unmerged logits {diff:.2e}")
    assert diff <= rounding(want)
    assert nnx.graphdef(merged) == nnx.graphdef(base)
    assert jax.tree.structure(nnx.to_pure_dict(nnx.state(merged, nnx.Param))) == jax.tree.structure(
        nnx.to_pure_dict(nnx.state(base, nnx.Param))
    )


def test_merged_model_exports_and_reloads(tmp_path):
    _, model, _ = with_lora(trained=True)
    want = np.asarray(model(IDS))
    out = export_model(lora.merge_lora(model), tmp_path / "hf")
    diff = np.abs(np.asarray(load_llama(out)(IDS)) - want).max()
    assert diff <= rounding(want)


def causal_batch(n=4, t=8, vocab=50, seed=0):
    ids = np.random.default_rng(seed).integers(1, vocab, (n, t + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "target_mask": np.ones((n, t), np.int32),
        "segment_ids": np.ones((n, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy(),
    }


def test_lora_preset_keeps_optimizer_state_and_updates_for_adapters_only():
    _, model, _ = with_lora(rank=2, dropout=0.1)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = freezing.trainable_mask(params, "lora")
    flat_mask = tree_util.flatten_to_dict(mask)
    assert flat_mask == {p: lora.is_lora_param(p) for p in flat_mask}
    cfg = text_cls.get_config().optimizer
    cfg.unlock()
    cfg.update(name="adamw", learning_rate=1e-2, warmup_ratio=0.0, schedule="constant")
    tx, lr_fn = optim.build_optimizer(cfg, mask, total_steps=10)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state = create_train_state(model, tx, mesh, seed=0)

    lora_bytes = tree_util.nbytes(jax.tree.map(lambda p, m: p if m else None, params, mask))
    moment_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert lora_bytes > 0 and moment_bytes == 2 * lora_bytes  # AdamW mu and nu, LoRA only

    graphdef = nnx.graphdef(model)
    setup = StepSetup(
        graphdef, tx, mask, lr_fn, mesh, shardings_of(state), sharding.batch_sharding(mesh)
    )
    step_fn = steps.make_train_step(setup, CausalLMTask())
    before = tree_util.flatten_to_dict(jax.device_get(state.params))
    state, metrics = step_fn(state, sharding.put_batch(causal_batch(), setup.batch_sharding))
    after = tree_util.flatten_to_dict(jax.device_get(state.params))
    assert np.isfinite(float(metrics["loss"]))
    for path in before:
        if lora.is_lora_param(path):
            assert not np.array_equal(after[path], before[path]), path
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)


def test_adapter_dropout_follows_the_task_key():
    task, batch = CausalLMTask(), causal_batch(n=2, t=6)
    _, model, _ = with_lora(dropout=0.5, trained=True)
    key0, key1 = jax.random.key(0), jax.random.key(1)
    same = task.logits(model, batch, key0)
    np.testing.assert_array_equal(same, task.logits(model, batch, key0))
    assert np.abs(same - task.logits(model, batch, key1)).max() > 1e-3
    eval_mode = task.logits(model, batch, None)
    np.testing.assert_array_equal(eval_mode, model(batch["input_ids"], positions=batch["positions"],
                                                   segment_ids=batch["segment_ids"]))  # fmt: skip
    assert np.abs(same - eval_mode).max() > 1e-3
    jitted = jax.jit(task.logits)(model, batch, key0)  # the scope works while tracing too
    np.testing.assert_allclose(jitted, same, rtol=1e-5, atol=1e-5)  # float32 reassociation

    _, no_drop, _ = with_lora(dropout=0.0, trained=True)
    np.testing.assert_array_equal(
        task.logits(no_drop, batch, key0), task.logits(no_drop, batch, None)
    )


def test_classification_task_passes_the_key_to_adapters():
    cfg = BertConfig(
        vocab_size=50, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=20, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = BertForSequenceClassification(cfg, 3, rngs=nnx.Rngs(0))
    n = lora.apply_lora(model, rank=2, alpha=2.0, targets=[r"self/(query|value)$"], dropout=0.5)
    assert n == 4
    perturb(model, 1, 0.5, only=lora.is_lora_param)
    task, batch = ClassificationTask(), toy_batch(n=4, t=6)
    key0 = jax.random.key(0)
    dropped = task.logits(model, batch, key0)
    np.testing.assert_array_equal(dropped, task.logits(model, batch, key0))
    assert np.abs(dropped - task.logits(model, batch, jax.random.key(1))).max() > 1e-4
    eval_mode = task.logits(model, batch, None)
    assert np.abs(dropped - eval_mode).max() > 1e-4
    np.testing.assert_array_equal(
        eval_mode, model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    )


def test_dropout_scope_is_scoped():
    assert dropout.scoped_rng(3) is None
    with dropout.dropout_scope(jax.random.key(0)):
        a, b = dropout.scoped_rng(1), dropout.scoped_rng(2)
        assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
        with dropout.dropout_scope(None):
            assert dropout.scoped_rng(1) is None
        assert dropout.scoped_rng(1) is not None
    assert dropout.scoped_rng(1) is None


def test_bad_targets_and_rank_are_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"matched no Dense layer: \['attn_out'\]"):
        lora.apply_lora(model, rank=2, alpha=2.0, targets=[r"q_proj$", "attn_out"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.apply_lora(model, rank=0, alpha=2.0, targets=lora.DEFAULT_TARGETS)
    assert not any(lora.is_lora_param(p) for p in flat_params(model))  # nothing half-applied
    lora.apply_lora(model, rank=2, alpha=2.0, targets=[r"q_proj$"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.apply_lora(model, rank=2, alpha=2.0, targets=[r"proj$"])


def test_apply_from_config():
    cfg = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.05, targets=()))
    model = tiny()
    assert lora.apply_lora_from_config(model, cfg) is model
    assert not any(lora.is_lora_param(p) for p in flat_params(model))
    cfg.rank = 4
    model = lora.apply_lora_from_config(model, cfg)
    q_proj = model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, lora.LoRADense) and q_proj.scale == 4.0 and q_proj.dropout == 0.05
    assert sum(lora.is_lora_param(p) for p in flat_params(model)) == 2 * 2 * len(LLAMA_PROJ)
