"""Generation-based evaluation: prompts, left padding, replies that stop, exact match."""

import numpy as np
import pytest

from sft_jax import gen_eval
from sft_jax.data.chat import encode_chat
from sft_jax.generate import Generation
from tests.tiny_chat import CONV, tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


def test_split_prompt_and_prompt_ids(tok):
    turns, reference = gen_eval.split_prompt(CONV)
    assert reference == "ok" and turns == CONV[:4]
    # "<system> be nice <end> <user> hi <end> <assistant> hello there <end> <user> bye <end>
    # <assistant>": the conversation up to the reply, ending with the generation prompt.
    assert gen_eval.prompt_ids(tok, turns) == [3, 6, 7, 2, 4, 8, 2, 5, 9, 10, 2, 4, 12, 2, 5]
    full = encode_chat(CONV, tok).input_ids.tolist()
    assert full[:15] == gen_eval.prompt_ids(tok, turns)


def test_left_pad_rounds_length_and_fills_rows():
    ids, mask = gen_eval._left_pad([[7, 8, 9], [5]], rows=3, multiple=4, pad_id=1)
    np.testing.assert_array_equal(ids, [[1, 7, 8, 9], [1, 1, 1, 5], [1, 7, 8, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]])
    # Rounding stops at the room a learned position table leaves, never below the prompt.
    ids, _ = gen_eval._left_pad([[7, 8, 9], [5]], rows=2, multiple=4, pad_id=1, most=3)
    np.testing.assert_array_equal(ids, [[7, 8, 9], [1, 1, 5]])
    ids, _ = gen_eval._left_pad([[7, 8, 9]], rows=1, multiple=4, pad_id=1, most=2)
    np.testing.assert_array_equal(ids, [[7, 8, 9]])  # too long: generate names the limit


def test_rounding_never_pushes_a_fitting_prompt_past_gpt2_positions(tok):
    """An 8-token prompt and 6 new tokens fit 16 learned positions; rounding the prompt to 12
    made generate refuse it ("exceeds the model's 16 learned positions")."""
    from flax import nnx

    from sft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(cfg, rngs=nnx.Rngs(0))
    prompt = gen_eval.prompt_ids(tok, CONV[:2])
    assert len(prompt) == 8
    (reply,) = gen_eval.generate_replies(
        model, tok, [prompt], batch_size=1, max_new_tokens=6, length_multiple=12
    )
    assert 1 <= reply.num_tokens <= 6


def test_exact_match_eval_scores_and_stops(tok, monkeypatch):
    # Row 0 answers "ok <end>" (correct, stopped); row 1 "hello hello ..." never stops.
    script = np.array([[11, 2, 1, 1], [9, 9, 9, 9]], np.int32)

    def fake_generate(model, ids, mask, *, max_new_tokens, stop_ids, pad_id, **kw):
        assert stop_ids == (2,) and pad_id == 1 and max_new_tokens == 4
        return Generation(script[: len(ids)], np.array([2, 4]))

    monkeypatch.setattr(gen_eval, "generate", fake_generate)
    records = [
        {"messages": CONV, "answer": "", "family": "a"},
        {"messages": CONV[:3], "answer": "hello there", "family": "b"},
    ]
    out = gen_eval.exact_match_eval(None, tok, records, batch_size=2, max_new_tokens=4)
    assert out["exact_match"] == 0.5 and out["stopped"] == 0.5
    assert out["exact_match_by_family"] == {"a": 1.0, "b": 0.0}
    assert out["mean_reply_tokens"] == 3.0 and out["num_examples"] == 2
    assert out["samples"][1] == {"prompt": "hi", "reference": "hello there",
                                 "reply": "hello hello hello hello"}  # fmt: skip
    with pytest.raises(ValueError, match="empty split"):  # not NaN metrics
        gen_eval.exact_match_eval(None, tok, [], batch_size=2, max_new_tokens=4)


def test_sampled_replies_differ_between_batches(tok):
    """Each batch samples with its own key: with one key for all, row r of every batch drew the
    same random numbers, so the same prompt in eight batches of one got eight equal replies."""
    import jax
    from flax import nnx

    from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, initializer_range=1.0,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    prompts = [gen_eval.prompt_ids(tok, CONV[1:2])] * 8
    kw = dict(max_new_tokens=12, length_multiple=8, temperature=1.0, rng=jax.random.key(0))
    replies = gen_eval.generate_replies(model, tok, prompts, batch_size=1, **kw)
    assert len({r.text for r in replies}) > 1, [r.text for r in replies]
