"""Parameter-group policies: presets over real model parameter trees (BERT, Llama, GPT-2, a tiny
CNN), multipliers, LLRD, gradual unfreezing in the real train step, LoRA ranks, errors."""

import re

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import image_cls, text_cls
from sft_jax import freezing, lora, optim, policies, sharding, steps, tree_util
from sft_jax.models.bert import BertConfig, BertForSequenceClassification
from sft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sft_jax.tasks import ImageClassificationTask
from sft_jax.train_state import (
    StepSetup,
    create_train_state,
    shardings_of,
    split_model,
    stats_mask,
)
from tests.tiny_image import TinyImageClassifier, image_batch


def bert(num_layers=2):
    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    return BertForSequenceClassification(cfg, 3, rngs=nnx.Rngs(0))


def llama(tied=False):
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


def gpt2():
    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    return GPT2LMHeadModel(cfg, rngs=nnx.Rngs(0))


def groups_of(model, policy, **kw):
    _, params = split_model(model)
    return freezing.param_groups(
        params, policy, structure=freezing.structure_for(model), never=stats_mask(model), **kw
    )


def flat(tree):
    return tree_util.flatten_to_dict(tree)


def trained(groups):
    return sorted(p for p, t in flat(groups.trainable).items() if t)


@pytest.mark.parametrize("make", [bert, llama, gpt2, TinyImageClassifier])
def test_layer_structure_covers_every_parameter_once(make):
    model = make()
    s = freezing.structure_for(model)
    assert s is not None
    _, params = split_model(model)
    parts = [s.blocks, s.bottom, s.top, s.head]
    for path in flat(params):
        hits = [p for p in parts if p and re.search(p, path)]
        assert len(hits) == 1, (path, hits)


def test_bitfit_and_layernorm_only_on_bert():
    model = bert()
    params = flat(split_model(model)[1])
    head = ["classifier/bias", "classifier/kernel"]
    biases = [p for p in params if p.endswith("/bias")]
    norms = [p for p in params if "LayerNorm/" in p]
    assert len(norms) == 2 * (1 + 2 * 2)  # embeddings + 2 per layer, scale and bias
    assert trained(groups_of(model, "bitfit")) == sorted(set(biases) | set(head))
    assert trained(groups_of(model, "layernorm_only")) == sorted(norms + head)
    # The pooler's bias is a bias; its kernel, like every other kernel / embedding, is frozen.
    assert "bert/pooler/dense/bias" in biases


def test_layernorm_only_takes_batch_norm_scales_not_statistics():
    assert trained(groups_of(TinyImageClassifier(), "layernorm_only")) == [
        "backbone/blocks/0/bn/bias", "backbone/blocks/0/bn/scale",
        "backbone/blocks/1/bn/bias", "backbone/blocks/1/bn/scale",
        "backbone/stem/bn/bias", "backbone/stem/bn/scale",
        "classifier/dense/bias", "classifier/dense/kernel",
    ]  # fmt: skip


def test_norm_pattern_on_every_family():
    pattern = re.compile(policies.NORM_PATTERN)
    for make, expected in ((llama, 2 * 2 + 1), (gpt2, 2 * (2 * 2 + 1))):
        paths = flat(split_model(make())[1])
        assert sum(bool(pattern.search(p)) for p in paths) == expected
    # The LM head is pretrained: the parameter-efficient presets leave it frozen.
    assert "lm_head/kernel" not in trained(groups_of(llama(), "layernorm_only"))


def test_llrd_multipliers_are_the_geometric_series():
    model = bert(num_layers=3)
    d = 0.8
    g = groups_of(model, f"llrd:{d}")
    assert all(flat(g.trainable).values()) and g.unfreeze_step is None
    expected = {"classifier/": 1.0, "bert/pooler/": 1.0, "bert/encoder/layer/2/": d,
                "bert/encoder/layer/1/": d**2, "bert/encoder/layer/0/": d**3,
                "bert/embeddings/": d**4}  # fmt: skip
    for path, mult in flat(g.lr_mult).items():
        (want,) = [m for prefix, m in expected.items() if path.startswith(prefix)]
        assert mult == want, path
    assert set(flat(g.wd_mult).values()) == {1.0}


def test_llrd_sgd_update_is_minus_lr_times_multiplier_times_gradient():
    model = llama()
    _, params = split_model(model)
    g = groups_of(model, "llrd:0.5")
    cfg = opt_cfg(name="sgd", momentum=0.0, learning_rate=0.1, grad_clip_norm=0.0)
    tx, _ = optim.build_optimizer(cfg, g, total_steps=10)
    grads = jax.tree.map(lambda p: np.random.default_rng(p.size).normal(size=p.shape), params)
    grads = jax.tree.map(lambda x: x.astype(np.float32), grads)
    updates, _ = tx.update(grads, tx.init(params), params)
    mults = flat(g.lr_mult)
    assert mults["model/layers/1/mlp/up_proj/kernel"] == 0.5
    assert mults["model/layers/0/mlp/up_proj/kernel"] == 0.25
    assert mults["model/embed_tokens/embedding"] == 0.125
    assert mults["lm_head/kernel"] == mults["model/norm/scale"] == 1.0
    for path, u in flat(updates).items():
        np.testing.assert_allclose(u, -0.1 * mults[path] * flat(grads)[path], rtol=1e-6)


