"""Layers of convolutional image backbones: 2-D convolution, batch normalization, pooling.

Images are NHWC (``[B, H, W, C]``); convolution kernels are HWIO (``[kh, kw, C_in / groups,
C_out]``), torch's ``[C_out, C_in / groups, kh, kw]`` transposed by ``(2, 3, 1, 0)``.

Batch normalization follows ``torch.nn.BatchNorm2d``: the running statistics are ``nnx.BatchStat``
variables updated as ``(1 - momentum) * running + momentum * batch`` (the *unbiased* batch
variance, as torch), and normalization uses the biased one. A BatchNorm normalizes with batch
statistics and updates its running ones only when called with ``train=True`` and not ``frozen``;
``frozen`` is a static attribute (part of the graph definition) that the trainer sets from the
config and the freezing policy (``sft_jax.freezing.configure_batch_norm``). Inside
``batch_axis_scope(name)`` (the pmap train step opens it) the batch statistics are averaged over
the devices of that axis (synchronized BatchNorm), so a batch split over devices normalizes as
the whole batch does under ``jit``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.layers import Array, Initializer, make_param
from sft_jax.models.trace_setting import TraceSetting

Padding = str | int | Sequence[tuple[int, int]]


def conv_kernel_init() -> Initializer:
    """He (fan-out) normal, as torchvision / timm initialize convolutions."""
    return nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_conv_weight_to_hwio(w: Any) -> Any:
    """``[C_out, C_in/g, kh, kw]`` (torch) -> ``[kh, kw, C_in/g, C_out]`` (ours)."""
    return w.transpose(2, 3, 1, 0)


def hwio_to_torch_conv_weight(w: Any) -> Any:
    """``[kh, kw, C_in/g, C_out]`` (ours) -> ``[C_out, C_in/g, kh, kw]`` (torch)."""
    return w.transpose(3, 2, 0, 1)


def _padding(padding: Padding) -> str | list[tuple[int, int]]:
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"padding {padding!r}: use 'SAME', 'VALID', an int or pairs")
        return padding
    if isinstance(padding, int):
        return [(padding, padding), (padding, padding)]
    return [tuple(p) for p in padding]


class Conv2d(nnx.Module):
    """2-D convolution, NHWC in and out.

    Args:
        in_features: Input channels.
        out_features: Output channels.
        kernel_size: Square kernel size.
        stride: Square stride.
        padding: ``"SAME"`` (TensorFlow's: the extra row/column of an odd total goes at the end,
            as EfficientNet's "static same padding"), ``"VALID"``, an int (symmetric, as torch's
            ``padding=k // 2``) or explicit ``[(top, bottom), (left, right)]``.
        groups: Feature groups (``groups == in_features == out_features``: depthwise).
        use_bias: Whether to add a bias.
        dtype: Compute dtype.
        param_dtype: Storage dtype.
        kernel_init: Kernel initializer (default He fan-out normal).
        rngs: RNG streams.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: Padding = "SAME",
        groups: int = 1,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups={groups} must divide {in_features} and {out_features}")
        self.stride = int(stride)
        self.padding = _padding(padding)
        self.groups = int(groups)
        self.dtype = jnp.dtype(dtype)
        shape = (kernel_size, kernel_size, in_features // groups, out_features)
        # Input channels over "embed" (FSDP), output channels over "mlp" (tensor); axes the mesh
        # cannot divide (a depthwise kernel's 1) stay replicated.
        names = (None, None, "embed", "mlp")
        init = kernel_init or conv_kernel_init()
        self.kernel = make_param(rngs, init, shape, names, param_dtype)
        self.bias = (
            make_param(rngs, nnx.initializers.zeros, (out_features,), ("mlp",), param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: Array) -> Array:
        """[B, H, W, C_in] -> [B, H', W', C_out]."""
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        pointwise = kernel.shape[:2] == (1, 1) and self.stride == 1 and self.groups == 1
        if pointwise and self.padding in ("SAME", "VALID", [(0, 0), (0, 0)]):
            y = jnp.dot(x, kernel[0, 0])  # a 1x1 convolution is a matmul over channels
        elif self.groups == x.shape[-1] == kernel.shape[-1] and jax.default_backend() == "cpu":
            y = depthwise_conv_shifted(x, kernel, self.stride, self.padding)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride, self.stride),
                padding=self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def depthwise_conv_shifted(
    x: Array, kernel: Array, stride: int, padding: str | list[tuple[int, int]]
) -> Array:
    """Depthwise convolution as a sum of ``kh * kw`` shifted, per-channel scaled views.

    The same result as ``conv_general_dilated(..., feature_group_count=C)`` (bit-identical in
    float32 on CPU for 3x3 and 5x5), but XLA's CPU backend runs the grouped convolution's
    backward pass as a slow generic loop: on this project's 2-core CPU the shifted form is
    6-7x faster forward + backward on EfficientNet's depthwise shapes, and the gradients are plain
    elementwise products and sums.

    Args:
      x: [B, H, W, C].
      kernel: [kh, kw, 1, C].
      stride: Square stride.
      padding: ``"SAME"``, ``"VALID"`` or ``[(top, bottom), (left, right)]``.
    """
    kh, kw = kernel.shape[:2]
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (stride, stride), padding)
    (top, bottom), (left, right) = padding
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh = (xp.shape[1] - kh) // stride + 1
    ow = (xp.shape[2] - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            view = xp[
                :, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride
            ]
            term = view * kernel[i, j, 0]  # [B, oh, ow, C] * [C]
            out = term if out is None else out + term
    return out


_BATCH_AXIS: TraceSetting[str | None] = TraceSetting("batch_axis", None)


def batch_axis_scope(axis_name: str | None) -> contextlib.AbstractContextManager[None]:
    """BatchNorm layers traced inside the block average their batch statistics over the mapped
    axis ``axis_name`` (None: each call sees its whole batch)."""
    return _BATCH_AXIS.scope(axis_name)


def _batch_moments(x32: Array) -> tuple[Array, Array, Any]:
    """(mean, biased variance, count) over all axes but the last, across the devices of the
    ``batch_axis_scope`` axis when one is open."""
    axes, axis = tuple(range(x32.ndim - 1)), _BATCH_AXIS.get()
    mean = jnp.mean(x32, axis=axes)
    if axis is not None:
        mean = jax.lax.pmean(mean, axis)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes)
    n = math.prod(x32.shape[:-1])
    if axis is not None:
        var, n = jax.lax.pmean(var, axis), n * jax.lax.psum(1, axis)
    return mean, var, n


class BatchNorm(nnx.Module):
    """Batch normalization over all axes but the last (channels), torch semantics.

    Args:
        features: Channels.
        epsilon: Added to the variance.
        momentum: Torch's convention: weight of the *new* batch statistic in the running average
            (torch default 0.1; TensorFlow's decay 0.99 is momentum 0.01).
        dtype: Output dtype (statistics and normalization are float32).
        param_dtype: Storage dtype of scale and bias.
        rngs: Unused (constant init); kept for a uniform constructor.

    Attributes:
        frozen: When True, always normalize with the running statistics and never update them
            (inference-mode BatchNorm during fine-tuning). Static: changing it changes the graph.
    """

    def __init__(
        self,
        features: int,
        *,
        epsilon: float = 1e-5,
        momentum: float = 0.1,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)
        self.dtype = jnp.dtype(dtype)
        self.frozen = False
        self.scale = make_param(rngs, nnx.initializers.ones, (features,), ("norm",), param_dtype)
        self.bias = make_param(rngs, nnx.initializers.zeros, (features,), ("norm",), param_dtype)
        self.mean = nnx.BatchStat(
            jnp.zeros((features,), jnp.float32), out_sharding=("norm",), eager_sharding=False
        )
        self.var = nnx.BatchStat(
            jnp.ones((features,), jnp.float32), out_sharding=("norm",), eager_sharding=False
        )

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """Normalizes [..., C]; with ``train`` (and not ``frozen``) by the batch's statistics,
        updating the running ones in place."""
        x32 = x.astype(jnp.float32)
        if train and not self.frozen:
            mean, var, n = _batch_moments(x32)  # var biased: used to normalize
            unbiased = var * (n / jnp.maximum(n - 1, 1))
            m = self.momentum
            # Whole-value replacement (not ``[...] =``): works whatever array type holds it.
            self.mean.set_value((1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean))
            self.var.set_value((1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased))
        else:
            mean, var = self.mean[...], self.var[...]
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def global_avg_pool(x: Array) -> Array:
    """[B, H, W, C] -> [B, C], averaged in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def max_pool(x: Array, window: int, stride: int, padding: int) -> Array:
    """Max pooling over H, W with symmetric ``padding`` (padded cells never win), as torch's
    ``nn.MaxPool2d(window, stride, padding)``."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pad
    )
