"""Throughput of the real input pipeline (tfds source -> grain -> tokenized, padded batches),
to show that data loading is not what limits a train step.

Used by ``experiments.benchmark --data_config configs/NAME.py``. Imports the data stack
(tensorflow-datasets, grain, tokenizers, ml_collections) lazily, so the model benchmark keeps
running where those are not installed.
"""

from __future__ import annotations

import time
from typing import Any


def pipeline_throughput(cfg: Any, num_batches: int = 50, split: str = "train") -> dict[str, Any]:
    """Times ``num_batches`` training batches of ``cfg``'s pipeline on the host.

    Args:
      cfg: an experiment config (``configs/text_cls.py``, ``configs/chat_sft.py``,
        ``configs/image_cls.py``).
      num_batches: batches to read after the first (which is timed separately: it includes
        opening the sources and, for chat data, tokenizing and packing the split).
      split: which split to read.

    Returns:
      ``setup_s`` (load data + tokenizer + first batch), ``batch_shape`` (token ids, or pixels),
      ``batches_per_s``, ``examples_per_s`` (rows per second) and ``tokens_per_s`` (non-padding
      tokens) or ``images_per_s`` (real images; ``tasks.batch_units``).
    """
    from sft_jax import components, tasks

    t0 = time.perf_counter()
    data, processor = components.load_data(cfg)
    ds = components.batches(cfg, data, processor, split, train=True).repeat()
    first = ds[0]
    setup_s = time.perf_counter() - t0
    unit, _ = tasks.batch_units(first)
    key = "pixel_values" if unit == "images" else "input_ids"
    rows = units = 0
    t0 = time.perf_counter()
    for i in range(1, num_batches + 1):
        batch = ds[i]
        rows += len(batch[key])
        units += int(tasks.batch_units(batch)[1])
    dt = time.perf_counter() - t0
    return {
        "config": str(cfg.model.task),
        "batch_shape": list(first[key].shape),
        "setup_s": setup_s,
        "num_batches": num_batches,
        "batches_per_s": num_batches / dt,
        "examples_per_s": rows / dt,
        f"{unit}_per_s": units / dt,
    }
