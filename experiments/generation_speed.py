"""Decoding speed of a causal LM with and without the KV cache.

  python -m experiments.generation_speed [--model smollm2-135m-instruct] [--new_tokens 64]

Batch 1, greedy, a chat-templated prompt; each path is run once to compile, then timed.
Prints tokens/s for both paths and checks that they produced the same tokens.
"""

import json
import time

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Short name, HF dir or GGUF.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens to generate.")
_PROMPT = flags.DEFINE_string("prompt", "Name three colors of the rainbow.", "User message.")


def _timed(fn):
    """``(output, seconds)`` of a second call of ``fn``, after a first one that compiles.

    JAX dispatches asynchronously: the first call returns before its device work is done, so
    it is waited for before the clock starts, or the timed call would also pay for the rest of
    the first one."""
    fn().tokens.block_until_ready()  # compile and run once
    start = time.perf_counter()
    out = fn()
    out.tokens.block_until_ready()
    return out, time.perf_counter() - start


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sft_jax
    from sft_jax.generate import generate, generate_without_cache
    from sft_jax.hf.gguf import load_gguf_tokenizer

    path = sft_jax.resolve_model_dir(_MODEL.value)
    tok = load_gguf_tokenizer(path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": _PROMPT.value}], add_generation_prompt=True, tokenize=False
    )
    ids = jnp.asarray([tok(text)["input_ids"]], jnp.int32)
    model = sft_jax.load_pretrained(path, task="causal_lm")
    kw = dict(max_new_tokens=_NEW.value, stop_ids=(), pad_id=tok.pad_token_id or 0)
    cached, t_cache = _timed(lambda: generate(model, ids, **kw))
    plain, t_plain = _timed(lambda: generate_without_cache(model, ids, **kw))
    same = bool(np.array_equal(np.asarray(cached.tokens), np.asarray(plain.tokens)))
    report = {
        "model": str(path),
        "device": str(jax.devices()[0].device_kind),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": _NEW.value,
        "kv_cache_tokens_per_s": _NEW.value / t_cache,
        "no_cache_tokens_per_s": _NEW.value / t_plain,
        "same_tokens": same,
        "text": tok.decode(np.asarray(cached.tokens[0])),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
