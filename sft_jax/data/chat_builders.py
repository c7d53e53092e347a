"""tensorflow-datasets builders for chat SFT data (array_record, no TensorFlow, no network).

Three builders write `array_record` files into a local `data_dir`:

* `ChatterbotDialogs`: the English dialogs of the `chatterbot-corpus` package.
* `ChatFiles`: a user's JSONL files, one `{"messages": [...], "answer": "..."}` per line.
* `InstructTasks`: the seeded instruction tasks of `sft_jax.data.instruct_tasks`.

`sft_jax.data.chat_sources.load_chat_data` picks one from a config, prepares it if needed and
opens its splits as decoded records. `messages` is a conversation in the format of
`sft_jax.data.chat` (user / assistant turns alternating, starting with user, optionally after
one system turn). `answer` is the reference for exact-match evaluation ("" when there is
none). On disk `messages` is stored as JSON text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import yaml

from sft_jax.data import instruct_tasks
from sft_jax.data.builders import hash_order
from sft_jax.data.chat import validate_messages
from sft_jax.data.files import DataFileError, check_readable, decode_file, jsonl_objects

# Fixed forever: changing it changes which dialogs land in train/validation/test.
CHATTERBOT_SPLIT_SEED = 20240901
CHATTERBOT_FRACTIONS = {"validation": 0.05, "test": 0.05}  # train takes the rest
_CHATTERBOT_DIR = ("data", "english")
_CHATTERBOT_HINT = "pip install --no-deps chatterbot-corpus==1.3.3"
_SPLIT_TAGS = {"train": "train", "validation": "val", "test": "test"}
DATASET_NAMES = ("instruct_tasks", "chatterbot", "files")
_LOG = logging.getLogger(__name__)


def _chat_features(**extra: Any) -> tfds.features.FeaturesDict:
    """Features shared by every chat builder, plus `extra` Text / int fields."""
    return tfds.features.FeaturesDict(
        {"id": np.int64, "messages": tfds.features.Text(), "answer": tfds.features.Text(), **extra}
    )


def _to_json(messages: Sequence[Mapping[str, str]]) -> str:
    return json.dumps(list(messages), ensure_ascii=False)


# ---------------------------------------------------------------------------- ChatterBot


def chatterbot_corpus_dir() -> pathlib.Path:
    """Directory of the English `*.yml` files inside the installed `chatterbot_corpus` package."""
    # find_spec locates the package without importing it (its __init__ is not needed here).
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The ChatterBot dialogs need the `chatterbot-corpus` package: {_CHATTERBOT_HINT}"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*_CHATTERBOT_DIR)
    if not path.is_dir() or not any(path.glob("*.yml")):
        raise FileNotFoundError(f"{path} holds no .yml files; reinstall with: {_CHATTERBOT_HINT}")
    return path


def dialog_messages(turns: Any) -> list[dict[str, str]] | None:
    """Turns one ChatterBot conversation (a list of strings) into user / assistant messages.

    Turns alternate user, assistant, user, ... with surrounding whitespace (including the
    no-break spaces some answers end with) stripped. An odd final turn (a user turn without a
    reply) is dropped.

    Args:
      turns: one entry of a yml file's `conversations` list.

    Returns:
      The messages, or None when the entry is not a list, has fewer than 2 turns, or has a turn
      that is not a string (a nested list or mapping) or is blank: such a dialog is skipped
      whole, since dropping a single turn would pair a question with the wrong reply.
    """
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    if not all(isinstance(t, str) and t.strip() for t in turns):
        return None
    roles = ("user", "assistant")
    usable = turns[: len(turns) - len(turns) % 2]
    return [{"role": roles[i % 2], "content": t.strip()} for i, t in enumerate(usable)]


def read_chatterbot_dialogs(directory: pathlib.Path) -> tuple[list[dict[str, Any]], int]:
    """Reads every `*.yml` in `directory` (sorted by name) into unique dialogs.

    Scalars are read with YAML's BaseLoader, i.e. as the text written in the file: an answer
    `1984`, `yes` or `3.10` stays that string instead of becoming a number or a boolean.
    Entries that `dialog_messages` rejects are skipped, as are exact duplicates of an earlier
    dialog (same messages after the odd last turn is dropped); the first occurrence is kept.

    Args:
      directory: folder of ChatterBot yml files.

    Returns:
      (dialogs `{"id", "source", "messages"}` with ids 0, 1, ... in file order, number of
      entries skipped as malformed or too short).

    Raises:
      DataFileError: for a yml file that does not parse or has no `conversations` list.
    """
    dialogs: list[dict[str, Any]] = []
    seen: set[str] = set()
    skipped = 0
    for path in sorted(directory.glob("*.yml")):
        for turns in _yml_conversations(path):
            messages = dialog_messages(turns)
            if messages is None:
                skipped += 1
                continue
            key = _to_json(messages)
            if key not in seen:
                seen.add(key)
                dialogs.append({"id": len(dialogs), "source": path.stem, "messages": messages})
    return dialogs, skipped


def _yml_conversations(path: pathlib.Path) -> list[Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise DataFileError(path, line, None, f"invalid YAML: {e}") from None
    conversations = data.get("conversations") if isinstance(data, dict) else None
    if not isinstance(conversations, list):
        raise DataFileError(path, None, "conversations", "missing or not a list")
    return conversations


def split_positions(
    n: int, seed: int, fractions: Mapping[str, float] = CHATTERBOT_FRACTIONS
) -> dict[str, list[int]]:
    """Splits positions `0..n-1` into train and the splits of `fractions`, by `hash_order`.

    Each split in `fractions` takes `max(1, round(n * fraction))` positions, in hash order;
    train takes the rest. Returns split name -> sorted positions, train first.
    """
    order = hash_order(range(n), seed=seed)
    out: dict[str, list[int]] = {}
    start = 0
    for name, fraction in fractions.items():
        count = max(1, round(n * fraction))
        out[name] = sorted(order[start : start + count])
        start += count
    if start >= n:
        raise ValueError(f"{n} examples are too few for train plus {list(fractions)}")
    return {"train": sorted(order[start:]), **out}


class ChatterbotDialogs(tfds.core.GeneratorBasedBuilder):
    """English dialogs of `chatterbot-corpus` 1.3.3 as single- or multi-turn chats.

    Splits are a fixed 90/5/5 split of the unique dialogs (`CHATTERBOT_SPLIT_SEED`), identical
    on every machine; within a split dialogs keep the corpus order (files sorted by name).
    `source` is the yml file's stem ("greetings"); `answer` is "" (no exact-match reference).
    """

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download, so no checksums file to look up beside the code
    RELEASE_NOTES = {"1.0.0": "Unique English dialogs, odd last turn dropped, 90/5/5 split."}

    def __init__(self, *, data_dir: str | pathlib.Path | None = None, **kwargs: Any):
        """Creates the builder; `data_dir` is where the array_record files go."""
        kwargs.setdefault("file_format", "array_record")
        super().__init__(data_dir=data_dir, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ChatterBot English corpus: short dialogs on greetings, AI, trivia, ...",
            features=_chat_features(source=tfds.features.Text()),
            disable_shuffling=True,
            homepage="https://github.com/gunthercox/chatterbot-corpus",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # everything is local
        dialogs, skipped = read_chatterbot_dialogs(chatterbot_corpus_dir())
        _LOG.info("ChatterBot: %d unique dialogs, %d entries skipped", len(dialogs), skipped)
        splits = split_positions(len(dialogs), seed=CHATTERBOT_SPLIT_SEED)
        return {k: self._generate_examples([dialogs[p] for p in v]) for k, v in splits.items()}

    def _generate_examples(self, dialogs: list[dict[str, Any]]) -> Iterator[tuple[int, dict]]:
        for d in dialogs:
            yield d["id"], {**d, "messages": _to_json(d["messages"]), "answer": ""}


# ---------------------------------------------------------------------------- user files


def _chat_example(
    path: pathlib.Path, line: int, obj: Mapping[str, Any], field: str, index: int
) -> dict[str, Any]:
    """Validates one JSONL object into `{"id", "messages", "answer"}`."""
    if field not in obj:
        raise DataFileError(path, line, field, f"missing field (keys: {sorted(obj)})")
    where = f"{path}, line {line}, field {field!r}"
    try:
        messages = validate_messages(obj[field], where=where)
    except ValueError as e:
        raise DataFileError(path, line, field, str(e).removeprefix(f"{where}: ")) from None
    answer = obj.get("answer", "")
    if answer is None:
        answer = ""
    if not isinstance(answer, str):
        raise DataFileError(path, line, "answer", f"must be a string, got {answer!r}")
    return {"id": index, "messages": messages, "answer": answer}


def read_chat_file(path: pathlib.Path, messages_field: str = "messages") -> list[dict[str, Any]]:
    """Reads and validates a chat JSONL file.

    Args:
      path: UTF-8 file, one JSON object per line (blank lines skipped), holding a conversation
        under `messages_field` (see `sft_jax.data.chat.validate_messages`) and optionally a
        string `answer` (the reference for exact-match evaluation; "" when absent or null).
        Other keys are ignored.
      messages_field: key of the conversation.

    Returns:
      Examples `{"id", "messages", "answer"}`, ids 0, 1, ... in file order; the messages keep
      only "role" and "content".

    Raises:
      DataFileError: naming the file, line and field, for a missing file, bad UTF-8 or JSON, a
        missing or invalid conversation, a non-string answer, or a file without examples.
    """
    check_readable(path)
    examples = [
        _chat_example(path, line, obj, messages_field, index)
        for index, (line, obj) in enumerate(jsonl_objects(path, decode_file(path)[1]))
    ]
    if not examples:
        raise DataFileError(path, None, None, "the file holds no examples")
    return examples


def _files_digest(files: Mapping[str, pathlib.Path], messages_field: str) -> str:
    digest = hashlib.sha256(f"chat:{messages_field}".encode())
    for split, path in files.items():
        raw = path.read_bytes()
        digest.update(f"{split}:{len(raw)}:".encode() + raw)
    return digest.hexdigest()


class ChatFiles(tfds.core.GeneratorBasedBuilder):
    """A user's chat JSONL files (train required, validation / test optional) as a tfds dataset.

    All files are parsed and validated when the builder is constructed, before anything is
    written (see `read_chat_file`). The config name is a hash of the files' bytes and the
    messages field name, so changed files prepare into a fresh directory. Example order is the
    file order.
    """

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download, so no checksums file to look up beside the code

    def __init__(
        self,
        *,
        train_file: str | pathlib.Path,
        validation_file: str | pathlib.Path | None = None,
        test_file: str | pathlib.Path | None = None,
        messages_field: str = "messages",
        data_dir: str | pathlib.Path | None = None,
    ):
        """Reads and validates the files; raises `DataFileError` on bad input."""
        named = {"train": train_file, "validation": validation_file, "test": test_file}
        files = {k: pathlib.Path(v) for k, v in named.items() if v}
        self._examples = {k: read_chat_file(p, messages_field) for k, p in files.items()}
        config = tfds.core.BuilderConfig(
            name=f"sha256_{_files_digest(files, messages_field)[:16]}",
            description=f"messages_field={messages_field!r}; "
            + ", ".join(f"{k}={v}" for k, v in files.items()),
        )
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")
        # Pickling re-runs __init__ with these (DatasetBuilder.__setstate__).
        self._original_state = dict(
            train_file=train_file,
            validation_file=validation_file,
            test_file=test_file,
            messages_field=messages_field,
            data_dir=data_dir,
        )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Chat conversations from user JSONL files.",
            features=_chat_features(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager
        return {name: self._generate_examples(ex) for name, ex in self._examples.items()}

    def _generate_examples(self, examples: list[dict[str, Any]]) -> Iterator[tuple[int, dict]]:
        for ex in examples:
            yield ex["id"], {**ex, "messages": _to_json(ex["messages"])}


# ---------------------------------------------------------------------------- instruct tasks


def instruct_config_name(sizes: Mapping[str, int], seed: int) -> str:
    """Config name for `InstructTasks`, e.g. "train4000_val200_test500_seed0".

    Raises:
      ValueError: for split names other than train / validation / test, a negative size, or
        no training examples.
    """
    unknown = sorted(set(sizes) - set(_SPLIT_TAGS))
    if unknown:
        raise ValueError(f"unknown instruct task splits {unknown}; expected {list(_SPLIT_TAGS)}")
    counts = {k: int(sizes.get(k, 0)) for k in _SPLIT_TAGS}
    if counts["train"] < 1 or min(counts.values()) < 0:
        raise ValueError(f"instruct task sizes need train >= 1 and no negative size: {counts}")
    return "_".join(f"{_SPLIT_TAGS[k]}{v}" for k, v in counts.items()) + f"_seed{int(seed)}"


class InstructTasks(tfds.core.GeneratorBasedBuilder):
    """The seeded instruction tasks of `instruct_tasks.make_splits(seed, sizes)`.

    Records are the generated examples (`id`, `family`, `messages`, `answer`) in generation
    order. The config name encodes sizes and seed, so other sizes prepare separately. Splits of
    size 0 are left out.
    """

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download, so no checksums file to look up beside the code

    def __init__(
        self,
        *,
        sizes: Mapping[str, int] | None = None,
        seed: int = instruct_tasks.DEFAULT_SPLIT_SEED,
        data_dir: str | pathlib.Path | None = None,
    ):
        """Checks the sizes (default `instruct_tasks.DEFAULT_SIZES`); generation is deferred."""
        sizes = dict(instruct_tasks.DEFAULT_SIZES if sizes is None else sizes)
        name = instruct_config_name(sizes, seed)
        self.sizes = {k: int(v) for k, v in sizes.items() if int(v) > 0}
        self.seed = int(seed)
        config = tfds.core.BuilderConfig(name=name, description=f"sizes={sizes}, seed={seed}")
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")
        # Pickling re-runs __init__ with these (DatasetBuilder.__setstate__).
        self._original_state = dict(sizes=sizes, seed=seed, data_dir=data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Generated instructions with exactly checkable answers.",
            features=_chat_features(family=tfds.features.Text()),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager
        splits = instruct_tasks.make_splits(seed=self.seed, sizes=self.sizes)
        return {name: self._generate_examples(ex) for name, ex in splits.items()}

    def _generate_examples(self, examples: list[dict[str, Any]]) -> Iterator[tuple[int, dict]]:
        for ex in examples:
            record = {k: ex[k] for k in ("id", "family", "answer")}
            yield ex["id"], {**record, "messages": _to_json(ex["messages"])}
