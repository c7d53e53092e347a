"""Bad input that the existing file tests do not cover (issue 7): unreadable files, labels that
are not scalars, sequences longer than data.max_length or than the model's positions, and a
tokenizer with more ids than the model has embedding rows."""

import csv
import json
import logging
import pathlib
import re

import numpy as np
import pytest

from sft_jax.data import builders, chat_sources, files, lm, text, tokenizer
from sft_jax.data.files import DataFileError, Fields
from sft_jax.data.limits import (
    ModelLimits,
    check_max_length,
    check_tokenizer_fits,
    read_model_limits,
    tokenizer_id_limit,
)
from tests.tiny_chat import CONV, chat_data_cfg, tiny_chat_tokenizer
from tests.tiny_text import files_data_cfg
from tests.tiny_wordpiece import write_tokenizer_dir

_CSV = "text,label\ngood,pos\nbad,neg\n"
_CHAT = json.dumps({"messages": CONV[1:3]}) + "\n"


def _load(kind: str, path: pathlib.Path, data_dir: pathlib.Path):
    if kind == "text":
        return builders.load_text_classification(files_data_cfg(train_file=str(path)), data_dir)
    return chat_sources.load_chat_data(chat_data_cfg(train_file=str(path)), data_dir)


# ---------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize(
    "kind, name, content", [("text", "train.csv", _CSV), ("chat", "t.jsonl", _CHAT)]
)
def test_unreadable_file_is_named_and_nothing_written(tmp_path, monkeypatch, kind, name, content):
    path = tmp_path / name
    path.write_text(content)
    real_read_bytes = pathlib.Path.read_bytes

    def read_bytes(self):  # chmod does not stop root, so refuse the read here
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    with pytest.raises(DataFileError, match=rf"{name}: cannot read the file \(Permission denied\)"):
        _load(kind, path, tmp_path / "data")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("kind, name", [("text", "train.csv"), ("chat", "train.jsonl")])
def test_directory_instead_of_file_is_named(tmp_path, kind, name):
    (tmp_path / name).mkdir()
    with pytest.raises(DataFileError, match=rf"{name}: is a directory, expected a data file"):
        _load(kind, tmp_path / name, tmp_path / "data")
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------- labels


