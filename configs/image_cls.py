"""Image transfer learning: an ImageNet-pretrained backbone with a new head (default:
EfficientNet-Lite0 on Fashion-MNIST, full fine-tuning).

  python -m experiments.train --config configs/image_cls.py --workdir runs/fmnist_full
  python -m experiments.train --config configs/image_cls.py:probe --workdir runs/fmnist_probe
  python -m experiments.train --config configs/image_cls.py:head256 --workdir runs/fmnist_head
  python -m experiments.train --config configs/image_cls.py:scratch --workdir runs/fmnist_scratch
  python -m experiments.train --config configs/image_cls.py:debug --workdir /tmp/dbg

Arguments (comma separated, combinable):
  ``probe``    linear probe: the base is frozen (BatchNorm in inference mode), a new linear head
               trains.
  ``head256``  the founding documents' head on a frozen base: GAP -> Dense(256, relu) -> Dense.
  ``scratch``  the same architecture from random initialization (for contrast), all trained.
  ``debug``    tiny and quick.
Partial fine-tuning is a freezing preset: ``--config.freeze.policy=train_top:4`` (the last 4
blocks + top + head) or ``train_bottom:N`` (stem + the first N blocks + head); see
``sft_jax/freezing.py``. Fashion-MNIST needs ``apt-get install -y dataset-fashion-mnist``; your
own images: ``--config.data.name=image_folder --config.data.train_dir=DIR`` (one sub-folder per
class).
"""

import ml_collections

from configs import common

ARGS = ("probe", "head256", "scratch", "debug")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = {a for a in arg.split(",") if a}
    unknown = args - set(ARGS)
    if unknown:
        raise ValueError(
            f"configs/image_cls.py: unknown argument(s) {sorted(unknown)}; use {', '.join(ARGS)}"
        )
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.path = "efficientnet-lite0"  # short name, a HF ResNet/ViT directory or a .pth file
    c.model.task = "image_classification"
    c.model.pretrained = True  # False: the same architecture, randomly initialized
    c.model.head = "linear"  # linear | mlp (Dense(head_hidden, relu) -> Dense)
    c.model.head_hidden = 256
    c.model.classifier_dropout = 0.2  # before the last Dense of the head
    c.model.batch_norm = "auto"  # auto (frozen where the layer is frozen) | train | frozen
    c.model.dtype = "float32"  # compute: float32 | bfloat16 | float16 (loss-scaled); params f32

    c.data = ml_collections.ConfigDict()
    c.data.name = "fashion_mnist"  # or "image_folder" with train_dir (+ validation/test_dir)
    c.data.data_dir = ""  # tfds data_dir; "" -> $SFT_JAX_DATA_DIR or ~/tensorflow_datasets
    c.data.fashion_mnist_dir = ""  # "" = /usr/share/datasets/fashion-mnist (Debian package)
    c.data.train_dir = ""
    c.data.validation_dir = ""
    c.data.test_dir = ""
    c.data.max_train_examples = 0  # 0 = all
    # Pixels fed to the model; 0 = the backbone's own resolution (224 for EfficientNet-Lite0).
    # Fashion-MNIST images are 28 x 28: 112 keeps 4x upsampling at a quarter of 224's cost.
    c.data.image_size = 112
    c.data.batch_size = 32
    c.data.eval_batch_size = 128
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.enabled = True  # training batches only
    c.data.augment.scale = (0.7, 1.0)  # random resized crop: area fraction
    c.data.augment.ratio = (0.75, 1.3333)  # and aspect ratio
    c.data.augment.shear_degrees = 10.0
    c.data.augment.hflip = True
    c.data.augment.translate = 0.0

    c.optimizer = common.optimizer(learning_rate=5e-4, schedule="cosine")

    c.freeze = common.freeze("full")

    c.train = common.train(num_steps=800, eval_every_steps=200, log_every_steps=25)

    c.checkpoint = common.checkpoint("accuracy", "max")

    c.mesh = common.mesh()
    c.runtime = common.runtime()

    if "probe" in args or "head256" in args:
        c.freeze.policy = "head_only"
        c.optimizer.learning_rate = 1e-3
    if "head256" in args:
        c.model.head = "mlp"
    if "scratch" in args:
        c.model.pretrained = False
    if "debug" in args:
        c.data.max_train_examples = 256
        c.data.image_size = 32
        c.data.batch_size = 16
        c.train.num_steps = 8
        c.train.eval_every_steps = 4
        c.train.log_every_steps = 2
        c.train.max_eval_batches = 2
    c.lock()
    return c
