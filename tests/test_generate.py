"""KV-cache decoding: cached == uncached == transformers' generate; sampling; stop tokens."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sft_jax.generate import generate, generate_without_cache, sample_logits
from sft_jax.hf.gpt2 import load_gpt2
from sft_jax.hf.llama import load_llama
from tests.hf.test_gpt2_hf import torch_gpt2
from tests.hf.test_llama_hf import CASES, torch_lm

N = 8
PAD = 0


def prompts(vocab, seed=0):
    """Three left-padded prompts of 6, 4 and 2 tokens in a [3, 6] batch."""
    ids = np.random.RandomState(seed).randint(3, vocab, (3, 6)).astype(np.int32)
    mask = (np.arange(6)[None] >= np.array([0, 2, 4])[:, None]).astype(np.int32)
    return ids * mask, mask


def hf_generate(ref, ids, mask, stop, n=N):
    """transformers' greedy decoding, new tokens padded to [B, n] with PAD.

    One torch thread: eager decoding is latency-bound, and on a small busy CPU more threads
    make it 30x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = ref.generate(
                torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=PAD,
            )[:, ids.shape[1]:].numpy()  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=PAD)


def check_greedy(ours, ref, vocab):
    """Greedy cached == uncached == transformers, with a stop token met mid-way by row 0."""
    ids, mask = prompts(vocab)
    free = np.asarray(generate(ours, ids, mask, max_new_tokens=N).tokens[0])
    # Row 0 stops at the first step >= 1 that emits a new token (so padding follows it).
    step = next((k for k in range(1, N - 1) if free[k] not in free[:k]), N - 1)
    stop = int(free[step])
    got = generate(ours, ids, mask, max_new_tokens=N, stop_ids=[stop], pad_id=PAD)
    ref_tokens = generate_without_cache(ours, ids, mask, max_new_tokens=N, stop_ids=[stop])
    one_id = generate(ours, ids, mask, max_new_tokens=N, stop_ids=np.int64(stop), pad_id=PAD)
    np.testing.assert_array_equal(one_id.tokens, got.tokens)  # a single id, as transformers
    want = hf_generate(ref, ids, mask, stop)
    print(f"greedy tokens:\n{np.asarray(got.tokens)}\nlengths {np.asarray(got.lengths)}")
    np.testing.assert_array_equal(got.tokens, want)
    np.testing.assert_array_equal(ref_tokens.tokens, want)
    np.testing.assert_array_equal(got.lengths, ref_tokens.lengths)
    assert int(got.lengths[0]) == step + 1 and int(got.tokens[0, step]) == stop
    assert (np.asarray(got.tokens[0, step + 1 :]) == PAD).all()


def test_llama_greedy_matches_transformers(tmp_path):
    ref = torch_lm(seed=3, **CASES["gqa_tied"])
    ref.save_pretrained(tmp_path)
    check_greedy(load_llama(tmp_path), ref, CASES["gqa_tied"]["vocab_size"])


def test_gpt2_greedy_matches_transformers(tmp_path):
    config = dict(vocab_size=67, n_positions=32, n_embd=16, n_layer=2, n_head=4)
    ref = torch_gpt2(seed=3, **config)
    ref.save_pretrained(tmp_path)
    check_greedy(load_gpt2(tmp_path), ref, 67)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch_lm(seed=4, **CASES["mha_untied"]).save_pretrained(path)
    return load_llama(path), *prompts(CASES["mha_untied"]["vocab_size"], seed=1)


def test_sampling_is_deterministic_and_top_k1_is_greedy(tiny):
    model, ids, mask = tiny
    kw = dict(max_new_tokens=N, temperature=1.0, top_p=0.95)
    a = generate(model, ids, mask, rng=jax.random.key(1), **kw).tokens
    np.testing.assert_array_equal(a, generate(model, ids, mask, rng=jax.random.key(1), **kw).tokens)
    assert not np.array_equal(a, generate(model, ids, mask, rng=jax.random.key(2), **kw).tokens)
    uncached = generate_without_cache(model, ids, mask, rng=jax.random.key(1), **kw).tokens
    np.testing.assert_array_equal(a, uncached)
    greedy = generate(model, ids, mask, max_new_tokens=N).tokens
    top1 = generate(model, ids, mask, max_new_tokens=N, temperature=0.7, top_k=1,
                    rng=jax.random.key(5)).tokens  # fmt: skip
    np.testing.assert_array_equal(top1, greedy)


