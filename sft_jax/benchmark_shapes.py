"""What the training-step benchmark measures: model shapes with random weights
(``BenchSpec``, ``get_spec``), their random batches and models, and their model FLOPs against a
per-device peak (MFU). ``sft_jax.benchmark`` times them.

Model FLOPs per step (PaLM, Chowdhery et al. 2022, appendix B; no rematerialization counted):

    6 * P_tok * B * T  +  6 * P_seq * B  +  12 * L * (N * D) * T^2 * B

Image models (ResNet-50, ViT-B/16) count the same way, from the forward pass's jaxpr: 3 x the
FLOPs of its matmuls and convolutions (``sft_jax.flop_count``; for the text models that count
equals the formula above). Their throughput is in images per second.

``P_tok``: matmul parameters applied to every token (attention and MLP projections, and the LM
head, tied or not; not the embedding lookups). ``P_seq``: matmul parameters applied once per
sequence (BERT's pooler and classifier see only [CLS]). The last term is QK^T and AV, forward
(2 matmuls x 2 FLOPs) plus backward (2x forward), with N * D the query width; causal masks are
not discounted because the attention computes the full T x T scores.

Imports only jax, flax, numpy and the project's models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from sft_jax import flop_count, tasks
from sft_jax.models.bert import BertConfig, BertForSequenceClassification
from sft_jax.models.heads import HeadConfig
from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sft_jax.models.resnet import ResNetConfig, ResNetForImageClassification
from sft_jax.models.vit import ViTConfig, ViTForImageClassification


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One benchmarked shape: a model config (compute dtype set, params float32) and a batch.

    Attributes:
        name: Short name (``minilm-l6``, ...).
        config: ``BertConfig`` (classification), ``LlamaConfig`` (causal LM), ``ResNetConfig`` or
            ``ViTConfig`` (image classification, ``config.num_labels`` classes).
        batch_size: Rows (images) per step B.
        seq_len: Tokens per row T; for images the side of the square image in pixels.
        num_labels: Classes of the text classification head (BERT only).
    """

    name: str
    config: BertConfig | LlamaConfig | ResNetConfig | ViTConfig
    batch_size: int
    seq_len: int
    num_labels: int = 3

    @property
    def task(self) -> str:
        if isinstance(self.config, (ResNetConfig, ViTConfig)):
            return "image_classification"
        return "classification" if isinstance(self.config, BertConfig) else "causal_lm"

    @property
    def unit(self) -> str:
        """What the throughput counts: ``tokens`` or ``images``."""
        return "images" if self.task == "image_classification" else "tokens"

    @property
    def tokens(self) -> int:
        """Units of work per step: non-padding tokens (every token here), or images."""
        if self.unit == "images":
            return self.batch_size
        return self.batch_size * self.seq_len


_LLAMA_1B = dict(  # Llama-3.2-1B
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)  # fmt: skip
_TINY_BERT = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=32,
)  # fmt: skip
_TINY_LLAMA = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip

_TINY_RESNET = dict(embedding_size=8, hidden_sizes=(16, 32), depths=(1, 1), num_labels=5)
_TINY_VIT = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    image_size=32, patch_size=8, num_labels=5,
)  # fmt: skip

# name -> (config factory taking dtype overrides, default batch size, default sequence length).
SHAPES: dict[str, tuple[Callable[..., Any], int, int]] = {
    "minilm-l6": (BertConfig.minilm_l6, 32, 128),
    "bert-base": (BertConfig.bert_base, 32, 128),
    "smollm2-135m": (LlamaConfig.smollm2_135m, 8, 1024),
    "llama-1b": (lambda **kw: LlamaConfig(**_LLAMA_1B, **kw), 4, 1024),
    "resnet-50": (ResNetConfig.resnet_50, 64, 224),
    "vit-b16": (ViTConfig.vit_b16, 64, 224),
    "tiny-bert": (lambda **kw: BertConfig(**{**_TINY_BERT, **kw}), 2, 8),
    "tiny-llama": (lambda **kw: LlamaConfig(**{**_TINY_LLAMA, **kw}), 2, 8),
    "tiny-resnet": (lambda **kw: ResNetConfig(**{**_TINY_RESNET, **kw}), 2, 32),
    "tiny-vit": (lambda **kw: ViTConfig(**{**_TINY_VIT, **kw}), 2, 32),
}


def get_spec(
    name: str,
    dtype: str = "float32",
    batch_size: int | None = None,
    seq_len: int | None = None,
    **overrides: Any,
) -> BenchSpec:
    """The registered shape ``name`` with compute ``dtype`` (parameters stay float32) and
    config field ``overrides`` (e.g. ``attention_probs_dropout_prob=0.0``). A ViT's
    ``image_size`` follows ``seq_len``."""
    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(SHAPES)}")
    factory, default_b, default_t = SHAPES[name]
    seq_len = seq_len or default_t
    config = factory(dtype=dtype, param_dtype="float32", **overrides)
    if isinstance(config, ViTConfig):
        config = dataclasses.replace(config, image_size=seq_len)
    return BenchSpec(name, config, batch_size or default_b, seq_len)


# ---------------------------------------------------------------------------------------------
# Random batches and models


