"""Talk to a chat model: a fine-tuned run's checkpoint or a pretrained causal LM.

  python -m experiments.chat --workdir DIR [--checkpoint best|latest|STEP]
  python -m experiments.chat --model smollm2-135m-instruct --prompt "Sort: 3, 1, 2"

Without --prompt, an interactive loop: each line is a user turn, the conversation is kept
(`/reset` clears it, `/quit` or end of input leaves). Greedy by default; --temperature > 0
samples (with --top_k / --top_p and --seed). Replies stop at the end-of-turn / EOS token.
"""

import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments.train.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number.")
_MODEL = flags.DEFINE_string("model", None, "Pretrained short name, HF directory or GGUF file.")
_PROMPT = flags.DEFINE_string("prompt", None, "One user message: print the reply and exit.")
_SYSTEM = flags.DEFINE_string("system", None, "Optional system message.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Longest reply in tokens.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer(
    "top_k", 0, "Sample among the k most likely tokens (0 = all).", lower_bound=0
)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _load():
    """(model, tokenizer) from --workdir or --model, LoRA adapters merged."""
    from sft_jax.data.lm import load_chat_tokenizer
    from sft_jax.lora import merge_lora

    if _WORKDIR.value:
        from sft_jax.restore import restore_run

        run = restore_run(_WORKDIR.value, _CHECKPOINT.value)
        return merge_lora(run.model), load_chat_tokenizer(run.info["model_dir"])
    import sft_jax

    path = sft_jax.resolve_model_dir(_MODEL.value)
    return sft_jax.load_pretrained(path, task="causal_lm"), load_chat_tokenizer(path)


def _reply(model, tokenizer, messages, turn: int) -> str | None:
    """The model's reply to ``messages``; None (and a note on stderr) when a learned position
    table (GPT-2) has no room left for it. A reply is cut short where that room ends."""
    import jax

    from sft_jax.gen_eval import generate_replies, prompt_ids
    from sft_jax.generate import position_limit

    sampling = {}
    if _TEMPERATURE.value > 0:
        sampling = dict(
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value,
            top_p=_TOP_P.value,
            rng=jax.random.fold_in(jax.random.key(_SEED.value), turn),
        )
    ids = prompt_ids(tokenizer, messages)
    limit, max_new = position_limit(model), _MAX_NEW.value
    if limit is not None:
        if len(ids) >= limit:
            print(f"The conversation is {len(ids)} tokens; the model holds {limit} positions: "
                  "no room for a reply.", file=sys.stderr)  # fmt: skip
            return None
        max_new = min(max_new, limit - len(ids))
    (reply,) = generate_replies(
        model, tokenizer, [ids], batch_size=1, max_new_tokens=max_new, **sampling
    )
    if not reply.stopped and max_new < _MAX_NEW.value:
        print(f"(reply cut at the model's {limit} positions)", file=sys.stderr)
    return reply.text


def main(argv):
    del argv
    if (_WORKDIR.value is None) == (_MODEL.value is None):
        raise app.UsageError("pass exactly one of --workdir and --model")
    from sft_jax.logging import setup_cli_logging

    setup_cli_logging()
    from sft_jax.runtime import setup_runtime

    setup_runtime()
    model, tokenizer = _load()
    start = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
    if _PROMPT.value is not None:
        reply = _reply(model, tokenizer, start + [{"role": "user", "content": _PROMPT.value}], 0)
        if reply is None:
            sys.exit(1)
        print(reply)
        return
    messages, turn = list(start), 0
    print("Type a message (/reset clears the conversation, /quit leaves).", file=sys.stderr)
    for line in sys.stdin:
        text = line.strip()
        if text == "/quit":
            break
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        reply = _reply(model, tokenizer, messages + [{"role": "user", "content": text}], turn)
        if reply is None:
            print("Message dropped; /reset clears the conversation.", file=sys.stderr)
            continue
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        turn += 1
        print(f"assistant: {reply}", flush=True)


if __name__ == "__main__":
    app.run(main)
