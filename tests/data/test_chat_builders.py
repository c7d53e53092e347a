"""Tests for sft_jax.data.chat_builders: ChatterBot dialogs, chat JSONL files, instruct tasks."""

import json
import pathlib
import pickle

import pytest

from sft_jax.data import chat_builders, chat_sources, instruct_tasks
from sft_jax.data.files import DataFileError
from tests.tiny_chat import chat_data_cfg

_NO_GCS = chat_builders.tfds.download.DownloadConfig(try_download_gcs=False)


def _write(path: pathlib.Path, content: str) -> str:
    path.write_text(content, encoding="utf-8")
    return str(path)


def _jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------- ChatterBot parsing


def test_dialog_messages_alternate_and_drop_the_odd_last_turn():
    assert chat_builders.dialog_messages(["Hi", " Hello\xa0", "How are you?"]) == [
        _user("Hi"),
        _bot("Hello"),  # surrounding whitespace, no-break spaces included, is stripped
    ]
    four = chat_builders.dialog_messages(["a", "b", "c", "d"])
    assert [m["role"] for m in four] == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    "turns",
    [
        ["only one"],
        [],
        "a bare string",  # trivia.yml has one such entry (a missing "- ")
        ["question", ["nested", "list"]],
        ["question", {"a": "mapping"}],
        ["question", "   "],
        None,
    ],
)
def test_dialog_messages_skips_malformed_dialogs(turns):
    assert chat_builders.dialog_messages(turns) is None


def test_read_dialogs_keeps_scalar_text_and_drops_duplicates(tmp_path):
    _write(
        tmp_path / "b.yml",
        "conversations:\n"
        "- - When were Air Jordans first sold?\n  - 1984\n"  # unquoted: stays "1984"
        "- - Is it?\n  - yes\n  - ignored odd turn\n"  # "yes" is not a boolean here
        "- - lonely\n"
        "- - Hi\n  - Hello\n",  # duplicate of a.yml's dialog: dropped
    )
    _write(tmp_path / "a.yml", "categories:\n- x\nconversations:\n- - Hi\n  - Hello\n")
    dialogs, skipped = chat_builders.read_chatterbot_dialogs(tmp_path)
    assert skipped == 1
    assert dialogs == [
        {"id": 0, "source": "a", "messages": [_user("Hi"), _bot("Hello")]},
        {
            "id": 1,
            "source": "b",
            "messages": [_user("When were Air Jordans first sold?"), _bot("1984")],
        },
        {"id": 2, "source": "b", "messages": [_user("Is it?"), _bot("yes")]},
    ]


def test_read_dialogs_errors_name_the_file(tmp_path):
    _write(tmp_path / "bad.yml", "categories:\n- x\n")
    with pytest.raises(DataFileError, match=r"bad\.yml, field 'conversations': missing"):
        chat_builders.read_chatterbot_dialogs(tmp_path)
    _write(tmp_path / "bad.yml", "conversations:\n- - a\n  - b\n - c: [\n")
    with pytest.raises(DataFileError, match=r"bad\.yml, line 4: invalid YAML"):
        chat_builders.read_chatterbot_dialogs(tmp_path)


def test_missing_chatterbot_names_install(monkeypatch):
    monkeypatch.setattr(chat_builders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        FileNotFoundError, match=r"pip install --no-deps chatterbot-corpus==1\.3\.3"
    ):
        chat_builders.chatterbot_corpus_dir()


def test_split_positions():
    # Pinned: hash_order(range(3), seed=0) == [2, 0, 1]; validation, then test, take one each.
    assert chat_builders.split_positions(3, seed=0) == {
        "train": [1],
        "validation": [2],
        "test": [0],
    }
    splits = chat_builders.split_positions(100, seed=7)
    assert {k: len(v) for k, v in splits.items()} == {"train": 90, "validation": 5, "test": 5}
    assert sorted(sum(splits.values(), [])) == list(range(100))
    assert splits != chat_builders.split_positions(100, seed=8)
    with pytest.raises(ValueError, match="too few"):
        chat_builders.split_positions(2, seed=0)


# ---------------------------------------------------------------------------- ChatterBot dataset