def make_batch(spec: BenchSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """A random host batch of full rows in the task's format (see ``sft_jax.tasks``)."""
    rng = np.random.default_rng(seed)
    if spec.task == "image_classification":
        b, side, c = spec.batch_size, spec.seq_len, spec.config.num_channels
        return {
            "pixel_values": rng.standard_normal((b, side, side, c), dtype=np.float32),
            "labels": rng.integers(0, spec.config.num_labels, (b,), dtype=np.int32),
            "example_mask": np.ones((b,), np.float32),
        }
    b, t, v = spec.batch_size, spec.seq_len, spec.config.vocab_size
    ones = np.ones((b, t), np.int32)
    if spec.task == "classification":
        return {
            "input_ids": rng.integers(1, v, (b, t), dtype=np.int32),
            "attention_mask": ones,
            "token_type_ids": np.zeros((b, t), np.int32),
            "labels": rng.integers(0, spec.num_labels, (b,), dtype=np.int32),
            "example_mask": np.ones((b,), np.float32),
        }
    tokens = rng.integers(0, v, (b, t + 1), dtype=np.int32)
    return {
        "input_ids": tokens[:, :-1],  # [B, T]
        "targets": tokens[:, 1:],  # [B, T]
        "target_mask": ones,
        "segment_ids": ones,  # one segment per row
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    }


def build_model(spec: BenchSpec, seed: int = 0) -> nnx.Module:
    """The spec's model with random weights."""
    rngs = nnx.Rngs(seed)
    if spec.task == "classification":
        return BertForSequenceClassification(spec.config, spec.num_labels, rngs=rngs)
    if isinstance(spec.config, ResNetConfig):
        return ResNetForImageClassification(spec.config, HeadConfig(), rngs=rngs)
    if isinstance(spec.config, ViTConfig):
        return ViTForImageClassification(spec.config, HeadConfig(), rngs=rngs)
    return LlamaForCausalLM(spec.config, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# FLOPs, peaks, MFU


def matmul_params(config: BertConfig | LlamaConfig, num_labels: int = 3) -> tuple[int, int]:
    """(per-token, per-sequence) matmul parameter counts; embedding lookups excluded."""
    h, n_layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    if isinstance(config, BertConfig):
        layer = 4 * h * h + 2 * h * inter  # q, k, v, attention output; MLP in and out
        return n_layers * layer, h * h + h * num_labels  # pooler + classifier on [CLS]
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layer = 2 * h * q + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
    return n_layers * layer + h * config.vocab_size, 0  # + LM head (tied or not)


def attention_flops(config: BertConfig | LlamaConfig, batch_size: int, seq_len: int) -> int:
    """QK^T and AV, forward and backward: 12 * L * (N * D) * T^2 * B."""
    if isinstance(config, BertConfig):
        width = config.hidden_size
    else:
        width = config.num_attention_heads * config.head_dim
    return 12 * config.num_hidden_layers * width * seq_len**2 * batch_size


def step_flops(spec: BenchSpec) -> int:
    """Model FLOPs of one training step (forward + backward), see the module docstring."""
    if spec.task == "image_classification":
        return 3 * forward_flops(spec)
    per_tok, per_seq = matmul_params(spec.config, spec.num_labels)
    b, t = spec.batch_size, spec.seq_len
    return 6 * per_tok * b * t + 6 * per_seq * b + attention_flops(spec.config, b, t)


def forward_flops(spec: BenchSpec) -> int:
    """Matmul + convolution FLOPs of one forward pass over the spec's batch, counted from the
    jaxpr of the model built abstractly (``sft_jax.flop_count``: no weights are allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(spec)))
    # Shapes only: one real row, the leading axis widened to the batch (no B-row random batch).
    row = make_batch(dataclasses.replace(spec, batch_size=1))
    batch = {
        k: jax.ShapeDtypeStruct((spec.batch_size, *x.shape[1:]), x.dtype) for k, x in row.items()
    }
    task = tasks.get_task(spec.task)
    forward = lambda state, b: task.logits(nnx.merge(graphdef, state), b, None)
    return flop_count.matmul_flops(forward, state, batch)


# Dense peak FLOP/s per device: (device_kind substring, bfloat16 peak, float32 peak). First match
# wins, so more specific names come first. GPU float32 peaks are the non-tensor-core figures;
# JAX computes float32 matmuls in TF32 on these GPUs by default, so float32 MFU against them can
# exceed what the hardware's plain float32 units allow. TPUs run float32 matmuls as bfloat16
# passes: one peak for both. The CPU figure is the development machine's (2 cores).
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("h200", 989e12, 67e12),
    ("h100", 989e12, 67e12),
    ("a100", 312e12, 19.5e12),
    ("v6 lite", 918e12, 918e12),
    ("v6e", 918e12, 918e12),
    ("v5 lite", 197e12, 197e12),
    ("v5e", 197e12, 197e12),
    ("v5p", 459e12, 459e12),
    ("tpu v5", 459e12, 459e12),
    ("v4", 275e12, 275e12),
    ("cpu", 76e9, 76e9),
)


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Dense peak FLOP/s of one device of ``device_kind`` (``jax.devices()[0].device_kind``) for
    ``dtype`` compute (float16 at the bfloat16 column: the same tensor-core rate on the GPUs
    listed; TPUs have no faster float16 path, so there it is an upper bound), or None when the
    kind is not in ``PEAK_FLOPS``."""
    kind = device_kind.lower()
    for pattern, bf16, f32 in PEAK_FLOPS:
        if pattern in kind:
            return bf16 if dtype in ("bfloat16", "float16") else f32
    return None


def mfu(flops_per_step: float, step_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over ``peak`` (all devices together)."""
    if not peak or step_s <= 0:
        return None
    return flops_per_step / step_s / peak
