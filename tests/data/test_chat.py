"""Tests for sft_jax.data.chat: validation, loss masks (tiny and SmolLM2), packing, targets."""

import numpy as np
import pytest
import transformers

from sft_jax.data import chat
from sft_jax.data.chat import ChatEncoded
from tests.tiny_chat import CONV, tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tiny_tok() -> transformers.PreTrainedTokenizerFast:
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2-135M-Instruct's real tokenizer (ChatML template), from its GGUF file."""
    import sft_jax
    from sft_jax.hf.gguf import load_gguf_tokenizer

    try:
        path = sft_jax.resolve_model_dir("smollm2-135m-instruct")
    except Exception as e:  # noqa: BLE001 (asset package missing)
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    return load_gguf_tokenizer(path)


def test_encode_chat_tiny_exact(tiny_tok):
    enc = chat.encode_chat(CONV, tiny_tok)
    # <system> be nice <end> <user> hi <end> <assistant> hello there <end> <user> bye <end>
    # <assistant> ok <end>
    np.testing.assert_array_equal(
        enc.input_ids, [3, 6, 7, 2, 4, 8, 2, 5, 9, 10, 2, 4, 12, 2, 5, 11, 2]
    )
    np.testing.assert_array_equal(
        enc.loss_mask, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    )
    assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == np.int32
    assert not enc.truncated


def test_encode_chat_truncates_from_the_right(tiny_tok):
    enc = chat.encode_chat(CONV, tiny_tok, max_length=10)
    np.testing.assert_array_equal(enc.input_ids, [3, 6, 7, 2, 4, 8, 2, 5, 9, 10])
    np.testing.assert_array_equal(enc.loss_mask, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    assert enc.truncated
    assert not chat.encode_chat(CONV, tiny_tok, max_length=17).truncated


def test_encode_chat_smollm2_loss_tokens(smol_tok):
    conv = [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say ok"},
        {"role": "assistant", "content": "ok"},
    ]
    enc = chat.encode_chat(conv, smol_tok)
    text = smol_tok.apply_chat_template(conv, tokenize=False)
    assert smol_tok.decode(enc.input_ids) == text  # no extra special tokens
    on = enc.input_ids[enc.loss_mask == 1]
    off = enc.input_ids[enc.loss_mask == 0]
    assert smol_tok.decode(on) == "Hello! How can I help?<|im_end|>ok<|im_end|>"
    assert [smol_tok.decode([i]) for i in on][-2:] == ["ok", "<|im_end|>"]
    assert smol_tok.decode(off) == (
        "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nSay ok<|im_end|>\n<|im_start|>assistant\n\n"
    )
    # Runs of loss tokens: exactly the two replies, each ending at its <|im_end|>.
    starts = np.flatnonzero(np.diff(np.concatenate([[0], enc.loss_mask])) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate([enc.loss_mask, [0]])) == -1)
    assert [smol_tok.decode(enc.input_ids[s : e + 1]) for s, e in zip(starts, ends)] == [
        "Hello! How can I help?<|im_end|>",
        "ok<|im_end|>",
    ]
    prompts = [smol_tok.decode(enc.input_ids[s - 4 : s]) for s in starts]  # "ass" "istant"
    assert prompts == ["<|im_start|>assistant\n"] * 2


def test_encode_chat_smollm2_default_system_prompt(smol_tok):
    # Without a system turn the template injects its default one; it carries no loss.
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]
    enc = chat.encode_chat(conv, smol_tok, max_length=64)
    assert "SmolLM" in smol_tok.decode(enc.input_ids)
    assert smol_tok.decode(enc.input_ids[enc.loss_mask == 1]) == "Yes.<|im_end|>"


def _enc(n: int, start: int, mask: list[int] | None = None) -> ChatEncoded:
    ids = np.arange(start, start + n, dtype=np.int32)
    m = np.asarray(mask if mask is not None else [0] * n, np.int32)
    return ChatEncoded(input_ids=ids, loss_mask=m)


