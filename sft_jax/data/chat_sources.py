"""Chat SFT data opened for training and evaluation: `load_chat_data` picks one of the
builders of `sft_jax.data.chat_builders` from a config, prepares it once and returns `ChatData`,
whose sources return decoded records (JSON parsed, bytes decoded, numbers as Python ints):

    {"id": 17, "messages": [{"role": "user", "content": "Hi"}, ...], "answer": ""}
    # plus "source" (ChatterBot: the yml file's stem) or "family" (InstructTasks)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from grain.sources import RandomAccessDataSource

from sft_jax.data import instruct_tasks
from sft_jax.data.builders import prepare_sources, train_subset
from sft_jax.data.chat_builders import DATASET_NAMES, ChatFiles, ChatterbotDialogs, InstructTasks


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Decodes a stored record: bytes -> str, numpy scalars -> Python, `messages` JSON -> list."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    out["messages"] = json.loads(out["messages"])
    return out


class ChatSource(Sequence):
    """Random access to decoded chat records (`decode_record`) of one split.

    Args:
      source: the split's tfds data source (`builder.as_data_source()[split]`).
      positions: if given, a view of `source` at these positions, in this order.
    """

    def __init__(self, source: RandomAccessDataSource, positions: Sequence[int] | None = None):
        self._source = source
        self._positions = None if positions is None else [int(p) for p in positions]

    def __len__(self) -> int:
        return len(self._source) if self._positions is None else len(self._positions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        index %= len(self)
        pos = index if self._positions is None else self._positions[index]
        return decode_record(self._source[pos])

    def __repr__(self) -> str:
        return f"ChatSource({self._source!r}, n={len(self)})"


@dataclasses.dataclass
class ChatData:
    """Prepared chat data.

    Attributes:
      sources: split name ("train", and "validation" / "test" when present) -> `ChatSource`
        of decoded records (see the module docstring).
      dataset: the tfds builder's full name (name/config/version), for logs.
    """

    sources: dict[str, ChatSource]
    dataset: str = ""


def _task_sizes(data_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    sizes = data_cfg.get("task_sizes", None)
    if not sizes:
        return dict(instruct_tasks.DEFAULT_SIZES)
    return {str(k): int(v) for k, v in dict(sizes).items()}


def chat_builder_from_config(
    data_cfg: ml_collections.ConfigDict, data_dir: str | pathlib.Path
) -> tfds.core.GeneratorBasedBuilder:
    """The builder `data_cfg.name` selects (see `load_chat_data`); nothing is prepared."""
    name = data_cfg.name
    if name == "instruct_tasks":
        seed = data_cfg.get("task_seed", instruct_tasks.DEFAULT_SPLIT_SEED)
        return InstructTasks(sizes=_task_sizes(data_cfg), seed=int(seed or 0), data_dir=data_dir)
    if name == "chatterbot":
        return ChatterbotDialogs(data_dir=data_dir)
    if name == "files":
        if not data_cfg.get("train_file", ""):
            raise ValueError("data.name='files' needs data.train_file (a chat .jsonl file)")
        return ChatFiles(
            train_file=data_cfg.train_file,
            validation_file=data_cfg.get("validation_file", "") or None,
            test_file=data_cfg.get("test_file", "") or None,
            messages_field=data_cfg.get("messages_field", "") or "messages",
            data_dir=data_dir,
        )
    raise ValueError(f"Unknown data.name {name!r}; expected one of {list(DATASET_NAMES)}")


def load_chat_data(data_cfg: ml_collections.ConfigDict, data_dir: str | pathlib.Path) -> ChatData:
    """Prepares (once) and opens a chat dataset.

    Args:
      data_cfg: fields `name` ("instruct_tasks", "chatterbot" or "files"); for "files"
        `train_file`, `validation_file`, `test_file` (empty strings when unused) and
        `messages_field` (default "messages"); for "instruct_tasks" `task_sizes` (a mapping
        train / validation / test -> count, default `instruct_tasks.DEFAULT_SIZES`) and
        `task_seed`; and `max_train_examples` (0 = all; otherwise the train split is cut to the
        first N of a fixed seeded permutation, kept in dataset order).
      data_dir: tfds data directory; prepared data is reused from here.

    Returns:
      The splits that exist, as sources of decoded records.

    Raises:
      ValueError: for an unknown name or missing train file; `DataFileError` (a ValueError)
        for bad user files.
    """
    builder = chat_builder_from_config(data_cfg, data_dir)
    raw = prepare_sources(builder)
    sources = {name: ChatSource(src) for name, src in raw.items()}
    keep = train_subset(len(raw["train"]), data_cfg.get("max_train_examples", 0))
    if keep is not None:
        sources["train"] = ChatSource(raw["train"], keep)
    return ChatData(sources=sources, dataset=builder.info.full_name)
