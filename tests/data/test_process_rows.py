"""Each process of a multi-host run builds only its rows of every batch
(`process_rows`, sft_jax.data.records): the parts, put together, are the batch one process
builds, and a part reads, tokenizes or decodes only its own examples."""

import io

import numpy as np
import pytest
from PIL import Image

from sft_jax.data import chat, lm, records, text, vision
from sft_jax.data.limits import ImageSpec
from sft_jax.data.tokenizer import load_tokenizer
from tests.tiny_wordpiece import CLS, PAD, SEP, write_tokenizer_dir


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return load_tokenizer(write_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def _records(*rows):
    return [{"text": t.encode(), "label": np.int64(lab), "id": np.int64(i)}
            for i, (t, lab) in enumerate(rows)]  # fmt: skip


class Counted(list):
    """A list source that counts the records read from it."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


class CountedBatched(Counted):
    """... read in one call per batch where the pipeline can (as tfds array_record sources)."""

    def __getitems__(self, indices):
        return [self[i] for i in indices]


def _parts_equal_whole(whole, parts):
    """Batch by batch, the parts' rows in order are the whole batch's."""
    assert all(len(p) == len(whole) for p in parts)
    for i in range(len(whole)):
        batch = whole[i]
        for key, value in batch.items():
            np.testing.assert_array_equal(np.concatenate([p[i][key] for p in parts]), value)


def _halves(batch_size, n):
    return [slice(k * batch_size // n, (k + 1) * batch_size // n) for k in range(n)]


def test_check_rows():
    assert records.check_rows(None, 4) == range(4)
    assert records.check_rows(slice(2, 4), 4) == range(2, 4)
    for bad in (slice(2, 2), slice(0, 5), slice(0, 4, 2), slice(None, 2), slice(-2, 4)):
        with pytest.raises(ValueError, match="contiguous part of 4 rows"):
            records.check_rows(bad, 4)


@pytest.mark.parametrize("counted", [Counted, CountedBatched])
def test_text_part_is_padded_to_the_whole_batch_bucket_and_reads_only_its_records(
    tiny_tok, counted
):
    source = counted(_records(("the cat", 0), ("the cat sat on the mat", 1), ("a dog", 2),
                              ("dogs", 0), ("the mat", 1)))  # fmt: skip
    kw = dict(batch_size=4, buckets=(4, 8), max_length=8, shuffle=False, seed=0, num_epochs=1,
              drop_remainder=False)  # fmt: skip
    part = text.text_cls_dataset(source, tiny_tok, process_rows=slice(2, 4), **kw)
    source.reads = 0
    batch = part[0]
    assert source.reads == 2  # "a dog", "dogs": not the other process's rows
    # Its own rows fit 4 tokens; the batch's longest (8: "[CLS] the cat sat on the mat [SEP]")
    # is the other process's, and decides the bucket.
    np.testing.assert_array_equal(
        batch["input_ids"],
        [[CLS, 9, 10, SEP, PAD, PAD, PAD, PAD], [CLS, 10, 11, SEP, PAD, PAD, PAD, PAD]],
    )
    np.testing.assert_array_equal(batch["attention_mask"], [[1] * 4 + [0] * 4] * 2)
    np.testing.assert_array_equal(batch["labels"], [2, 0])
    np.testing.assert_array_equal(batch["example_mask"], [1.0, 1.0])
    # The last batch: one example, then filler rows; this part holds only filler.
    source.reads = 0
    last = part[1]
    assert source.reads == 0
    np.testing.assert_array_equal(last["input_ids"], [[CLS, SEP, PAD, PAD]] * 2)
    np.testing.assert_array_equal(last["example_mask"], [0.0, 0.0])
    whole = text.text_cls_dataset(source, tiny_tok, **kw)
    _parts_equal_whole(whole, [text.text_cls_dataset(source, tiny_tok, process_rows=r, **kw)
                               for r in _halves(4, 2)])  # fmt: skip


def test_text_parts_make_the_whole_training_stream(tiny_tok):
    texts = ["the cat", "the cat sat on the mat the cat sat", "a dog", "dogs", "the mat", "a",
             "on the mat sat a dog", "cats", "the dog sat", "a cat on a mat"]  # fmt: skip
    source = _records(*[(t, i % 3) for i, t in enumerate(texts)])
    kw = dict(batch_size=4, buckets=(4, 8), max_length=8, shuffle=True, seed=3, num_epochs=3,
              drop_remainder=True)  # fmt: skip
    whole = text.text_cls_dataset(source, tiny_tok, **kw)
    assert {whole[i]["input_ids"].shape[1] for i in range(len(whole))} == {4, 8}  # 2 buckets
    for n in (2, 4):
        parts = [text.text_cls_dataset(source, tiny_tok, process_rows=r, **kw)
                 for r in _halves(4, n)]  # fmt: skip
        _parts_equal_whole(whole, parts)


def _lm_rows(n: int, seq_len: int = 6) -> lm.Rows:
    rng = np.random.default_rng(0)
    rows = [{k: rng.integers(1, 50, seq_len).astype(np.int32) for k in chat.ROW_KEYS}
            for _ in range(n)]  # fmt: skip
    return lm.Rows(rows, num_conversations=n, num_truncated=0, num_tokens=n * seq_len,
                   num_loss_tokens=n * seq_len, pad_id=0)  # fmt: skip


@pytest.mark.parametrize("train", [True, False])
def test_lm_parts_make_the_whole_stream(train):
    rows = _lm_rows(11)
    kw = dict(batch_size=4, shuffle=train, seed=2, num_epochs=3 if train else 1,
              drop_remainder=train)  # fmt: skip
    whole = lm.chat_lm_dataset(rows, **kw)
    parts = [lm.chat_lm_dataset(rows, process_rows=r, **kw) for r in _halves(4, 2)]
    _parts_equal_whole(whole, parts)
    assert parts[1][0]["input_ids"].shape == (2, 6)


def _image_source() -> list[dict]:
    """Images of many shapes, some narrow enough that a random crop's area / aspect draws are
    retried (how many times depends on the image's size), some PNG-encoded."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(19):
        h, w = int(rng.integers(8, 40)), int(rng.integers(3, 40))
        image = rng.integers(0, 256, (h, w, 3 if i % 2 else 1), dtype=np.uint8)
        if i % 3 == 0:
            buf = io.BytesIO()
            Image.fromarray(image[..., 0] if i % 2 == 0 else image).save(buf, format="PNG")
            image = buf.getvalue()
        out.append({"image": image, "label": i % 4, "id": i})
    return out


@pytest.mark.parametrize("train", [True, False])
def test_image_parts_make_the_whole_stream_augmentation_included(train, monkeypatch):
    source = _image_source()
    spec = ImageSpec(size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), source="test")
    augment = {"enabled": True, "scale": (0.05, 1.0), "ratio": (0.2, 5.0), "shear_degrees": 10.0,
               "hflip": True, "translate": 0.1}  # fmt: skip
    kw = dict(image_size=8, batch_size=8, train=train, augment=augment, seed=5, shuffle=True,
              drop_remainder=train, num_epochs=2)  # fmt: skip
    whole = vision.image_cls_dataset(source, spec, **kw)
    parts = [vision.image_cls_dataset(source, spec, process_rows=r, **kw) for r in _halves(8, 4)]
    _parts_equal_whole(whole, parts)
    # The last part resamples only its 2 images (the draws of the 6 before it are replayed from
    # their sizes, not by decoding them).
    calls = []
    real = vision.view_pixels
    monkeypatch.setattr(vision, "view_pixels", lambda *a: calls.append(1) or real(*a))
    parts[3][0]
    assert len(calls) == 2
