"""ResNet import/export against transformers (PyTorch): tiny random models, full-size shapes."""

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
from sft_jax.hf.image_models import WEIGHTS
from sft_jax.hf.mapping import export_weights, flat_params
from sft_jax.hf.resnet import RESNET_RULES, export_resnet, load_resnet, read_image_spec
from sft_jax.models.heads import HeadConfig
from sft_jax.models.resnet import ResNetConfig, ResNetForImageClassification

TOL = 1e-4
CASES = {
    # stage 0 keeps the width (identity shortcut), stage 1 projects and downsamples
    "basic": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
    # a second layer in stage 0 (identity shortcut), gelu outside the convs, both downsample flags
    "bottleneck": dict(
        embedding_size=8,
        hidden_sizes=[16, 32],
        depths=[2, 1],
        layer_type="bottleneck",
        hidden_act="gelu",
        downsample_in_first_stage=True,
        downsample_in_bottleneck=True,
    ),  # fmt: skip
}


def _torch_model(cls, case, num_labels=None, seed=0):
    """A random HF ResNet whose BatchNorms (affine and running statistics) all matter."""
    torch.manual_seed(seed)
    kw = {} if num_labels is None else {"num_labels": num_labels}
    model = cls(transformers.ResNetConfig(**CASES[case], **kw))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
                m.running_mean.copy_(0.2 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
                m.num_batches_tracked.fill_(7)  # ignored on import
    return model.eval()


def _images(b=2, size=32, seed=0):
    """NHWC float32 for us; the same pixels NCHW for torch."""
    x = np.random.RandomState(seed).randn(b, size, size, 3).astype(np.float32)
    return x, torch.tensor(x.transpose(0, 3, 1, 2))


def _max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_classifier_logits_match_transformers(case, tmp_path):
    ref = _torch_model(transformers.ResNetForImageClassification, case, num_labels=5)
    ref.save_pretrained(tmp_path)
    ours = load_resnet(tmp_path)  # the head comes from the checkpoint
    assert ours.num_labels == 5 and ours.label_names == tuple(f"LABEL_{i}" for i in range(5))
    x, xt = _images()
    with torch.no_grad():
        want = ref(xt).logits.numpy()
    diff = _max_diff(ours(jnp.asarray(x)), want)
    print(f"resnet {case} classifier logits max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_backbone_with_new_head_matches_transformers(case, tmp_path):
    ref = _torch_model(transformers.ResNetModel, case)
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no classifier.*config\.json.*ResNetModel"):
        load_resnet(tmp_path)
    ours = load_resnet(tmp_path, num_labels=3, seed=1)
    assert ours.num_labels == 3 and ours.label_names is None
    x, xt = _images()
    with torch.no_grad():
        want = ref(xt).pooler_output.flatten(1).numpy()  # [B, C]
    diff = _max_diff(ours.resnet(jnp.asarray(x)), want)
    print(f"resnet {case} backbone pooled max abs diff {diff:.2e}")
    assert diff <= TOL
    assert ours(jnp.asarray(x)).shape == (2, 3)
    # training from scratch rebuilds the same architecture and head from config + head_config
    fresh = nnx.eval_shape(lambda: type(ours)(ours.config, ours.head_config, rngs=nnx.Rngs(0)))
    shapes = lambda m: {p: v.shape for p, v in flat_params(m, WEIGHTS).items()}  # noqa: E731
    assert shapes(fresh) == shapes(ours)


def test_train_mode_batch_norm_matches_torch(tmp_path):
    """One training-mode forward: same logits and same running statistics afterwards."""
    ref = _torch_model(transformers.ResNetForImageClassification, "bottleneck", num_labels=4)
    ref.save_pretrained(tmp_path)
    ours = load_resnet(tmp_path)
    x, xt = _images(b=4)
    ref.train()
    with torch.no_grad():
        want = ref(xt).logits.numpy()
    got = ours(jnp.asarray(x), train=True)
    diff = _max_diff(got, want)
    # our running statistics, named as torch's, against torch's after its update
    arrays = {p: np.asarray(v[...]) for p, v in flat_params(ours, WEIGHTS).items()}
    exported = export_weights(arrays, RESNET_RULES)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    stats = [k for k in exported if k.endswith(("running_mean", "running_var"))]
    stat_diff = max(_max_diff(exported[k], state[k]) for k in stats)
    print(f"train-mode logits {diff:.2e}, running stats {stat_diff:.2e} over {len(stats)}")
    assert diff <= 1e-5 and stat_diff <= 1e-5
    assert _max_diff(ours(jnp.asarray(x)), ref.eval()(xt).logits.detach().numpy()) <= TOL


def test_export_round_trip_through_transformers(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _torch_model(transformers.ResNetModel, "basic").save_pretrained(src)
    ours = load_resnet(src, num_labels=3, seed=2)
    x, xt = _images()
    want = np.asarray(ours(jnp.asarray(x)))
    spec = read_image_spec(src)
    export_resnet(ours, out, label_names=["cat", "dog", "eel"], image_spec=spec)

    ref, info = transformers.AutoModelForImageClassification.from_pretrained(
        out, output_loading_info=True
    )
    assert type(ref).__name__ == "ResNetForImageClassification"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert ref.config.id2label == {0: "cat", 1: "dog", 2: "eel"}
    with torch.no_grad():
        diff = _max_diff(ref.eval()(xt).logits.numpy(), want)
    print(f"exported resnet in transformers: logits max abs diff {diff:.2e}")
    assert diff <= TOL

    again = load_resnet(out)
    assert again.label_names == ("cat", "dog", "eel")
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(x))), want)
    round_spec = read_image_spec(out)
    assert (round_spec.size, round_spec.mean, round_spec.std) == (spec.size, spec.mean, spec.std)
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert (processor.size["shortest_edge"], processor.crop_size["height"]) == (224, 224)
    assert list(processor.image_mean) == list(spec.mean)