def test_right_padded_prompts_decode_like_left_padded(tiny):
    model, ids, mask = tiny
    right_ids = np.stack([np.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask)])
    right_mask = np.sort(mask, axis=1)[:, ::-1].copy()
    left = generate(model, ids, mask, max_new_tokens=N).tokens
    np.testing.assert_array_equal(
        generate(model, right_ids, right_mask, max_new_tokens=N).tokens, left
    )


def test_sample_logits_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.key(0)
    top2 = sample_logits(logits, keys, temperature=1.0, top_k=2)
    assert set(np.unique(top2)) == {0, 1}
    nucleus = sample_logits(logits, keys, temperature=1.0, top_p=0.8)  # 0.5 + 0.3 reaches 0.8
    assert set(np.unique(nucleus)) == {0, 1}
    assert set(np.unique(sample_logits(logits, keys, temperature=1.0, top_p=0.4))) == {0}
    everything = sample_logits(logits, keys, temperature=1.0)
    assert set(np.unique(everything)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="needs an rng"):
        generate(None, jnp.ones((1, 2), jnp.int32), max_new_tokens=2, temperature=1.0)


def test_gpt2_position_limit_is_checked(tmp_path):
    torch_gpt2(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="exceeds the model's 8 learned positions"):
        generate(load_gpt2(tmp_path), jnp.ones((1, 5), jnp.int32), max_new_tokens=4)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(tmp_path):
    """The reference is transformers' generate on our export of the GGUF weights (that import
    is checked against transformers' own GGUF reading in tests/hf/test_gguf.py)."""
    import transformers

    import sft_jax
    from sft_jax.hf.gguf import load_gguf_tokenizer
    from sft_jax.hf.llama import export_llama
    from sft_jax.pretrained import resolve_model_dir

    path = resolve_model_dir("smollm2-135m-instruct")
    tok = load_gguf_tokenizer(path)
    chats = [[{"role": "user", "content": q}] for q in ("What is 2+2?", "Name a primary color.")]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    tok.padding_side = "left"
    enc = tok(texts, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    ours = sft_jax.load_pretrained("smollm2-135m-instruct", task="causal_lm")
    got = generate(ours, ids, mask, max_new_tokens=16, stop_ids=[tok.eos_token_id], pad_id=PAD)
    export_llama(ours, tmp_path, tokenizer=tok)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    exported_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert exported_tok.chat_template == tok.chat_template and exported_tok.eos_token_id == 2
    assert exported_tok(texts[0]).input_ids == tok(texts[0]).input_ids
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (tmp_path / "special_tokens_map.json").is_file()
    want = hf_generate(ref.eval(), ids, mask, tok.eos_token_id, n=16)
    print([tok.decode(np.asarray(r)) for r in got.tokens])
    np.testing.assert_array_equal(got.tokens, want)
    uncached = generate_without_cache(ours, ids, mask, max_new_tokens=16,
                                      stop_ids=[tok.eos_token_id], pad_id=PAD)  # fmt: skip
    np.testing.assert_array_equal(uncached.tokens, want)


def test_sample_logits_clamps_top_k_to_the_vocabulary():
    """transformers clamps top_k to V; lax.top_k would fail on k > V."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
    key = jax.random.key(0)
    big = sample_logits(logits, key, temperature=1.0, top_k=50)
    np.testing.assert_array_equal(big, sample_logits(logits, key, temperature=1.0))


def test_out_of_range_prompt_ids_are_named(tiny):
    model, ids, mask = tiny
    vocab = CASES["mha_untied"]["vocab_size"]
    bad = ids.copy()
    bad[1, 4] = vocab
    for decode in (generate, generate_without_cache):
        with pytest.raises(ValueError, match=rf"prompt_ids\[1, 4\] = {vocab} .*vocab_size={vocab}"):
            decode(model, bad, mask, max_new_tokens=2)
    padded = np.where(mask == 1, ids, vocab)  # masked padding may hold any id
    np.testing.assert_array_equal(
        generate(model, padded, mask, max_new_tokens=N).tokens,
        generate(model, ids, mask, max_new_tokens=N).tokens,
    )


def test_export_stops_transformers_at_the_end_of_turn(tmp_path):
    """Our chat stops at EOS and the template's end-of-turn token; the exported
    generation_config.json must make transformers' generate stop there too (it only had EOS)."""
    import tokenizers
    import transformers
    from flax import nnx

    from sft_jax.data.lm import stop_token_ids
    from sft_jax.hf.export import export_model
    from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM

    v, n = 16, 8
    cfg = LlamaConfig(
        vocab_size=v, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, initializer_range=1.0, bos_token_id=None, eos_token_id=1,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    prompt = np.array([[3, 4, 5]], np.int32)
    free = np.asarray(generate(model, prompt, max_new_tokens=n).tokens[0])
    step = next(k for k in range(1, n - 1) if free[k] not in free[:k] and free[k] > 1)
    names = [f"w{i}" for i in range(v)]  # the token emitted at `step` ends the turn
    names[0], names[1], names[int(free[step])] = "[PAD]", "<|endoftext|>", "<|im_end|>"
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="[PAD]")
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="[PAD]",
        chat_template="{% for m in messages %}{{ m['content'] }} <|im_end|> {% endfor %}",
    )  # fmt: skip
    stops = stop_token_ids(tok)
    assert stops == (1, int(free[step]))
    ours = generate(model, prompt, max_new_tokens=n, stop_ids=stops, pad_id=PAD).tokens
    export_model(model, tmp_path, tokenizer=tok)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():  # no eos_token_id given: the exported generation config's
        want = ref.generate(
            torch.tensor(prompt, dtype=torch.long), max_new_tokens=n, do_sample=False,
            pad_token_id=PAD,
        )[:, prompt.shape[1] :].numpy()  # fmt: skip
    np.testing.assert_array_equal(np.pad(want, ((0, 0), (0, n - want.shape[1]))), ours)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [*stops]