@pytest.fixture(scope="module")
def chatterbot(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("chatterbot")
    return data_dir, chat_sources.load_chat_data(chat_data_cfg(name="chatterbot"), data_dir)


def _records(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def test_chatterbot_splits(chatterbot, tmp_path):
    data_dir, data = chatterbot
    dialogs, skipped = chat_builders.read_chatterbot_dialogs(chat_builders.chatterbot_corpus_dir())
    assert (len(dialogs), skipped) == (898, 1)  # 2,025 entries: 1,126 duplicates, 1 bare string
    sizes = {k: len(v) for k, v in data.sources.items()}
    assert sizes == {"train": 808, "validation": 45, "test": 45}
    ids = {name: [r["id"] for r in _records(src)] for name, src in data.sources.items()}
    assert all(v == sorted(v) for v in ids.values())  # corpus order within a split
    assert sorted(sum(ids.values(), [])) == list(range(len(dialogs)))  # disjoint and complete
    by_id = {d["id"]: d for d in dialogs}
    for record in data.sources["test"]:
        want = by_id[record["id"]]
        assert record == {**want, "answer": ""}
    # A second prepare elsewhere writes byte-identical files.
    chat_builders.ChatterbotDialogs(data_dir=tmp_path).download_and_prepare(download_config=_NO_GCS)
    for name in sizes:
        f = f"chatterbot_dialogs/1.0.0/chatterbot_dialogs-{name}.array_record-00000-of-00001"
        assert (tmp_path / f).read_bytes() == (data_dir / f).read_bytes()


def test_chatterbot_known_dialogs(chatterbot):
    _, data = chatterbot
    records = [r for src in data.sources.values() for r in _records(src)]
    greetings = min((r for r in records if r["source"] == "greetings"), key=lambda r: r["id"])
    assert greetings["messages"] == [_user("Hello"), _bot("Hi")]  # greetings.yml's first dialog
    # conversations.yml: "I am working on a project" / "What are you working on?" / "I am
    # baking a cake." -- the third (user) turn has no reply and is dropped.
    (project,) = [r for r in records if r["messages"][0]["content"] == "I am working on a project"]
    assert project["source"] == "conversations"
    assert project["messages"] == [
        _user("I am working on a project"),
        _bot("What are you working on?"),
    ]
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)


# ---------------------------------------------------------------------------- user files


def test_chat_files_round_trip(tmp_path):
    rows = [
        {"messages": [_user("2+2?"), _bot("4")], "answer": "4", "extra": 1},
        {"messages": [{"role": "system", "content": "Be brief."}, _user("Hi"), _bot("Hello")]},
        {"messages": [_user("a"), _bot("b"), _user("c"), _bot("d é")], "answer": None},
    ]
    train = _write(tmp_path / "train.jsonl", _jsonl(*rows[:2]) + "\n  \n" + _jsonl(rows[2]))
    val = _write(tmp_path / "val.jsonl", _jsonl(rows[0]))
    data = chat_sources.load_chat_data(
        chat_data_cfg(train_file=train, validation_file=val), tmp_path / "data"
    )
    assert sorted(data.sources) == ["train", "validation"]
    assert data.dataset.startswith("chat_files/sha256_")
    assert _records(data.sources["train"]) == [
        {"id": i, "messages": r["messages"], "answer": r.get("answer") or ""}
        for i, r in enumerate(rows)
    ]
    assert _records(data.sources["validation"]) == [
        {"id": 0, "messages": rows[0]["messages"], "answer": "4"}
    ]


def test_chat_files_custom_field_and_instruct_jsonl(tmp_path):
    examples = instruct_tasks.make_examples(3, seed=4)
    path = tmp_path / "tasks.jsonl"
    instruct_tasks.write_jsonl(examples, path)
    data = chat_sources.load_chat_data(chat_data_cfg(train_file=str(path)), tmp_path / "data")
    got = _records(data.sources["train"])
    assert [(r["messages"], r["answer"]) for r in got] == [
        (e["messages"], e["answer"]) for e in examples
    ]
    conv = _write(tmp_path / "conv.jsonl", _jsonl({"conv": [_user("x"), _bot("y")]}))
    data = chat_sources.load_chat_data(
        chat_data_cfg(train_file=conv, messages_field="conv"), tmp_path / "data"
    )
    assert data.sources["train"][0]["messages"] == [_user("x"), _bot("y")]


def test_chat_files_pickle_and_fresh_directory_on_change(tmp_path):
    path = tmp_path / "train.jsonl"
    _write(path, _jsonl({"messages": [_user("a"), _bot("b")]}))
    first = chat_builders.ChatFiles(train_file=path, data_dir=tmp_path / "d")
    first.download_and_prepare(download_config=_NO_GCS)
    assert pickle.loads(pickle.dumps(first)).data_dir == first.data_dir
    same = chat_builders.ChatFiles(train_file=path, data_dir=tmp_path / "d")
    assert same.data_dir == first.data_dir
    _write(path, _jsonl({"messages": [_user("a"), _bot("c")]}))
    changed = chat_builders.ChatFiles(train_file=path, data_dir=tmp_path / "d")
    assert changed.data_dir != first.data_dir
    _write(path, _jsonl({"messages": [_user("a"), _bot("b")], "m": [_user("a"), _bot("b")]}))
    other_field = chat_builders.ChatFiles(train_file=path, messages_field="m", data_dir=tmp_path)
    assert other_field.info.config_name != chat_builders.ChatFiles(train_file=path).info.config_name


_OK = _jsonl({"messages": [_user("q"), _bot("a")]})


@pytest.mark.parametrize(
    "train, val, match",
    [
        (_OK + '{"messages": [}\n', None, r"train\.jsonl, line 2: invalid JSON"),
        (
            _OK + "\n" + _jsonl({"msgs": []}),
            None,
            r"train\.jsonl, line 3, field 'messages': missing field \(keys: \['msgs'\]\)",
        ),
        (
            _jsonl({"messages": [_user("q"), {"role": "bot", "content": "a"}]}),
            None,
            r"train\.jsonl, line 1, field 'messages': turn 1 has unknown role 'bot'",
        ),
        (
            _OK + _jsonl({"messages": [_user("q"), _bot("  ")]}),
            None,
            r"train\.jsonl, line 2, field 'messages': turn 1 \(assistant\) has empty content",
        ),
        (
            _jsonl({"messages": [_bot("a"), _user("q")]}),
            None,
            r"train\.jsonl, line 1, field 'messages': turn 0 has role 'assistant', expected 'user'",
        ),
        (
            _jsonl({"messages": [_user("q"), _bot("a")], "answer": 4}),
            None,
            r"train\.jsonl, line 1, field 'answer': must be a string, got 4",
        ),
        ('["not", "an object"]\n', None, r"train\.jsonl, line 1: expected a JSON object"),
        ("\n\n", None, r"train\.jsonl: the file holds no examples"),
        (None, None, r"train\.jsonl: file not found"),
        (
            _OK,
            _OK + _jsonl({"messages": [_user("only a question")]}),
            r"val\.jsonl, line 2, field 'messages': conversation has no assistant turn",
        ),
    ],
)
def test_bad_chat_files_error_before_writing(tmp_path, train, val, match):
    train_path = tmp_path / "train.jsonl"
    if train is not None:
        _write(train_path, train)
    val_path = _write(tmp_path / "val.jsonl", val) if val is not None else ""
    cfg = chat_data_cfg(train_file=str(train_path), validation_file=val_path)
    with pytest.raises(DataFileError, match=match):
        chat_sources.load_chat_data(cfg, tmp_path / "data")
    assert not (tmp_path / "data").exists()  # validated before anything was written


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_OK.encode() + b'{"messages": "\xff"}\n')
    with pytest.raises(DataFileError, match=r"train\.jsonl, line 2: not valid UTF-8"):
        chat_builders.ChatFiles(train_file=path, data_dir=tmp_path / "data")


