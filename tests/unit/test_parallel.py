"""Parallelism on 8 fake CPU devices: one device, data parallel, FSDP, tensor parallel, mixed
meshes and pmap give the same training; FSDP divides memory; TP splits the projections;
checkpoints move between meshes.

Tiny models (hidden 32, 4 heads of 8, MLP 64, vocab 64) so that every sharded dimension divides
by 8. Tolerance of the loss trajectories: rtol 1e-5, atol 1e-6 (float32; the meshes only reorder
reductions). Final parameters agree within 5% of one AdamW step (``0.05 * LR``): Adam's
normalization turns last-bit differences of near-zero gradient entries into visible ones.
"""

import collections
import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sft_jax import checkpoint as ckpt
from sft_jax import collectives, sharding, steps, tree_util
from sft_jax.models import activation_sharding
from sft_jax.models.bert import BertConfig, BertForSequenceClassification
from sft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sft_jax.tasks import CausalLMTask, ClassificationTask, batch_units
from sft_jax.train_state import StepSetup, create_train_state, shardings_of

VOCAB, HIDDEN, HEADS, MLP, LAYERS = 64, 32, 4, 64, 2
B, T, NUM_LABELS, LR, NUM_STEPS = 16, 8, 3, 1e-2, 5
LM_KEYS = ("input_ids", "targets", "target_mask", "segment_ids", "positions")
MESHES = {
    "data": (8, 1, 1),
    "fsdp": (1, 8, 1),
    "tensor": (1, 1, 8),
    "data_tensor": (2, 1, 4),
    "mixed": (2, 2, 2),
}
RTOL, ATOL = 1e-5, 1e-6


def tiny_bert() -> BertForSequenceClassification:
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=MLP, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(cfg, NUM_LABELS, rngs=nnx.Rngs(0))


def tiny_llama(kv_heads: int = 2) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


def cls_batch(seed: int) -> dict[str, np.ndarray]:
    """Random classification batch [B, T]; padding rows 5-7 and 13 (uneven per device)."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(3, T + 1, B)
    attention_mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)  # [B, T]
    example_mask = np.ones(B, np.float32)
    example_mask[[5, 6, 7, 13]] = 0.0
    return {
        "input_ids": rng.randint(1, VOCAB, (B, T)).astype(np.int32) * attention_mask,
        "attention_mask": attention_mask,
        "token_type_ids": np.zeros((B, T), np.int32),
        "labels": rng.randint(0, NUM_LABELS, B).astype(np.int32),
        "example_mask": example_mask,
    }


def lm_row(rng: np.random.RandomState) -> dict[str, np.ndarray]:
    """One packed row [T]: random segments, targets shifted within each, ~70% carry loss."""
    out = {k: np.zeros(T, np.int32) for k in LM_KEYS}
    start, seg = 0, 1
    while start < T - 1:
        n = rng.randint(2, T - start + 1)
        ids, sl = rng.randint(1, VOCAB, n), slice(start, start + n)
        out["input_ids"][sl], out["segment_ids"][sl], out["positions"][sl] = ids, seg, range(n)
        out["targets"][start : start + n - 1] = ids[1:]
        out["target_mask"][start : start + n - 1] = rng.rand(n - 1) < 0.7
        start, seg = start + n, seg + 1
        if rng.rand() < 0.3:  # leave the rest of the row as padding
            break
    return out


def lm_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    rows = [lm_row(rng) for _ in range(B)]
    return {k: np.stack([r[k] for r in rows]) for k in LM_KEYS}  # [B, T] each


CASES = {
    "bert": (tiny_bert, ClassificationTask(), cls_batch),
    "llama": (tiny_llama, CausalLMTask(), lm_batch),
}


def build(name: str, mesh_shape=(1, 1, 1), seed: int = 0, model_fn=None):
    """``(state, setup, task)`` as the trainer assembles them, with plain AdamW (``model_fn``:
    another model of ``name``'s task)."""
    default_fn, task, _ = CASES[name]
    model = (model_fn or default_fn)()
    mesh = sharding.make_mesh(mesh_shape)
    graphdef, params = nnx.split(model, nnx.Param)
    trainable = jax.tree.map(lambda _: True, nnx.to_pure_dict(params))
    tx = optax.adamw(LR, weight_decay=0.01)
    state = create_train_state(model, tx, mesh, seed=seed)
    setup = StepSetup(
        graphdef, tx, trainable, optax.constant_schedule(LR), mesh, shardings_of(state),
        sharding.batch_sharding(mesh),
    )  # fmt: skip
    return state, setup, task


def train_sharded(name: str, mesh_shape) -> tuple[list[float], dict]:
    """Loss per step of NUM_STEPS jitted steps on ``mesh_shape``, and the final params."""
    state, setup, task = build(name, mesh_shape)
    step = steps.make_train_step(setup, task)
    losses = []
    for i in range(NUM_STEPS):
        host = CASES[name][2](i % 2)
        state, m = step(state, sharding.put_batch(host, setup.batch_sharding))
        assert float(m["nonfinite"]) == 0.0
        assert int(m["units"]) == batch_units(host)[1]  # the global batch's real tokens
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params)