def test_writing_past_the_kv_cache_is_an_error(tiny):
    """A write past the last slot was clamped onto earlier slots (dynamic_update_slice): the
    decoded logits were silently wrong (|diff| 1.1 then 8.5 on this model)."""
    model, ids, _ = tiny
    full = np.asarray(model(ids[:1]))  # [1, 6, V]
    logits, cache = model(ids[:1, :4], cache=model.init_cache(1, 5))
    logits, cache = model(ids[:1, 4:5], cache=cache)  # slot 4: the last one
    np.testing.assert_allclose(logits[:, 0], full[:, 4], atol=1e-5)
    with pytest.raises(ValueError, match=r"1 new token\(s\) at cache slot 5 exceed .* 5 slots"):
        model(ids[:1, 5:6], cache=cache)
    with pytest.raises(ValueError, match=r"6 new token\(s\) at cache slot 0 exceed .* 5 slots"):
        model(ids[:1], cache=model.init_cache(1, 5))


def test_chat_session_outlives_gpt2_positions(tmp_path):
    """A conversation that outgrows GPT-2's learned positions drops the message that does not
    fit (and says so) instead of ending the session; replies are cut where the room ends."""
    import subprocess
    import sys

    from tests.tiny_chat import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer()
    torch_gpt2(vocab_size=len(tok), n_positions=24, n_embd=8, n_layer=1, n_head=2).save_pretrained(
        tmp_path
    )
    tok.save_pretrained(tmp_path)
    session = subprocess.run(
        [sys.executable, "-m", "experiments.chat", "--model", str(tmp_path),
         "--max_new_tokens", "4"],
        input="hi\n" * 6 + "/reset\nbye\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert session.returncode == 0, session.stderr[-2000:]
    replies = session.stdout.count("assistant:")
    dropped = session.stderr.count("Message dropped")
    assert dropped >= 1 and replies + dropped == 7, (session.stdout, session.stderr[-2000:])
    assert session.stdout.splitlines()[-1].startswith("assistant:")  # after /reset: room again
