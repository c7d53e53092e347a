"""The causal-LM loss: packing is invisible to it, and the shared train step trains with it."""

import jax
import numpy as np
from flax import nnx

from configs import text_cls
from sft_jax import freezing, optim, sharding, steps
from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sft_jax.tasks import CausalLMTask
from sft_jax.train_state import StepSetup, create_train_state, shardings_of

CFG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
A = ([5, 9, 12, 3, 7], [0, 0, 1, 1, 1])  # (ids, loss mask of each token)
B = ([4, 8, 15, 16, 23, 42, 2], [0, 0, 0, 1, 1, 1, 1])


def row(seqs, length):
    """One row holding ``seqs`` back to back: targets shifted within each segment."""
    out = {k: np.zeros(length, np.int32) for k in
           ("input_ids", "targets", "target_mask", "segment_ids", "positions")}  # fmt: skip
    start = 0
    for seg, (ids, mask) in enumerate(seqs, start=1):
        n = len(ids)
        sl = slice(start, start + n)
        out["input_ids"][sl], out["segment_ids"][sl], out["positions"][sl] = ids, seg, range(n)
        out["targets"][start : start + n - 1] = ids[1:]
        out["target_mask"][start : start + n - 1] = mask[1:]  # last token predicts nothing
        start += n
    return out


def stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_packed_loss_equals_unpacked():
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    task = CausalLMTask()
    packed = stack([row([A, B], 16)])
    separate = stack([row([A], 8), row([B], 8)])
    np.testing.assert_array_equal(packed["segment_ids"][0], [1] * 5 + [2] * 7 + [0] * 4)
    np.testing.assert_array_equal(packed["positions"][0, :12], list(range(5)) + list(range(7)))
    np.testing.assert_array_equal(
        packed["target_mask"][0, :12], [0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0]
    )
    lp, sp = task.loss_sums(model, packed, None)
    ls, ss = task.loss_sums(model, separate, None)
    assert float(sp["weight"]) == float(ss["weight"]) == 7.0
    np.testing.assert_allclose(float(lp), float(ls), rtol=1e-5)


def test_train_step_lowers_lm_loss():
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    cfg = text_cls.get_config().optimizer
    cfg.unlock()
    cfg.update(learning_rate=1e-2, warmup_ratio=0.0, schedule="constant")
    graphdef, params = nnx.split(model, nnx.Param)
    mask = freezing.trainable_mask(nnx.to_pure_dict(params), "full")
    tx, lr = optim.build_optimizer(cfg, mask, total_steps=20)
    mesh = sharding.make_mesh((1, 1, 1))
    state = create_train_state(model, tx, mesh, seed=0)
    setup = StepSetup(
        graphdef, tx, mask, lr, mesh, shardings_of(state), sharding.batch_sharding(mesh)
    )
    step = steps.make_train_step(setup, CausalLMTask())
    batch = stack([row([A, B], 16), row([B, A], 16)])
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert jax.tree.leaves(state.params)[0].dtype == np.float32