def train_pmap(name: str, accumulation: int = 1) -> tuple[list[float], dict]:
    """As ``train_sharded``, under pmap over all 8 devices with a replicated state."""
    state, setup, task = build(name)
    devices = jax.devices()
    state = sharding.replicate(state, devices)
    step = steps.make_pmap_train_step(setup, task, accumulation, devices)
    losses = []
    for i in range(NUM_STEPS):
        old = state.step
        host = CASES[name][2](i % 2)
        state, m = step(state, sharding.pmap_batch(host, len(devices)))
        assert np.all(np.asarray(m["units"]) == batch_units(host)[1])  # summed over devices
        assert old.is_deleted()  # donated as laid out by replicate: no copy on the way in
        loss = np.asarray(m["loss"])  # [D], one copy per device
        assert loss.shape == (8,) and np.all(loss == loss[0])
        assert np.all(np.asarray(m["nonfinite"]) == 0.0)
        losses.append(float(loss[0]))
    return losses, jax.device_get(sharding.unreplicate(state.params))


@functools.cache
def reference(name: str) -> tuple[list[float], dict]:
    return train_sharded(name, (1, 1, 1))


def max_param_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("mode", [*MESHES, "pmap", "pmap_accumulate"])
@pytest.mark.parametrize("name", list(CASES))
def test_same_loss_trajectory_as_one_device(name, mode):
    want, want_params = reference(name)
    if mode.startswith("pmap"):
        got, got_params = train_pmap(name, accumulation=2 if mode == "pmap_accumulate" else 1)
    else:
        got, got_params = train_sharded(name, MESHES[mode])
    diff = max_param_diff(got_params, want_params)
    print(f"{name} {mode}: losses {got}; max |param diff| after {NUM_STEPS} steps {diff:.1e}")
    assert want[4] < want[0] and want[3] < want[1]  # it trains (batches 0 1 0 1 0)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert diff < 0.05 * LR


def test_pmap_nonfinite_skip_is_identical_on_all_devices():
    """A NaN parameter on one device only: every device skips the update and reports it."""
    state, setup, task = build("bert")
    devices = jax.devices()
    state = sharding.replicate(state, devices)
    kernel = np.array(state.params["classifier"]["kernel"])  # [D, HIDDEN, NUM_LABELS]
    kernel[3, 0, 0] = np.nan
    params = jax.tree.map(lambda x: x, state.params)
    params["classifier"]["kernel"] = jax.device_put(
        kernel, state.params["classifier"]["kernel"].sharding
    )
    state = state.replace(params=params)
    before = jax.device_get(state.params)
    step = steps.make_pmap_train_step(setup, task, 1, devices)
    state, m = step(state, sharding.pmap_batch(cls_batch(0), len(devices)))
    np.testing.assert_array_equal(np.asarray(m["nonfinite"]), np.ones(8))
    np.testing.assert_array_equal(np.asarray(state.step), np.ones(8))
    after = jax.device_get(state.params)
    good = [d for d in range(8) if d != 3]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[good], b[good]), after, before)