def test_pack_first_fit_exact():
    convs = [_enc(4, 10, [0, 0, 1, 1]), _enc(5, 20, [0, 1, 1, 1, 1]), _enc(3, 30, [0, 1, 1])]
    packed = chat.pack(convs, seq_len=8, pad_id=99)
    assert packed.num_truncated == 0 and len(packed.rows) == 2
    r0, r1 = packed.rows
    # Row 0: conversations 1 and 3 (3 fits after 1); row 1: conversation 2.
    np.testing.assert_array_equal(r0["input_ids"], [10, 11, 12, 13, 30, 31, 32, 99])
    np.testing.assert_array_equal(r0["loss_mask"], [0, 0, 1, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(r0["positions"], [0, 1, 2, 3, 0, 1, 2, 0])
    np.testing.assert_array_equal(r1["input_ids"], [20, 21, 22, 23, 24, 99, 99, 99])
    np.testing.assert_array_equal(r1["loss_mask"], [0, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(r1["segment_ids"], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(r1["positions"], [0, 1, 2, 3, 4, 0, 0, 0])
    assert all(v.dtype == np.int32 and v.shape == (8,) for r in packed.rows for v in r.values())


def test_pack_truncates_long_conversations():
    packed = chat.pack([_enc(6, 0, [1] * 6), _enc(2, 50)], seq_len=4)
    assert packed.num_truncated == 1 and len(packed.rows) == 2
    np.testing.assert_array_equal(packed.rows[0]["input_ids"], [0, 1, 2, 3])
    np.testing.assert_array_equal(packed.rows[0]["segment_ids"], [1, 1, 1, 1])
    np.testing.assert_array_equal(packed.rows[1]["input_ids"], [50, 51, 0, 0])


def test_pad_row_exact():
    row = chat.pad_row(_enc(3, 5, [0, 1, 1]), 5, pad_id=7)
    np.testing.assert_array_equal(row["input_ids"], [5, 6, 7, 7, 7])
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 4])
    cut = chat.pad_row(_enc(3, 5, [0, 1, 1]), 2)
    np.testing.assert_array_equal(cut["input_ids"], [5, 6])
    np.testing.assert_array_equal(cut["segment_ids"], [1, 1])


def test_shift_targets_exact_across_segments():
    row = {
        "input_ids": np.array([10, 11, 12, 13, 30, 31, 32, 0], np.int32),
        "loss_mask": np.array([0, 0, 1, 1, 0, 1, 1, 0], np.int32),
        "segment_ids": np.array([1, 1, 1, 1, 2, 2, 2, 0], np.int32),
        "positions": np.array([0, 1, 2, 3, 0, 1, 2, 0], np.int32),
    }
    out = chat.shift_targets(row)
    np.testing.assert_array_equal(out["targets"], [11, 12, 13, 0, 31, 32, 0, 0])
    np.testing.assert_array_equal(out["target_mask"], [0, 1, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["input_ids"], row["input_ids"])
    batched = chat.shift_targets({k: np.stack([v, v]) for k, v in row.items()})
    np.testing.assert_array_equal(batched["targets"][1], out["targets"])
    np.testing.assert_array_equal(batched["target_mask"][1], out["target_mask"])


def test_end_to_end_targets_cover_replies(tiny_tok):
    row = chat.shift_targets(chat.pad_row(chat.encode_chat(CONV, tiny_tok), 18))
    # The loss predicts exactly: hello there <end> ok <end>.
    np.testing.assert_array_equal(row["targets"][row["target_mask"] == 1], [9, 10, 2, 11, 2])


_W = "train.jsonl, line 7"


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "train.jsonl, line 7: messages must be a non-empty list of turns, got []"),
        ("hi", "train.jsonl, line 7: messages must be a non-empty list of turns, got 'hi'"),
        (["hi"], "train.jsonl, line 7: turn 0 must be an object with role and content"),
        (
            [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}],
            "train.jsonl, line 7: turn 1 has unknown role 'bot' "
            "(expected system, user or assistant)",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}],
            "train.jsonl, line 7: turn 1 (assistant) content must be a string, got int",
        ),
        (
            [{"role": "user", "content": "  "}, {"role": "assistant", "content": "yo"}],
            "train.jsonl, line 7: turn 0 (user) has empty content",
        ),
        (
            [{"role": "assistant", "content": "yo"}],
            "train.jsonl, line 7: turn 0 has role 'assistant', expected 'user' (an optional "
            "system turn first, then user and assistant alternating, starting with user)",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "system", "content": "late"},
            ],
            "train.jsonl, line 7: turn 2 has role 'system', expected 'user' (an optional "
            "system turn first, then user and assistant alternating, starting with user)",
        ),
        (
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
            ],
            "train.jsonl, line 7: turn 2 has role 'user', expected 'assistant' (an optional "
            "system turn first, then user and assistant alternating, starting with user)",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}],
            "train.jsonl, line 7: conversation has no assistant turn",
        ),
    ],
)
def test_validate_messages_errors(messages, message):
    with pytest.raises(ValueError) as info:
        chat.validate_messages(messages, where=_W)
    assert str(info.value) == message


def test_validate_messages_ok_strips_extra_keys():
    conv = [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "yo"}]
    assert chat.validate_messages(conv, where=_W) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    assert chat.validate_messages(CONV, where=_W) == CONV
