"""Tests for sft_jax.data.lm: rows of a split, batches with targets, per-epoch reshuffle."""

import ml_collections
import numpy as np
import pytest

from sft_jax import components
from sft_jax.data import lm
from tests.tiny_chat import CONV, tiny_chat_tokenizer

SHORT = [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]
# CONV renders as 17 tokens, SHORT as 6: "<user> bye <end> <assistant> ok <end>".


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


def source(n_long: int, n_short: int) -> list[dict]:
    return [{"messages": CONV}] * n_long + [{"messages": SHORT}] * n_short


def test_packed_rows_exact(tok):
    rows = lm.chat_lm_rows(source(1, 2), tok, seq_len=18, pack=True, seed=0, shuffle=False)
    # CONV (17) fills row 1; the two SHORT conversations (6 + 6) share row 2.
    assert len(rows) == 2 and rows.num_conversations == 3 and rows.num_truncated == 0
    assert rows.num_tokens == 29 and rows.num_loss_tokens == 5 + 2 + 2 and rows.pad_id == 1
    assert rows.max_segments == 2
    np.testing.assert_array_equal(rows.rows[0]["segment_ids"], [1] * 17 + [0])
    r = rows.rows[1]
    np.testing.assert_array_equal(r["input_ids"], [4, 12, 2, 5, 11, 2] * 2 + [1] * 6)
    np.testing.assert_array_equal(r["segment_ids"], [1] * 6 + [2] * 6 + [0] * 6)
    np.testing.assert_array_equal(r["positions"], list(range(6)) * 2 + [0] * 6)
    np.testing.assert_array_equal(r["loss_mask"], [0, 0, 0, 0, 1, 1] * 2 + [0] * 6)


def test_packing_counts_conversations_cut_to_fit(tok):
    rows = lm.chat_lm_rows(source(1, 1), tok, seq_len=16, pack=True, seed=0, shuffle=False)
    assert rows.num_truncated == 1 and rows.num_tokens == 16 + 6


def test_unpacked_rows_one_conversation_each_and_truncation(tok):
    rows = lm.chat_lm_rows(source(1, 2), tok, seq_len=9, pack=False, seed=0, shuffle=False)
    assert len(rows) == 3 and rows.num_truncated == 1  # CONV cut to 9 tokens
    assert rows.max_segments == 1
    np.testing.assert_array_equal(rows.rows[0]["segment_ids"], [1] * 9)
    np.testing.assert_array_equal(rows.rows[0]["loss_mask"], [0] * 8 + [1])  # "hello" is left
    np.testing.assert_array_equal(rows.rows[2]["segment_ids"], [1] * 6 + [0] * 3)


def test_packing_drops_conversations_cut_to_no_loss(tok):
    # CONV's first 8 tokens end at "<assistant>": no loss left, so it takes no room in a row.
    rows = lm.chat_lm_rows(source(1, 2), tok, seq_len=8, pack=True, seed=0, shuffle=False)
    assert (rows.num_conversations, rows.num_truncated, rows.num_dropped) == (3, 1, 1)
    assert (len(rows), rows.num_tokens, rows.num_loss_tokens) == (2, 12, 4)
    for r in rows.rows:  # one SHORT per row: two do not fit in 8 tokens
        np.testing.assert_array_equal(r["input_ids"], [4, 12, 2, 5, 11, 2, 1, 1])
        np.testing.assert_array_equal(r["loss_mask"], [0, 0, 0, 0, 1, 1, 0, 0])


def test_eval_batches_fill_last_batch_with_empty_rows(tok):
    rows = lm.chat_lm_rows(source(1, 2), tok, seq_len=16, pack=False, seed=0, shuffle=False)
    ds = lm.chat_lm_dataset(
        rows, batch_size=2, shuffle=False, seed=0, num_epochs=1, drop_remainder=False
    )
    assert len(ds) == 2
    last = ds[1]
    assert set(last) == {"input_ids", "targets", "target_mask", "segment_ids", "positions",
                         "loss_mask"}  # fmt: skip
    assert all(v.shape == (2, 16) and v.dtype == np.int32 for v in last.values())
    np.testing.assert_array_equal(last["segment_ids"][1], 0)
    np.testing.assert_array_equal(last["input_ids"][1], 1)  # pad id
    assert last["target_mask"][1].sum() == 0
    # Targets: "ok <end>" of SHORT, predicted from "<assistant>" and "ok".
    np.testing.assert_array_equal(last["targets"][0][last["target_mask"][0] == 1], [11, 2])


def test_training_batches_reshuffle_each_epoch_and_repeat_exactly(tok):
    src = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": "ok"}]}
           for w in ("hi", "bye", "hello", "there", "be", "nice")]  # fmt: skip
    rows = lm.chat_lm_rows(src, tok, seq_len=6, pack=True, seed=0, shuffle=True)
    assert len(rows) == 6
    epoch = lm.chat_lm_dataset(
        rows, batch_size=2, shuffle=True, seed=0, num_epochs=1, drop_remainder=True
    )
    assert len(epoch) == 3
    ds = epoch.repeat()
    first = np.concatenate([ds[i]["input_ids"][:, 1] for i in range(3)])
    second = np.concatenate([ds[i]["input_ids"][:, 1] for i in range(3, 6)])
    assert sorted(first) == sorted(second) == sorted([8, 12, 9, 10, 6, 7])
    assert not np.array_equal(first, second)  # reshuffled
    np.testing.assert_array_equal(ds[4]["input_ids"], epoch.repeat()[4]["input_ids"])


def test_eval_batches_sample_the_whole_split_in_a_fixed_order(tok):
    """A partial evaluation (``train.max_eval_batches``) must not see only the first topics of a
    split sorted by topic: evaluation shuffles conversations with a fixed seed, not the run's."""
    words = ("hi", "bye", "hello", "there", "be", "nice") * 4
    src = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": "ok"}]}
           for w in sorted(words)]  # fmt: skip

    def first_words(seed: int) -> list[int]:
        cfg = ml_collections.ConfigDict(
            {
                "seed": seed,
                "model": {"task": "causal_lm"},
                "data": {"max_length": 6, "pack": False, "batch_size": 4, "eval_batch_size": 5},
            }
        )
        split = type("D", (), {"sources": {"validation": src}})()
        ds = components.batches(cfg, split, tok, "validation", train=False)
        assert len(ds) == 5  # 24 rows and one filler row
        return [int(b["input_ids"][r, 1]) for b in ds for r in range(5) if b["segment_ids"][r, 0]]

    order = first_words(seed=1)
    assert sorted(order) == sorted(tok.convert_tokens_to_ids(list(words)))
    assert len(set(order[:5])) >= 4  # the first batch spans the split (in file order: 2 words)
    assert first_words(seed=2) == order  # the same evaluation whatever the run's seed


def test_stop_and_pad_ids(tok):
    assert lm.stop_token_ids(tok) == (2,)
    assert lm.pad_token_id(tok) == 1


def test_errors(tok):
    rows = lm.chat_lm_rows(source(0, 1), tok, seq_len=8, pack=False, seed=0, shuffle=False)
    with pytest.raises(ValueError, match="1 rows, fewer than batch_size=2"):
        lm.chat_lm_dataset(rows, batch_size=2, shuffle=True, seed=0, num_epochs=None,
                           drop_remainder=True)  # fmt: skip
