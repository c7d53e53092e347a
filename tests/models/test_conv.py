"""Convolution layers against XLA's grouped convolution and torch: exact values and gradients
of the CPU fast paths (shifted depthwise sums, 1x1 convolutions as matmuls), BatchNorm's torch
semantics, max pooling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sft_jax.models.conv import (
    BatchNorm,
    Conv2d,
    depthwise_conv_shifted,
    max_pool,
    torch_conv_weight_to_hwio,
)


def reference_conv(x, kernel, stride, padding, groups):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )  # fmt: skip


@pytest.mark.parametrize(
    "k,stride,padding",
    [(3, 1, "SAME"), (5, 2, "SAME"), (3, 2, "SAME"), (3, 1, [(1, 1), (1, 1)]), (3, 2, "VALID")],
)
def test_depthwise_shifted_equals_grouped_convolution_with_gradients(k, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 10, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 1, 6)), jnp.float32)
    pads = padding if isinstance(padding, str) else padding
    ours = depthwise_conv_shifted(x, w, stride, pads)
    ref = reference_conv(x, w, stride, pads, 6)
    np.testing.assert_allclose(ours, ref, atol=1e-5)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    g_ours = jax.grad(loss(lambda x, w: depthwise_conv_shifted(x, w, stride, pads)), (0, 1))(x, w)
    g_ref = jax.grad(loss(lambda x, w: reference_conv(x, w, stride, pads, 6)), (0, 1))(x, w)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("groups,k,stride,padding", [(1, 1, 1, "SAME"), (1, 1, 1, 0),
                                                     (4, 3, 2, "SAME"), (2, 3, 1, 1)])  # fmt: skip
def test_conv2d_matches_torch(groups, k, stride, padding):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    w = rng.standard_normal((4, 4 // groups, k, k)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    conv = Conv2d(4, 4, k, stride=stride, padding=padding, groups=groups, rngs=nnx.Rngs(0))
    conv.kernel[...] = jnp.asarray(torch_conv_weight_to_hwio(w))
    conv.bias[...] = jnp.asarray(b)
    xt = torch.tensor(x).permute(0, 3, 1, 2)
    if padding == "SAME":  # TensorFlow's: the odd extra row/column at the end
        total = max((-(-8 // stride) - 1) * stride + k - 8, 0)
        xt = torch.nn.functional.pad(xt, [total // 2, total - total // 2] * 2)
        padding = 0
    ref = torch.nn.functional.conv2d(xt, torch.tensor(w), torch.tensor(b), stride, padding,
                                     groups=groups)  # fmt: skip
    np.testing.assert_allclose(conv(jnp.asarray(x)), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_batch_norm_follows_torch_in_training_and_inference():
    x = np.random.default_rng(2).standard_normal((4, 5, 5, 3)).astype(np.float32) * 3 + 1
    ours, ref = BatchNorm(3, momentum=0.1, epsilon=1e-5), torch.nn.BatchNorm2d(3)
    xt = torch.tensor(x).permute(0, 3, 1, 2)
    for _ in range(2):  # two updates of the running averages (unbiased variance, as torch)
        y = ours(jnp.asarray(x), train=True)
        y_ref = ref.train()(xt).permute(0, 2, 3, 1).detach().numpy()
        np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(ours.mean[...], ref.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.var[...], ref.running_var.numpy(), atol=1e-6)
    y_eval = ref.eval()(xt).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(ours(jnp.asarray(x)), y_eval, atol=1e-5)
    ours.frozen = True  # inference mode even in training: running statistics, no update
    before = np.asarray(ours.mean[...])
    np.testing.assert_allclose(ours(jnp.asarray(x), train=True), y_eval, atol=1e-5)
    np.testing.assert_array_equal(ours.mean[...], before)


def test_max_pool_matches_torch():
    x = np.random.default_rng(3).standard_normal((2, 7, 7, 3)).astype(np.float32)
    ref = torch.nn.functional.max_pool2d(torch.tensor(x).permute(0, 3, 1, 2), 3, 2, 1)
    np.testing.assert_array_equal(max_pool(jnp.asarray(x), 3, 2, 1), ref.permute(0, 2, 3, 1))