def test_load_errors_name_the_tensor(tmp_path):
    src = tmp_path / "src"
    _torch_model(transformers.ResNetForImageClassification, "basic", num_labels=2).save_pretrained(
        src
    )
    tensors = io.read_safetensors(src / io.SAFETENSORS_NAME)
    name = "resnet.encoder.stages.1.layers.0.layer.0.convolution.weight"  # (16, 8, 3, 3)

    bad = tmp_path / "bad_shape"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    io.write_safetensors(
        {**tensors, name: np.zeros((16, 8, 5, 5), np.float32)}, bad / "model.safetensors"
    )
    with pytest.raises(ValueError) as e:
        load_resnet(bad)
    msg = str(e.value)
    assert name in msg and "(16, 8, 5, 5)" in msg and "(16, 8, 3, 3)" in msg and str(bad) in msg

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text((src / "config.json").read_text())
    io.write_safetensors(
        {**tensors, "resnet.encoder.stages.9.extra.weight": np.zeros(3, np.float32)},
        extra / "model.safetensors",
    )
    with pytest.raises(ValueError, match=r"unused.*\n.*resnet\.encoder\.stages\.9\.extra\.weight"):
        load_resnet(extra)

    mlp = load_resnet(src, num_labels=4, head="mlp", head_hidden=8)
    assert mlp(jnp.asarray(_images()[0])).shape == (2, 4)
    with pytest.raises(ValueError, match="'mlp' head.*single Linear"):
        export_resnet(mlp, tmp_path / "mlp_out")
    with pytest.raises(ValueError, match="mlp.*always new"):
        load_resnet(src, head="mlp")


def test_read_image_spec(tmp_path):
    spec = read_image_spec(tmp_path)  # no preprocessor_config.json: ImageNet defaults
    assert (spec.size, spec.mean, spec.std) == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    path = tmp_path / "preprocessor_config.json"
    # microsoft/resnet-50's ConvNext processor: int size (crop_pct inside), its own mean/std
    path.write_text(json.dumps({"size": 224, "crop_pct": 0.875, "image_mean": [0.4, 0.5, 0.6],
                                "image_std": [0.2, 0.2, 0.2]}))  # fmt: skip
    spec = read_image_spec(tmp_path)
    assert (spec.size, spec.mean, spec.std, spec.source) == (
        224, (0.4, 0.5, 0.6), (0.2, 0.2, 0.2), str(path)
    )  # fmt: skip
    path.write_text(json.dumps({"size": {"shortest_edge": 256}, "crop_size": {"height": 192,
                                "width": 192}}))  # fmt: skip
    assert read_image_spec(tmp_path).size == 192
    path.write_text(json.dumps({"size": {"height": 192, "width": 160}}))
    with pytest.raises(ValueError, match="not square"):
        read_image_spec(tmp_path)


def _param_count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def test_resnet50_shapes_and_parameter_count():
    """Full-size ResNet-50 abstractly: logits shape and HF's parameter count (25,557,032)."""
    cfg = ResNetConfig.resnet_50()
    model = nnx.eval_shape(
        lambda: ResNetForImageClassification(cfg, HeadConfig(), rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    ours = _param_count(nnx.state(model, nnx.Param))
    with torch.device("meta"):  # shapes only, no memory
        ref = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000))
    assert ours == sum(p.numel() for p in ref.parameters()) == 25_557_032
    stats = _param_count(nnx.state(model, nnx.BatchStat))
    assert stats == sum(b.numel() for n, b in ref.named_buffers() if "running_" in n)


def test_layer_structure_covers_every_weight_once():
    cfg = ResNetConfig(**CASES["bottleneck"])
    model = nnx.eval_shape(
        lambda: ResNetForImageClassification(cfg, HeadConfig(num_labels=3), rngs=nnx.Rngs(0))
    )
    s = model.layer_structure
    patterns = [p for p in (s.blocks, s.bottom, s.top, s.head) if p is not None]
    paths = [p.replace(".", "/") for p in flat_params(model, WEIGHTS)]
    for path in paths:
        assert sum(bool(re.search(p, path)) for p in patterns) == 1, path
    blocks = {int(m.group(1)) for p in paths if (m := re.search(s.blocks, p))}
    assert blocks == {0, 1}
