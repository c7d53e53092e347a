"""A tiny convolutional image classifier with BatchNorm, for step / freezing / trainer tests.

Two blocks (conv -> BatchNorm -> relu) after a stem, global average pooling and an ``ImageHead``:
the same calling convention and ``layer_structure`` as the real image families.
"""

import jax
import numpy as np
from flax import nnx

from sft_jax.models import remat
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
        for block in self.blocks:  # recomputed in the backward pass under runtime.remat=full
            x = remat.apply(block, x, call=lambda b, x: b(x, train))
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


# Colours of the tiny image-folder classes: each class is a noisy patch of its colour.
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def write_image_folders(root, counts=(("train", 12), ("validation", 4), ("test", 4)), seed=0):
    """``{split: dir}``: one sub-folder per colour class, small PNG and JPEG images of varying
    sizes and modes (RGB, grey, palette) under ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    dirs = {}
    for split, n in counts:
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(18, 30)), int(rng.integers(18, 30))
                noise = rng.integers(-40, 40, (h, w, 3))
                pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                ext = "jpg" if i % 2 else "png"
                if i % 4 == 2:  # PNG only: palette images
                    image = image.convert("P")
                elif i % 4 == 3:
                    image = image.convert("L")
                image.save(folder / f"{i}.{ext}")
        dirs[split] = str(root / split)
    return dirs


def make_tiny_resnet(path):
    """A tiny random Hugging Face ResNet (bare backbone, as microsoft/resnet-50's layout) with
    randomized BatchNorm statistics, saved to ``path``."""
    import torch
    import transformers

    cfg = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    torch.manual_seed(0)
    model = transformers.ResNetModel(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def make_image_config(root, model_dir, dirs, arg="debug", **overrides):
    """``configs/image_cls.py:ARG`` on the tiny setup: image folders, 16 px, batch 8, 6 steps."""
    from configs import image_cls

    c = image_cls.get_config(arg)
    c.unlock()
    values = {
        "model.path": str(model_dir),
        "model.classifier_dropout": 0.1,
        "data.name": "image_folder",
        "data.data_dir": str(root / "tfds"),
        "data.train_dir": dirs["train"],
        "data.validation_dir": dirs["validation"],
        "data.test_dir": dirs["test"],
        "data.max_train_examples": 0,
        "data.image_size": 16,
        "data.batch_size": 8,
        "data.eval_batch_size": 8,
        "optimizer.learning_rate": 1e-2,
        "train.num_steps": 6,
        "train.eval_every_steps": 3,
        "train.max_eval_batches": 0,
        "train.log_every_steps": 1,
        "checkpoint.async_save": False,
        **overrides,
    }
    for key, value in values.items():
        section, *rest = key.split(".")
        target = c[section]
        for name in rest[:-1]:
            target = target[name]
        target[rest[-1]] = value
    c.lock()
    return c