def test_explicit_rules_with_multipliers_come_before_the_preset():
    model = bert()
    g = groups_of(model, "train_top:1", rules=(("^classifier/", True, 10.0, 0.0),))
    lr, wd = flat(g.lr_mult), flat(g.wd_mult)
    assert lr["classifier/kernel"] == 10.0 and wd["classifier/kernel"] == 0.0
    assert lr["bert/encoder/layer/1/output/dense/kernel"] == 1.0
    assert lr["bert/encoder/layer/0/output/dense/kernel"] == 0.0  # frozen by train_top:1
    # Two trainable groups + frozen, one optimizer state per trainable group only.
    tx, _ = optim.build_optimizer(opt_cfg(), g, total_steps=10)
    inner = tx.init(split_model(model)[1])[-1].inner_states
    assert sorted(inner) == ["frozen", "group_0", "train"]


def test_groups_from_config_reads_policy_and_rules():
    model = bert()
    _, params = split_model(model)
    cfg = text_cls.get_config().freeze
    cfg.unlock()
    cfg.policy, cfg.rules = "llrd:0.5", (("^bert/pooler/", False),)
    g = freezing.groups_from_config(cfg, params, model)
    assert not flat(g.trainable)["bert/pooler/dense/kernel"]
    assert flat(g.lr_mult)["bert/embeddings/word_embeddings/embedding"] == 0.125


def test_unfreeze_steps_order():
    model = TinyImageClassifier()
    _, params = split_model(model)
    steps_ = flat(
        freezing.unfreeze_steps(params, model.layer_structure, 3, never=stats_mask(model))
    )
    assert steps_["classifier/dense/kernel"] == 0
    assert steps_["backbone/blocks/1/conv/kernel"] == 3  # the last block first
    assert steps_["backbone/blocks/0/bn/scale"] == 6
    assert steps_["backbone/stem/conv/kernel"] == 9  # bottom (and top) last
    assert steps_["backbone/stem/bn/mean"] == 0  # statistics never train


def opt_cfg(**kw) -> ml_collections.ConfigDict:
    c = image_cls.get_config().optimizer
    c.unlock()
    c.update(warmup_ratio=0.0, schedule="constant")
    c.update(kw)
    return c


def test_gradual_unfreezing_in_the_train_step():
    lr, k = 0.01, 3
    model = TinyImageClassifier()
    _, params = split_model(model)
    stats = stats_mask(model)
    g = freezing.param_groups(
        params, f"gradual_unfreeze:{k}", structure=model.layer_structure, never=stats
    )
    # Layers unfrozen later keep inference-mode BatchNorm (statistics never drift).
    frozen_bn = freezing.configure_batch_norm(model, g.trainable, "auto", g.unfreeze_step)
    assert frozen_bn == 3 and model.backbone.stem.bn.frozen
    graphdef, _ = split_model(model)
    tx, lr_fn = optim.build_optimizer(opt_cfg(learning_rate=lr, weight_decay=0.0), g, 100)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state = create_train_state(model, tx, mesh, seed=0)
    setup = StepSetup(graphdef, tx, g.trainable, lr_fn, mesh, shardings_of(state),
                      sharding.batch_sharding(mesh), stats=stats)  # fmt: skip
    step_fn = steps.make_train_step(setup, ImageClassificationTask())
    start, never = flat(jax.device_get(state.params)), flat(stats)
    first = flat(g.unfreeze_step)
    assert sorted(set(first.values())) == [0, 3, 6, 9]
    prev = start
    for u in range(11):  # update u is applied with optimizer count u
        batch = sharding.put_batch(image_batch(seed=u), setup.batch_sharding)
        state, _ = step_fn(state, batch)
        now = flat(jax.device_get(state.params))
        mus = {}
        for _, mu in optax.tree_utils.tree_get_all_with_path(state.opt_state, "mu"):
            mus.update(flat(mu))
        for path, s in first.items():
            if never[path]:  # running statistics: all in inference-mode layers here
                np.testing.assert_array_equal(now[path], start[path])
                continue
            assert (not np.array_equal(now[path], start[path])) == (u >= s), (u, path)
            assert bool(np.any(np.asarray(mus[path]))) == (u >= s), (u, path)
            if u == s and s > 0:  # a fresh Adam: the first update has magnitude ~lr
                delta = np.abs(now[path] - prev[path])
                np.testing.assert_allclose(np.median(delta), lr, rtol=0.02)
        prev = now