def test_label_that_is_not_a_scalar_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": ["x", "y"]}\n')
    with pytest.raises(DataFileError, match=r"train\.jsonl, line 2, field 'label': missing or"):
        _load("text", path, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_unknown_label_in_the_test_file_is_named(tmp_path):
    (tmp_path / "train.csv").write_text(_CSV)
    (tmp_path / "test.csv").write_text("text,label\nok,pos\nhm,mixed\n")
    cfg = files_data_cfg(
        train_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv")
    )
    with pytest.raises(DataFileError, match=r"test\.csv, line 3, field 'label': label 'mixed'"):
        builders.load_text_classification(cfg, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_roles_out_of_order_later_in_the_file_name_the_line(tmp_path):
    bad = [CONV[1], CONV[3], CONV[2]]  # user, user, assistant
    path = tmp_path / "train.jsonl"
    path.write_text(_CHAT + "\n" + json.dumps({"messages": bad}) + "\n")
    with pytest.raises(
        DataFileError,
        match=r"train\.jsonl, line 3, field 'messages': turn 1 has role 'user', expected "
        r"'assistant'",
    ):
        _load("chat", path, tmp_path / "data")
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------- CSV and labels


def _read(path: pathlib.Path, content: str, fields: Fields = Fields("text", "label")):
    path.write_text(content, encoding="utf-8")
    return files.read_splits({"train": path}, fields)


def test_csv_field_longer_than_the_csv_module_default_is_read(tmp_path):
    limit = csv.field_size_limit()
    long = "x" * 200_000  # the csv module's default limit is 131,072 characters
    examples, labels, _ = _read(tmp_path / "train.csv", f"text,label\n{long},pos\nok,neg\n")
    assert [(ex["line"], len(ex["text"]), ex["label"]) for ex in examples["train"]] == [
        (2, 200_000, "pos"),
        (3, 2, "neg"),
    ]
    assert labels == ["neg", "pos"] and csv.field_size_limit() == limit  # limit put back


def test_csv_row_the_csv_module_rejects_names_file_and_line(tmp_path, monkeypatch):
    limit = csv.field_size_limit()
    monkeypatch.setattr(files, "CSV_FIELD_LIMIT", 10)
    with pytest.raises(
        DataFileError,
        match=r"^\S*train\.csv, line 3: cannot parse the CSV row \(field larger than field limit "
        r"\(10\)\)$",
    ):
        _read(tmp_path / "train.csv", 'text,label\nshort,pos\n"eleven\nchars",neg\n')
    assert csv.field_size_limit() == limit  # put back after the error too


def test_requested_csv_column_named_twice_is_an_error(tmp_path):
    with pytest.raises(
        DataFileError,
        match=r"^\S*train\.csv, line 1, field 'text': column appears 2 times in the header "
        r"\['text', 'label', 'text'\]; give each column its own name$",
    ):
        _read(tmp_path / "train.csv", "text,label,text\na,pos,b\nc,neg,d\n")
    # A repeated column that is not read is harmless.
    examples, _, _ = _read(tmp_path / "ok.csv", "note,text,label,note\n1,a,pos,2\n")
    assert examples["train"] == [{"id": 0, "line": 2, "text": "a", "label": "pos"}]


def test_jsonl_labels_of_one_integer_are_one_class(tmp_path):
    rows = [1, 1.0, "1", " 2 ", 10, -3.0, "x"]
    content = "".join(json.dumps({"text": "t", "label": lab}) + "\n" for lab in rows)
    examples, labels, _ = _read(tmp_path / "train.jsonl", content)
    assert [ex["label"] for ex in examples["train"]] == ["1", "1", "1", "2", "10", "-3", "x"]
    assert labels == ["-3", "1", "10", "2", "x"]  # not all integers: sorted as text


@pytest.mark.parametrize(
    "label, shown", [("true", "True"), ("1.5", "1.5"), ("null", "None"), ('{"a": 1}', "{'a': 1}")]
)
def test_jsonl_label_that_is_not_a_string_or_integer_is_named(tmp_path, label, shown):
    content = '{"text": "a", "label": 1}\n{"text": "b", "label": %s}\n' % label
    with pytest.raises(
        DataFileError,
        match=r"^\S*train\.jsonl, line 2, field 'label': missing or invalid label "
        + re.escape(shown)
        + r" \(expected a string or an integer\)$",
    ):
        _read(tmp_path / "train.jsonl", content)


def test_label_order_numeric_only_for_ascii_integers(tmp_path):
    # "²".isdigit() is True but int("²") fails: such labels sort as text, without a crash.
    _, labels, _ = _read(tmp_path / "a.csv", "text,label\na,\u00b2\nb,10\nc,2\n")
    assert labels == ["10", "2", "\u00b2"]
    _, labels, _ = _read(tmp_path / "b.csv", "text,label\na,10\nb,2\nc,-1\nd,01\ne,1\n")
    assert labels == ["-1", "01", "1", "2", "10"]  # ties ("01", "1") by text: a fixed order


# ---------------------------------------------------------------------------- long sequences


def _tokenizer_dir(d: pathlib.Path, model_config: dict | None = None) -> pathlib.Path:
    """A 12-token WordPiece tokenizer with BERT's templates, and optionally a config.json."""
    return write_tokenizer_dir(d, model_config=model_config)


def _records(*texts):
    return [
        {"text": t.encode(), "label": np.int64(0), "id": np.int64(10 + i)}
        for i, t in enumerate(texts)
    ]


_LONG = _records(
    "the cat", "the cat sat on a mat the dog", "a dog", "a dog sat on the mat the cat sat"
)


def _dataset(tok, source, **kw):
    args = dict(batch_size=2, buckets=(4, 8), max_length=8, shuffle=False, seed=0)
    args.update(num_epochs=1, drop_remainder=False, split="train")
    return text.text_cls_dataset(source, tok, **{**args, **kw})


def test_long_examples_are_truncated_with_one_warning_and_a_count(tmp_path, caplog):
    tok = tokenizer.load_tokenizer(_tokenizer_dir(tmp_path / "tok"))
    with caplog.at_level(logging.WARNING, logger="sft_jax.data.text"):
        ds = _dataset(tok, _LONG)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "2 of 4 examples of split 'train' are longer than data.max_length=8 tokens (longest: 11 "
        "tokens; first: record id 11); they are truncated to 8 tokens"
    ]
    assert ds[0]["input_ids"].shape == (2, 8)  # still truncated, not dropped
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sft_jax.data.text"):
        _dataset(tok, _records("the cat", "a dog"))
    assert not caplog.records  # nothing cut, nothing said


def test_long_examples_are_rejected_when_truncation_is_off(tmp_path):
    tok = tokenizer.load_tokenizer(_tokenizer_dir(tmp_path / "tok"))
    with pytest.raises(
        ValueError,
        match=r"^2 of 4 examples of split 'train' are longer than data.max_length=8 tokens "
        r"\(longest: 11 tokens; first: record id 11\); raise data.max_length",
    ):
        _dataset(tok, _LONG, truncate=False)
    _dataset(tok, _records("the cat", "a dog"), truncate=False)  # short enough: accepted


def test_max_length_past_the_model_positions_is_rejected(tmp_path):
    d = _tokenizer_dir(tmp_path / "m", {"vocab_size": 12, "max_position_embeddings": 6})
    tok = tokenizer.load_tokenizer(d)
    assert tok.max_positions == 6
    with pytest.raises(
        ValueError,
        match=r"data.max_length=8 is longer than the model's maximum of 6 positions \(.*"
        r"config\.json\)",
    ):
        _dataset(tok, _records("the cat"))
    _dataset(tok, _records("the cat"), buckets=(4, 6), max_length=6)


def test_bucket_values_that_are_not_integers_name_the_key():
    with pytest.raises(ValueError, match=r"data\.buckets must be integers; got \('abc',\)"):
        text.check_buckets(("abc",), 8)


def test_chat_truncation_warns_with_the_count(caplog):
    tok = tiny_chat_tokenizer()
    short = {"messages": CONV[1:3]}  # "<user> hi <end> <assistant> hello there <end>": 7 tokens
    # CONV's first 9 tokens end with "<assistant> hello": cut, but one token still carries loss.
    with caplog.at_level(logging.WARNING, logger="sft_jax.data.lm"):
        rows = lm.chat_lm_rows(
            [short, {"messages": CONV}, short], tok, seq_len=9, pack=False, seed=0, shuffle=False
        )
    assert (rows.num_truncated, rows.num_dropped, len(rows)) == (1, 0, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "1 of 3 conversations are longer than data.max_length=9 tokens and were cut from the "
        "right to fit"
    ]


def test_chat_conversations_cut_to_no_loss_are_dropped_with_the_count(caplog):
    tok = tiny_chat_tokenizer()
    short = {"messages": CONV[1:3]}  # 7 tokens, 3 with loss ("hello there <end>")
    long = {"messages": CONV}  # its first 8 tokens end at "<assistant>": no loss left
    with caplog.at_level(logging.WARNING, logger="sft_jax.data.lm"):
        rows = lm.chat_lm_rows(
            [short, long, short, long], tok, seq_len=8, pack=False, seed=0, shuffle=False
        )
    assert (rows.num_conversations, rows.num_truncated, rows.num_dropped) == (4, 2, 2)
    assert (len(rows), rows.num_tokens, rows.num_loss_tokens) == (2, 14, 6)
    assert [int(r["loss_mask"].sum()) for r in rows.rows] == [3, 3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "2 of 4 conversations are longer than data.max_length=8 tokens and were cut from the "
        "right to fit",
        "2 of 4 conversations have no assistant token within the first data.max_length=8 tokens "
        "(the cut removed every token that carries loss) and were dropped",
    ]
    with pytest.raises(
        ValueError,
        match=r"^all 2 conversations have no assistant token within the first "
        r"data.max_length=8 tokens, so nothing is left to train on; raise data.max_length$",
    ):
        lm.chat_lm_rows([long, long], tok, seq_len=8, pack=True, seed=0, shuffle=False)


# ---------------------------------------------------------------------------- tokenizer vs model


def test_check_tokenizer_fits_names_both_sizes():
    check_tokenizer_fits(12, 12, "t")
    check_tokenizer_fits(12, 16, "t")  # models often pad their vocabulary
    with pytest.raises(
        ValueError,
        match=r"^t: the tokenizer has 13 token ids \(up to 12\) but the model's "
        r"embedding has only 12 rows",
    ):
        check_tokenizer_fits(13, 12, "t")


def test_check_max_length():
    check_max_length(512, 512, "data.max_length")
    check_max_length(4096, None, "data.max_length")  # unknown: nothing to check
    with pytest.raises(ValueError, match=r"^data.max_length=513 is longer .* of 512 positions"):
        check_max_length(513, 512, "data.max_length", "x/config.json")


def test_read_model_limits(tmp_path):
    assert read_model_limits(tmp_path) == ModelLimits(None, None, str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50257, "n_positions": 1024}))
    limits = read_model_limits(tmp_path)
    assert (limits.vocab_size, limits.max_positions) == (50257, 1024)


def test_text_tokenizer_bigger_than_the_model_vocab_is_rejected(tmp_path):
    d = _tokenizer_dir(tmp_path / "m", {"vocab_size": 10, "max_position_embeddings": 16})
    with pytest.raises(
        ValueError,
        match=r"tokenizer\.json vs .*config\.json: the tokenizer has 12 token ids \(up to 11\) "
        r"but the model's embedding has only 10 rows",
    ):
        tokenizer.load_tokenizer(d)
    (d / "config.json").write_text(json.dumps({"vocab_size": 12}))
    assert tokenizer_id_limit(tokenizer.load_tokenizer(d)) == 12


def test_chat_tokenizer_bigger_than_the_model_vocab_is_rejected(tmp_path):
    tok = tiny_chat_tokenizer()
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(
        ValueError,
        match=r"\(tokenizer\) vs .*config\.json: the tokenizer has 13 token ids \(up to 12\) but "
        r"the model's embedding has only 10 rows",
    ):
        lm.load_chat_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 16}))
    assert tokenizer_id_limit(lm.load_chat_tokenizer(tmp_path)) == 13