# ---------------------------------------------------------------------------- instruct tasks

_SIZES = {"train": 12, "validation": 3, "test": 4}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tasks")
    cfg = chat_data_cfg(name="instruct_tasks", task_sizes=_SIZES, task_seed=3)
    return data_dir, chat_sources.load_chat_data(cfg, data_dir)


def test_instruct_tasks_equal_make_splits(tasks):
    _, data = tasks
    assert data.dataset == "instruct_tasks/train12_val3_test4_seed3/1.0.0"
    want = instruct_tasks.make_splits(seed=3, sizes=_SIZES)
    assert {k: _records(v) for k, v in data.sources.items()} == want


def test_instruct_tasks_config_per_sizes_and_seed(tmp_path):
    name = chat_builders.instruct_config_name
    assert name(instruct_tasks.DEFAULT_SIZES, 0) == "train4000_val200_test500_seed0"
    assert name({"train": 5}, 2) == "train5_val0_test0_seed2"
    builder = chat_builders.InstructTasks(sizes={"train": 5, "test": 2}, seed=1, data_dir=tmp_path)
    builder.download_and_prepare(download_config=_NO_GCS)
    assert sorted(builder.info.splits) == ["test", "train"]  # size-0 splits are left out
    assert pickle.loads(pickle.dumps(builder)).data_dir == builder.data_dir
    with pytest.raises(ValueError, match=r"unknown instruct task splits \['dev'\]"):
        chat_builders.InstructTasks(sizes={"train": 5, "dev": 2})
    with pytest.raises(ValueError, match="train >= 1"):
        chat_builders.InstructTasks(sizes={"train": 0, "test": 2})


# ---------------------------------------------------------------------------- loading


def test_max_train_examples_subset_is_deterministic(tasks):
    data_dir, full = tasks
    cfg = chat_data_cfg(name="instruct_tasks", task_sizes=_SIZES, task_seed=3, max_train_examples=5)
    small = chat_sources.load_chat_data(cfg, data_dir)
    again = chat_sources.load_chat_data(cfg, data_dir)
    train = _records(small.sources["train"])
    assert len(small.sources["train"]) == 5 and len(train) == 5
    assert train == _records(again.sources["train"])
    ids = [r["id"] for r in train]
    assert ids == sorted(ids) and ids != list(range(5))  # a seeded pick, kept in order
    by_id = {r["id"]: r for r in _records(full.sources["train"])}
    assert train == [by_id[i] for i in ids]
    assert _records(small.sources["test"]) == _records(full.sources["test"])


def test_chat_source_indexing_and_pickle(tasks):
    _, data = tasks
    source = data.sources["validation"]
    assert source[-1] == source[len(source) - 1] and source[0:2] == [source[0], source[1]]
    with pytest.raises(IndexError):
        source[len(source)]
    assert _records(pickle.loads(pickle.dumps(source))) == _records(source)


def test_unknown_name_and_missing_train_file(tmp_path):
    with pytest.raises(ValueError, match=r"'imdb'; expected one of \['instruct_tasks', 'chat"):
        chat_sources.load_chat_data(chat_data_cfg(name="imdb"), tmp_path)
    with pytest.raises(ValueError, match="needs data.train_file"):
        chat_sources.load_chat_data(chat_data_cfg(name="files"), tmp_path)
