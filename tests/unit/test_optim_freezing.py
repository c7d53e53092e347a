import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import text_cls
from sft_jax import freezing, optim

PARAMS = {
    "bert": {
        "embeddings": {
            "word_embeddings": {"embedding": jnp.ones((10, 4))},
            "LayerNorm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        },
        "encoder": {"layer": {0: {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}}},
    },
    "classifier": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
}


def opt_cfg(**kw) -> ml_collections.ConfigDict:
    c = text_cls.get_config().optimizer
    c.unlock()
    c.update(kw)
    return c


def test_decay_mask_excludes_bias_and_layernorm():
    mask = optim.decay_mask(PARAMS)
    assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert not mask["bert"]["embeddings"]["LayerNorm"]["scale"]
    assert not mask["bert"]["embeddings"]["LayerNorm"]["bias"]
    assert mask["bert"]["encoder"]["layer"][0]["dense"]["kernel"]
    assert not mask["bert"]["encoder"]["layer"][0]["dense"]["bias"]
    assert mask["classifier"]["kernel"] and not mask["classifier"]["bias"]


def test_linear_warmup_then_linear_decay_exact():
    lr = optim.schedule(
        opt_cfg(learning_rate=1.0, warmup_ratio=0.0, warmup_steps=2, schedule="linear"),
        total_steps=6,
    )
    np.testing.assert_allclose(
        [float(lr(s)) for s in range(7)], [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    )


def test_warmup_steps_win_over_the_default_ratio():
    cfg = opt_cfg(learning_rate=1.0, warmup_steps=4, schedule="constant")
    assert cfg.warmup_ratio == 0.1  # the config default, ignored once steps are set
    lr = optim.schedule(cfg, total_steps=10)
    np.testing.assert_allclose([float(lr(s)) for s in range(6)], [0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    by_ratio = optim.schedule(opt_cfg(learning_rate=1.0, schedule="constant"), total_steps=10)
    np.testing.assert_allclose([float(by_ratio(s)) for s in range(3)], [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="optimizer.warmup_steps=-1"):
        optim.schedule(opt_cfg(warmup_steps=-1), total_steps=10)


def test_head_only_freezes_encoder_without_optimizer_state():
    mask = freezing.trainable_mask(PARAMS, "head_only")
    assert (
        mask["classifier"]["kernel"] and not mask["bert"]["encoder"]["layer"][0]["dense"]["kernel"]
    )
    tx, _ = optim.build_optimizer(opt_cfg(warmup_ratio=0.0), mask, total_steps=10)
    state = tx.init(PARAMS)
    # Adam moments exist for the 6 head scalars x 2 (kernel 12 + bias 3 = 15 per moment) only.
    n = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert n == 2 * 15
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, state, PARAMS)
    assert float(jnp.abs(updates["bert"]["encoder"]["layer"][0]["dense"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(updates["classifier"]["kernel"]).max()) > 0.0


def test_bad_freeze_policies_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown freezing preset 'nope'"):
        freezing.trainable_mask(PARAMS, "nope")
    with pytest.raises(ValueError, match="matched no parameter"):
        freezing.trainable_mask(PARAMS, [("^decoder/", False)])
    with pytest.raises(ValueError, match="no trainable parameter"):
        freezing.trainable_mask(PARAMS, [(".*", False)])


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_lowers_a_quadratic(name):
    params = {"w": jnp.full((4, 4), 3.0), "bias": jnp.full((4,), -2.0)}
    mask = jax.tree.map(lambda _: True, params)
    lr = 0.05 if name != "lion" else 0.01
    tx, _ = optim.build_optimizer(
        opt_cfg(name=name, learning_rate=lr, warmup_ratio=0.0, schedule="constant"),
        mask,
        total_steps=50,
    )
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    state, start = tx.init(params), loss(params)
    for _ in range(50):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert loss(params) < 0.7 * start


def _trainable_paths(policy):
    from sft_jax import tree_util
    from sft_jax.train_state import split_model, stats_mask
    from tests.tiny_image import TinyImageClassifier

    model = TinyImageClassifier()
    _, params = split_model(model)
    mask = freezing.trainable_mask(
        params, policy, structure=model.layer_structure, never=stats_mask(model)
    )
    return sorted({p.rsplit("/", 1)[0] for p, m in tree_util.flatten_to_dict(mask).items() if m})


def test_depth_presets_over_the_layer_structure():
    head = ["classifier/dense"]
    blocks = ["backbone/blocks/0/bn", "backbone/blocks/0/conv", "backbone/blocks/1/bn",
              "backbone/blocks/1/conv"]  # fmt: skip
    stem = ["backbone/stem/bn", "backbone/stem/conv"]
    assert _trainable_paths("train_top:1") == blocks[2:] + head
    assert _trainable_paths("train_top:0") == head
    assert _trainable_paths("train_top:2") == blocks + head
    assert _trainable_paths("train_bottom:1") == blocks[:2] + stem + head
    assert _trainable_paths("freeze_bottom:1") == blocks[2:] + head
    assert _trainable_paths("freeze_bottom:0") == blocks + head  # the stem counts as bottom
    assert _trainable_paths("full") == blocks + stem + head  # running statistics never train


def test_depth_preset_errors():
    with pytest.raises(ValueError, match="train_top:3: the model has 2 blocks"):
        _trainable_paths("train_top:3")
    with pytest.raises(ValueError, match="write train_top:N"):
        _trainable_paths("train_top:x")
    with pytest.raises(ValueError, match="needs a model with a LayerStructure"):
        freezing.trainable_mask(PARAMS, "train_top:1")
    with pytest.raises(ValueError, match="train_top:N"):
        freezing.trainable_mask(PARAMS, "train_topp:1")


def test_a_plain_mask_still_builds_one_trainable_group():
    """``build_optimizer(cfg, bool_mask, n)`` (the pre-groups call) = groups with multipliers 1."""
    mask = freezing.trainable_mask(PARAMS, "head_only")
    groups = freezing.param_groups(PARAMS, "head_only")
    assert mask == groups.trainable and groups.unfreeze_step is None
    assert set(jax.tree.leaves(groups.lr_mult)) == {0.0, 1.0}
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    out = []
    for g in (mask, groups):
        tx, _ = optim.build_optimizer(opt_cfg(warmup_ratio=0.0), g, total_steps=10)
        state = tx.init(PARAMS)
        assert sorted(state[-1].inner_states) == ["frozen", "train"]
        out.append(tx.update(grads, state, PARAMS)[0])
    jax.tree.map(np.testing.assert_array_equal, *out)