def per_device_bytes(tree) -> tuple[int, int, int]:
    """(max bytes one device holds, total logical bytes, bytes of fully replicated leaves)."""
    held: collections.Counter = collections.Counter()
    total = replicated = 0
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            assert shard.data.shape == x.sharding.shard_shape(x.shape)
            held[shard.device] += shard.data.nbytes
        total += x.nbytes
        if all(axis is None for axis in x.sharding.spec):
            assert x.ndim <= 1, f"a replicated {x.shape} leaf under FSDP"
            replicated += x.nbytes
    return max(held.values()), total, replicated


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_holds_an_eighth_of_params_and_optimizer_state(name):
    state, _, _ = build(name, MESHES["fsdp"])
    for part, tree in (("params", state.params), ("opt_state", state.opt_state)):
        held, total, replicated = per_device_bytes(tree)
        ratio, slack = held / total, replicated / total
        print(f"{name} {part}: a device holds {ratio:.4f} of {total} bytes (1/8 = 0.125; "
              f"replicated 1-D leaves {slack:.4f})")  # fmt: skip
        assert slack < 0.05
        assert ratio <= 1 / 8 + slack + 1e-9


TP_SPLIT = {
    "bert": {
        "bert.encoder.layer.0.attention.self.query.kernel": P(None, "tensor"),
        "bert.encoder.layer.0.attention.self.key.kernel": P(None, "tensor"),
        "bert.encoder.layer.0.attention.self.value.kernel": P(None, "tensor"),
        "bert.encoder.layer.0.attention.output.dense.kernel": P("tensor", None),
        "bert.encoder.layer.0.intermediate.dense.kernel": P(None, "tensor"),
        "bert.encoder.layer.0.output.dense.kernel": P("tensor", None),
    },
    "llama": {
        "model.layers.0.self_attn.q_proj.kernel": P(None, "tensor"),
        "model.layers.0.self_attn.k_proj.kernel": P(None, "tensor"),
        "model.layers.0.self_attn.v_proj.kernel": P(None, "tensor"),
        "model.layers.0.self_attn.o_proj.kernel": P("tensor", None),
        "model.layers.0.mlp.gate_proj.kernel": P(None, "tensor"),
        "model.layers.0.mlp.up_proj.kernel": P(None, "tensor"),
        "model.layers.0.mlp.down_proj.kernel": P("tensor", None),
    },
}


def flat(tree) -> dict:
    return {".".join(str(k.key) for k in path): x for path, x in jax.tree.leaves_with_path(tree)}


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_parallel_splits_attention_and_mlp_kernels(name):
    state, _, _ = build(name, MESHES["tensor"])
    params = flat(state.params)
    for path, spec in TP_SPLIT[name].items():
        x = params[path]
        assert x.sharding.spec == spec, path
        axis = list(spec).index("tensor")
        assert x.addressable_shards[0].data.shape[axis] == x.shape[axis] // 8, path
    # Mixed mesh: the other kernel dimension goes to fsdp.
    state, _, _ = build(name, MESHES["mixed"])
    params = flat(state.params)
    for path, spec in TP_SPLIT[name].items():
        want = P(*("fsdp" if a is None else a for a in spec))
        assert params[path].sharding.spec == want, path


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
        n_inner=MLP, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "model_fn", [lambda: tiny_llama(kv_heads=4), tiny_gpt2], ids=["llama", "gpt2"]
)
def test_tensor_parallel_moves_no_activations_between_devices(model_fn):
    """Megatron-style TP: with the heads (kv heads too) dividing the tensor axis, the compiled
    step only all-reduces (after o_proj / down_proj and for the gradients) and all-gathers the
    vocab-split logits; no resharding of activations (collective-permute, all-to-all). With 2 kv
    heads on 4 devices GSPMD adds 4 permutes and 6 all-gathers per layer (see DEFAULT_RULES).
    GPT-2's fused c_attn in Hugging Face's column order (q | k | v) cost 14 permutes and 8
    all-to-alls on 4 devices; stored head by head it costs none."""
    from tests.unit.test_steps import collective_counts

    state, setup, task = build("llama", (1, 1, 4), model_fn=model_fn)
    step = steps.make_train_step(setup, task)
    batch = sharding.put_batch(lm_batch(0), setup.batch_sharding)
    ops = collective_counts(step.lower(state, batch).compile().as_text())
    assert ops["collective-permute"] == ops["all-to-all"] == ops["reduce-scatter"] == 0, ops
    assert ops["all-reduce"] >= 1 and ops["all-gather"] <= 2, ops