def test_lora_rank_preset_trains_adapters_and_task_head():
    assert freezing.lora_rank("lora:8") == 8
    assert freezing.lora_rank("lora") is None and freezing.lora_rank("full") is None
    assert freezing.lora_rank([("^x", True)]) is None
    with pytest.raises(ValueError, match="lora:RANK with RANK >= 1"):
        freezing.lora_rank("lora:0")
    model = bert()
    lora.apply_lora(model, rank=2, alpha=4.0, targets=(r"(^|/)(query|value)$",))
    got = trained(groups_of(model, "lora:2"))
    assert got == sorted(
        [f"bert/encoder/layer/{i}/attention/self/{m}/lora_{ab}" for i in range(2)
         for m in ("query", "value") for ab in "ab"] + ["classifier/bias", "classifier/kernel"]
    )  # fmt: skip
    lm = llama()
    lora.apply_lora(lm, rank=2, alpha=4.0, targets=lora.DEFAULT_TARGETS)
    assert all(p.endswith(("lora_a", "lora_b")) for p in trained(groups_of(lm, "lora:2")))
    with pytest.raises(ValueError, match="matched no parameter"):  # adapters not applied
        groups_of(llama(), "lora:2")


def test_lora_policy_without_adapters_names_the_key_to_set():
    # freeze.policy=lora with lora.rank=0 inserts no adapters: say what to set, not just a regex.
    with pytest.raises(ValueError, match=r"freeze.policy='lora' .* set lora.rank > 0"):
        groups_of(llama(), "lora")
    with pytest.raises(ValueError, match="apply_lora_for_policy"):
        groups_of(llama(), "lora:2")


def test_tied_gpt2_depth_presets():
    g = groups_of(gpt2(), "llrd:0.5")
    lr = flat(g.lr_mult)
    assert lr["transformer/wte/embedding"] == lr["transformer/wpe/embedding"] == 0.125
    assert lr["transformer/ln_f/scale"] == 1.0 and lr["transformer/h/1/ln_1/scale"] == 0.5
    assert trained(groups_of(gpt2(), "train_top:1")) == sorted(
        p
        for p in flat(split_model(gpt2())[1])
        if p.startswith(("transformer/h/1/", "transformer/ln_f/"))
    )


def test_gradual_unfreezing_of_tied_decoders_starts_with_the_final_norm():
    """No head parameter to start with: the final norm trains from step 0 (it was nothing)."""
    for model, top in ((llama(tied=True), "model/norm/"), (gpt2(), "transformer/ln_f/")):
        first = flat(groups_of(model, "gradual_unfreeze:2").unfreeze_step)
        assert sorted(p for p, s in first.items() if s == 0) == sorted(
            p for p in first if p.startswith(top)
        )
    untied = flat(groups_of(llama(), "gradual_unfreeze:2").unfreeze_step)
    assert [p for p, s in untied.items() if s == 0] == ["lm_head/kernel"]


def test_head_only_trains_the_lm_head_tied_or_not():
    assert trained(groups_of(llama(), "head_only")) == ["lm_head/kernel"]
    # Tied weights: the token embedding is the LM head (and the input embedding).
    assert trained(groups_of(llama(tied=True), "head_only")) == ["model/embed_tokens/embedding"]
    assert trained(groups_of(gpt2(), "head_only")) == ["transformer/wte/embedding"]
    # The depth presets keep the tied embedding in the bottom.
    assert freezing.structure_for(llama()).tied_head is None
    frozen = set(flat(split_model(llama(tied=True))[1])) - set(
        trained(groups_of(llama(tied=True), "freeze_embeddings"))
    )
    assert frozen == {"model/embed_tokens/embedding"}


def test_bitfit_on_a_model_without_biases_says_so():
    with pytest.raises(ValueError, match=r"'bitfit' leaves no trainable parameter.*bias"):
        groups_of(llama(tied=True), "bitfit")


@pytest.mark.parametrize(
    "policy, message",
    [
        ("llrd", "write llrd:DECAY"),
        ("llrd:1.5", r"llrd:1.5'?: write llrd:DECAY with 0 < DECAY <= 1"),
        ("llrd:x", "write llrd:DECAY"),
        ("gradual_unfreeze:0", "write gradual_unfreeze:K with K >= 1"),
        ("gradual_unfreez:2", r"Unknown freezing preset 'gradual_unfreez:2'.*gradual_unfreeze:K"),
        ("bitfitt", "Unknown freezing preset 'bitfitt'"),
        ("train_top:9", "train_top:9: the model has 2 blocks"),
    ],
)
def test_preset_errors_name_the_preset(policy, message):
    with pytest.raises(ValueError, match=message):
        groups_of(bert(), policy)


def test_structure_needed_and_rule_errors():
    _, params = split_model(bert())
    with pytest.raises(ValueError, match="'llrd:0.9' needs a model with a LayerStructure"):
        freezing.param_groups(params, "llrd:0.9")
    with pytest.raises(ValueError, match="freeze rule 0 must be"):
        freezing.param_groups(params, "full", rules=(("^classifier/", True, 2.0),))
    with pytest.raises(ValueError, match="freeze rule 0 .*lr_mult must be > 0"):
        freezing.param_groups(params, "full", rules=(("^classifier/", True, 0.0, 1.0),))
    with pytest.raises(ValueError, match=r"matched no parameter: \['\^decoder/'\]"):
        freezing.param_groups(params, "full", rules=(("^decoder/", True, 2.0, 1.0),))
