"""The PyTorch step that ``experiments.benchmark --torch`` sets beside ours: the ``transformers``
model of a ``BenchSpec``'s shape, ``torch.optim.AdamW`` after global-norm clipping, on the same
batch, timed as ``sft_jax.benchmark`` times the JAX step. torch is imported only in the process
that runs it.
"""

from __future__ import annotations

import multiprocessing
import statistics
from concurrent import futures
from typing import Any

import numpy as np

from sft_jax.benchmark import (
    CLIP_NORM,
    LEARNING_RATE,
    WEIGHT_DECAY,
    time_calls,
    time_pipelined,
)
from sft_jax.benchmark_shapes import BenchSpec, make_batch
from sft_jax.models.resnet import ResNetConfig
from sft_jax.models.vit import ViTConfig


def _torch_model(spec: BenchSpec, transformers: Any) -> Any:
    """The ``transformers`` model of the same shape, random init, attention as its default."""
    c = spec.config
    hf = {k: v for k, v in c.to_hf_dict().items() if k != "model_type"}
    if spec.task == "classification":
        cfg = transformers.BertConfig(**hf, num_labels=spec.num_labels)
        return transformers.BertForSequenceClassification(cfg)
    if isinstance(c, ResNetConfig):
        cfg = transformers.ResNetConfig(**hf, num_labels=c.num_labels)
        return transformers.ResNetForImageClassification(cfg)
    if isinstance(c, ViTConfig):
        cfg = transformers.ViTConfig(**hf, num_labels=c.num_labels)
        return transformers.ViTForImageClassification(cfg)
    # RoPE scaling changes only the frequency table, not the cost: left out.
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, use_cache=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _torch_loss(model: Any, batch: dict, spec: BenchSpec, torch: Any) -> Any:
    """Mean cross-entropy in float32, as the JAX tasks (all rows and targets are real)."""
    f = torch.nn.functional
    if spec.task == "classification":
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).logits  # fmt: skip
        return f.cross_entropy(logits.float(), batch["labels"])
    if spec.task == "image_classification":  # pixel_values already NCHW (see _time_torch)
        return f.cross_entropy(model(pixel_values=batch["pixel_values"]).logits.float(),
                               batch["labels"])  # fmt: skip
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["target_mask"]).logits
    return f.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())


def run_torch(
    spec: BenchSpec, warmup: int = 2, steps_: int = 10, seed: int = 0, isolate: bool = True
) -> dict:
    """Times the PyTorch equivalent of ``run_jax``'s step on the same batch.

    ``transformers`` model, ``torch.optim.AdamW`` (same rate and decay, on every parameter) after
    global-norm clipping; on CUDA if available. ``bfloat16`` and ``float16`` run under
    ``torch.autocast`` with float32 parameters (the JAX policy), ``float16`` with
    ``torch.amp.GradScaler`` (the JAX step's dynamic loss scale); ``float32`` allows TF32
    matmuls, as JAX does by default.

    Args:
        spec: Model shape and batch.
        warmup: Untimed calls after the first one.
        steps_: Timed calls; the step time is their median.
        seed: Seed of the weights and the batch.
        isolate: Run in a fresh (spawned) process, so that torch's CUDA libraries (cuDNN, ...)
            never share a process with JAX's and its GPU memory is freed when it exits.

    Returns:
        ``step_ms``, ``step_ms_all``, ``first_call_s``, ``device``, ``peak_bytes``, ``loss``,
        ``attn`` (the attention implementation), ``torch_version``.
    """
    if not isolate:
        return _time_torch(spec, warmup, steps_, seed)
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_time_torch, spec, warmup, steps_, seed).result()


def _time_torch(spec: BenchSpec, warmup: int, steps_: int, seed: int) -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32, as JAX's default float32 dot
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(seed)
    with dev:
        model = _torch_model(spec, transformers).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    batch = {k: torch.from_numpy(np.asarray(v)).to(dev) for k, v in make_batch(spec, seed).items()}
    batch = {k: v.long() if v.dtype == torch.int32 else v for k, v in batch.items()}
    if "pixel_values" in batch:  # NHWC (ours) -> NCHW (torch), once, outside the timed step
        batch["pixel_values"] = batch["pixel_values"].permute(0, 3, 1, 2).contiguous()
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(spec.config.dtype)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp is torch.float16)
    holder = {}

    def dispatch():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = _torch_loss(model, batch, spec, torch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        scaler.step(opt)
        scaler.update()
        holder["loss_tensor"] = loss.detach()

    def wait():
        if cuda:
            torch.cuda.synchronize()
        holder["loss"] = float(holder["loss_tensor"])

    def call():
        dispatch()
        wait()

    first, times = time_calls(call, warmup, steps_)
    pipelined = time_pipelined(dispatch, wait, steps_)
    return {
        "step_ms": 1e3 * statistics.median(times),
        "pipelined_step_ms": 1e3 * pipelined,
        "step_ms_all": [1e3 * t for t in times],
        "first_call_s": first,
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "peak_bytes": int(torch.cuda.max_memory_allocated(dev)) if cuda else None,
        "loss": holder["loss"],
        "attn": getattr(model.config, "_attn_implementation", None),
        "torch_version": torch.__version__,
    }