@pytest.mark.parametrize(
    "name, mesh_shape",
    [("bert", MESHES["fsdp"]), ("llama", MESHES["fsdp"]), ("llama", MESHES["mixed"])],
)
def test_sharded_step_moves_weights_and_gradients_not_activations(name, mesh_shape):
    """The collectives of the compiled step return at most twice the parameter bytes per
    device: the weights gathered once, the gradients summed once (and on the mixed mesh the
    tensor-parallel all-reduces of activations, which are small here). The hidden states between
    blocks keep the batch's layout (``activation_sharding``); without that constraint GSPMD split
    them along the hidden dimension over fsdp, as the embedding table is split, and the step's
    collectives returned 5.0x (bert), 7.3x (llama) and 3.7x (llama, mixed mesh) the parameter
    bytes."""
    state, setup, task = build(name, mesh_shape)
    step = steps.make_train_step(setup, task)
    batch = sharding.put_batch(CASES[name][2](0), setup.batch_sharding)
    traffic = collectives.collective_traffic(step.lower(state, batch).compile().as_text())
    moved = sum(c["bytes"] for c in traffic.values())
    assert moved <= 2 * tree_util.nbytes(state.params), traffic
    assert traffic["all-to-all"]["count"] == 0 or name == "bert", traffic


def test_hidden_states_between_blocks_keep_the_batch_layout():
    """Inside ``activation_sharding.scope`` each block's input and the last block's output are
    constrained to rows over (data, fsdp), other dimensions whole; outside it, or for rows the
    mesh cannot split, nothing is constrained."""
    mesh = sharding.make_mesh(MESHES["mixed"])
    model, batch = tiny_llama(), lm_batch(0)

    def constraints(ids) -> list:
        # A new function each time: make_jaxpr caches traces by function, and the scope is read
        # while tracing.
        eqns = jax.make_jaxpr(lambda x: model(x))(ids).jaxpr.eqns
        return [e.params["sharding"] for e in eqns if e.primitive.name == "sharding_constraint"]

    assert constraints(batch["input_ids"]) == []
    with activation_sharding.scope(sharding.batch_sharding(mesh)):
        found = constraints(batch["input_ids"])
        assert len(found) == LAYERS + 1
        assert all(s.spec == P(("data", "fsdp"), None, None) and s.mesh == mesh for s in found)
        assert constraints(batch["input_ids"][:3]) == []  # 3 rows over 4 devices: left alone


def test_checkpoint_moves_between_meshes(tmp_path):
    """Saved under FSDP (1, 8, 1), restored under (8, 1, 1) and (1, 1, 1): identical values,
    the new mesh's shardings."""
    state, setup, task = build("llama", MESHES["fsdp"])
    step = steps.make_train_step(setup, task)
    for i in range(2):
        state, _ = step(state, sharding.put_batch(lm_batch(i), setup.batch_sharding))
    opts = ckpt.CheckpointOptions(keep_latest=1, keep_best=0, async_save=False)
    mngr = ckpt.make_manager(str(tmp_path / "ckpt"), opts)
    ckpt.save(mngr, state, {"next_batch": 2}, metrics={"macro_f1": 0.0})
    mngr.wait_until_finished()
    saved = jax.device_get(state)
    for mesh_shape in ((8, 1, 1), (1, 1, 1)):
        like, _, _ = build("llama", mesh_shape, seed=1)
        restored, progress = ckpt.restore_train_state(mngr, 2, like)
        assert progress == {"next_batch": 2}
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
        for r, w in zip(jax.tree.leaves(restored), jax.tree.leaves(like)):
            assert r.sharding.is_equivalent_to(w.sharding, r.ndim), (r.sharding, w.sharding)
    mngr.close()
