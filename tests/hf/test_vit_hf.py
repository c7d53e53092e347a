"""ViT import/export against transformers (PyTorch): tiny random models, full-size shapes."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sft_jax.hf import io
from sft_jax.hf.mapping import flat_params
from sft_jax.hf.vit import export_vit, load_vit, read_image_spec
from sft_jax.models.heads import HeadConfig
from sft_jax.models.vit import ViTConfig, ViTForImageClassification

TOL = 1e-4
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
    image_size=32, patch_size=8,
)  # fmt: skip
CASES = {
    "gelu": TINY,
    "gelu_new_no_qkv_bias_eps": dict(
        TINY, hidden_act="gelu_new", qkv_bias=False, layer_norm_eps=1e-6, num_hidden_layers=1
    ),
}


def _torch_model(cls, config, num_labels=None, seed=0, **kwargs):
    """A random HF ViT whose weights are large enough to make parity meaningful."""
    torch.manual_seed(seed)
    kw = {} if num_labels is None else {"num_labels": num_labels}
    cfg = transformers.ViTConfig(**config, **kw, attn_implementation="eager")
    model = cls(cfg, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "layernorm" in name and "weight" in name
                                                 else 0.0))  # fmt: skip
    return model


def _images(b=2, size=32, seed=0):
    """NHWC float32 for us; the same pixels NCHW for torch."""
    x = np.random.RandomState(seed).randn(b, size, size, 3).astype(np.float32)
    return x, torch.tensor(x.transpose(0, 3, 1, 2))


def _max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_classifier_logits_match_transformers(case, tmp_path):
    ref = _torch_model(transformers.ViTForImageClassification, CASES[case], num_labels=5)
    ref.save_pretrained(tmp_path)
    ours = load_vit(tmp_path)  # the head comes from the checkpoint
    assert ours.num_labels == 5 and ours.label_names == tuple(f"LABEL_{i}" for i in range(5))
    x, xt = _images()
    with torch.no_grad():
        want = ref(xt).logits.numpy()
    diff = _max_diff(ours(jnp.asarray(x)), want)
    print(f"vit {case} classifier logits max abs diff {diff:.2e}")
    assert diff <= TOL


def test_backbone_with_new_head_matches_transformers(tmp_path):
    ref = _torch_model(transformers.ViTModel, TINY)  # with its pooler, which we ignore
    ref.save_pretrained(tmp_path)
    assert any(k.startswith("pooler.") for k in io.read_safetensors(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"no classifier.*config\.json.*ViTModel"):
        load_vit(tmp_path)
    ours = load_vit(tmp_path, num_labels=3, seed=1)
    assert ours.num_labels == 3 and ours.label_names is None
    x, xt = _images()
    with torch.no_grad():
        want = ref(xt).last_hidden_state.numpy()  # after the final layernorm
    seq_diff = _max_diff(ours.vit.encode(jnp.asarray(x)), want)
    cls_diff = _max_diff(ours.vit(jnp.asarray(x)), want[:, 0])
    print(f"vit backbone sequence {seq_diff:.2e} [CLS] features {cls_diff:.2e}")
    assert seq_diff <= TOL and cls_diff <= TOL
    assert ours(jnp.asarray(x)).shape == (2, 3)


def test_dropout_only_in_training_mode(tmp_path):
    cfg = ViTConfig(**TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = ViTForImageClassification(cfg, HeadConfig(num_labels=3, dropout=0.1), rngs=nnx.Rngs(0))
    x, key = jnp.asarray(_images()[0]), jax.random.key(0)
    base = np.asarray(model(x))
    np.testing.assert_array_equal(np.asarray(model(x, dropout_rng=key)), base)  # eval mode
    np.testing.assert_array_equal(np.asarray(model(x, train=True)), base)  # no key
    dropped = np.asarray(model(x, train=True, dropout_rng=key))
    assert _max_diff(dropped, base) > 1e-3
    np.testing.assert_array_equal(np.asarray(model(x, train=True, dropout_rng=key)), dropped)


def test_export_round_trip_through_transformers(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _torch_model(transformers.ViTModel, TINY).save_pretrained(src)
    ours = load_vit(src, num_labels=3, seed=2)
    x, xt = _images()
    want = np.asarray(ours(jnp.asarray(x)))
    spec = read_image_spec(src)  # no preprocessor_config.json: image_size and 0.5 / 0.5
    assert (spec.size, spec.mean, spec.std) == (32, (0.5,) * 3, (0.5,) * 3)
    export_vit(ours, out, label_names=["cat", "dog", "eel"], image_spec=spec)

    ref, info = transformers.AutoModelForImageClassification.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert type(ref).__name__ == "ViTForImageClassification"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert ref.config.id2label == {0: "cat", 1: "dog", 2: "eel"}
    with torch.no_grad():
        diff = _max_diff(ref.eval()(xt).logits.numpy(), want)
    print(f"exported vit in transformers: logits max abs diff {diff:.2e}")
    assert diff <= TOL

    again = load_vit(out)
    assert again.label_names == ("cat", "dog", "eel")
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(x))), want)
    round_spec = read_image_spec(out)
    assert (round_spec.size, round_spec.mean, round_spec.std) == (32, (0.5,) * 3, (0.5,) * 3)
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    # The evaluation view: shortest edge to 32, centre crop 32 x 32 (tests/data/test_resize.py).
    assert (processor.size["shortest_edge"], processor.crop_size["height"]) == (32, 32)


def test_errors(tmp_path):
    src = tmp_path / "src"
    _torch_model(transformers.ViTForImageClassification, TINY, num_labels=2).save_pretrained(src)
    tensors = io.read_safetensors(src / io.SAFETENSORS_NAME)

    def write(name, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        io.write_safetensors(tensors, d / "model.safetensors")
        return d

    name = "vit.embeddings.position_embeddings"  # (1, 17, 32): 16 patches + [CLS]
    bad = write("bad_shape", {**tensors, name: np.zeros((1, 50, 32), np.float32)})
    with pytest.raises(ValueError) as e:
        load_vit(bad)
    msg = str(e.value)
    assert name in msg and "(1, 50, 32)" in msg and "(1, 17, 32)" in msg and str(bad) in msg

    extra = write("extra", {**tensors, "vit.encoder.layer.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unused.*\n.*vit\.encoder\.layer\.0\.extra\.weight"):
        load_vit(extra)

    mlp = load_vit(src, num_labels=4, head="mlp", head_hidden=8)
    assert mlp(jnp.asarray(_images()[0])).shape == (2, 4)
    with pytest.raises(ValueError, match="'mlp' head.*single Linear"):
        export_vit(mlp, tmp_path / "mlp_out")

    with pytest.raises(ValueError, match=r"\(2, 48, 48, 3\).*\[B, 32, 32, 3\].*resize"):
        mlp(jnp.zeros((2, 48, 48, 3)))


def test_read_image_spec(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 384}))
    assert read_image_spec(tmp_path).size == 384
    path = tmp_path / "preprocessor_config.json"
    # google/vit-base-patch16-224's processor
    path.write_text(json.dumps({"size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3,
                                "image_std": [0.5] * 3, "do_center_crop": False,
                                "crop_size": 100}))  # fmt: skip
    spec = read_image_spec(tmp_path)
    assert (spec.size, spec.mean, spec.std, spec.source) == (224, (0.5,) * 3, (0.5,) * 3, str(path))


def _param_count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def test_vit_b16_shapes_and_parameter_count():
    """Full-size ViT-B/16 abstractly: logits shape and HF's parameter count (86,567,656)."""
    cfg = ViTConfig.vit_b16()
    model = nnx.eval_shape(lambda: ViTForImageClassification(cfg, HeadConfig(), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    ours = _param_count(nnx.state(model, nnx.Param))
    with torch.device("meta"):  # shapes only, no memory
        ref = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000))
    assert ours == sum(p.numel() for p in ref.parameters()) == 86_567_656


def test_layer_structure_covers_every_weight_once():
    model = nnx.eval_shape(
        lambda: ViTForImageClassification(
            ViTConfig(**TINY), HeadConfig(num_labels=3), rngs=nnx.Rngs(0)
        )
    )
    s = model.layer_structure
    patterns = [s.blocks, s.bottom, s.top, s.head]
    paths = [p.replace(".", "/") for p in flat_params(model)]
    for path in paths:
        assert sum(bool(re.search(p, path)) for p in patterns) == 1, path
    assert {int(m.group(1)) for p in paths if (m := re.search(s.blocks, p))} == {0, 1}
    assert any(re.search(s.top, p) for p in paths) and any(re.search(s.bottom, p) for p in paths)
