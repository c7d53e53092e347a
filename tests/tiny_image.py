"""A tiny convolutional image classifier with BatchNorm, for step / freezing / trainer tests.

Two blocks (conv -> BatchNorm -> relu) after a stem, global average pooling and an ``ImageHead``:
the same calling convention and ``layer_structure`` as the real image families.
"""

import jax
import numpy as np
from flax import nnx

from sft_jax.models.conv import BatchNorm, Conv2d, global_avg_pool
from sft_jax.models.heads import HeadConfig, ImageHead, LayerStructure


class ConvBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs):
        self.conv = Conv2d(c_in, c_out, 3, stride=stride, padding=1, use_bias=False, rngs=rngs)
        self.bn = BatchNorm(c_out, momentum=0.1, rngs=rngs)

    def __call__(self, x, train: bool):
        return jax.nn.relu(self.bn(self.conv(x), train=train))


class TinyBackbone(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.stem = ConvBlock(3, width, 1, rngs)
        self.blocks = nnx.List([ConvBlock(width, width, 2, rngs) for _ in range(2)])

    def __call__(self, x, train: bool):
        x = self.stem(x, train)
        for block in self.blocks:
            x = block(x, train)
        return global_avg_pool(x)


class TinyImageClassifier(nnx.Module):
    layer_structure = LayerStructure(
        blocks=r"^backbone/blocks/(\d+)/", bottom=r"^backbone/stem/", top=None
    )

    def __init__(self, num_labels: int = 3, width: int = 8, head: str = "linear", seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.backbone = TinyBackbone(width, rngs)
        self.classifier = ImageHead(width, num_labels, HeadConfig(head, num_labels), rngs=rngs)

    def __call__(self, pixel_values, *, train: bool = False, dropout_rng=None):
        features = self.backbone(pixel_values, train)
        return self.classifier(features, dropout_rng=dropout_rng if train else None)


def image_batch(batch_size: int = 8, size: int = 8, num_labels: int = 3, seed: int = 0) -> dict:
    """Random pixels whose label shifts the mean brightness (learnable, BN-sensitive)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, batch_size).astype(np.int32)
    pixels = rng.standard_normal((batch_size, size, size, 3)).astype(np.float32)
    pixels += labels[:, None, None, None].astype(np.float32)
    return {
        "pixel_values": pixels,
        "labels": labels,
        "example_mask": np.ones(batch_size, np.float32),
    }
