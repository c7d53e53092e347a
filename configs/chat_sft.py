"""Chat / instruction SFT of a decoder LM (default: SmolLM2-135M-Instruct on the seeded
instruction tasks of sft_jax.data.instruct_tasks, loss on assistant tokens only, packed rows).

  python -m experiments.train --config configs/chat_sft.py --workdir runs/chat_full
  python -m experiments.train --config configs/chat_sft.py:lora --workdir runs/chat_lora
  python -m experiments.evaluate --workdir runs/chat_full --split test   # loss, ppl, exact match
  python -m experiments.chat --workdir runs/chat_full --prompt "Reverse the list: a, b, c"

Arguments (comma separated, combinable): ``lora`` (rank-16 adapters on every attention and MLP
projection; only they train), ``chatterbot`` (the shipped ChatterBot English dialogs instead of
the instruction tasks; no exact-match score), ``debug`` (a few steps on a handful of examples).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = {a for a in arg.split(",") if a}
    unknown = args - {"debug", "lora", "chatterbot"}
    if unknown:
        raise ValueError(
            f"configs/chat_sft.py: unknown argument(s) {sorted(unknown)}; "
            "use debug, lora, chatterbot"
        )
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.path = "smollm2-135m-instruct"  # short name, Hugging Face directory or GGUF file
    c.model.task = "causal_lm"
    c.model.dtype = "float32"  # compute: float32 | bfloat16 | float16 (loss-scaled); params f32

    c.data = ml_collections.ConfigDict()
    c.data.name = "instruct_tasks"  # instruct_tasks | chatterbot | files (JSONL with messages)
    c.data.data_dir = ""  # tfds data_dir; "" -> $SFT_JAX_DATA_DIR or ~/tensorflow_datasets
    c.data.train_file = ""
    c.data.validation_file = ""
    c.data.test_file = ""
    c.data.messages_field = "messages"
    c.data.task_sizes = ml_collections.ConfigDict({"train": 4000, "validation": 200, "test": 500})
    c.data.task_seed = 0
    c.data.max_train_examples = 1200  # 0 = all; a CPU-sized default (about 10 minutes)
    c.data.max_length = 256  # row length; conversations longer than this are cut
    c.data.pack = True  # several conversations per row (segment ids keep them apart)
    c.data.batch_size = 4  # rows per step
    c.data.eval_batch_size = 8

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = full fine-tuning
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = ()  # regexes on module paths; () = every attention and MLP projection

    c.optimizer = common.optimizer(learning_rate=1e-4, weight_decay=0.0, schedule="cosine")

    c.freeze = common.freeze("full")

    c.train = common.train(eval_every_steps=40, log_every_steps=5)

    c.generation = ml_collections.ConfigDict()
    c.generation.max_new_tokens = 48
    c.generation.batch_size = 50
    c.generation.max_examples = 0  # exact match on the first N test records (0 = all)

    c.checkpoint = common.checkpoint("loss", "min")

    c.mesh = common.mesh()
    c.runtime = common.runtime()

    if "lora" in args:
        c.lora.rank = 16
        c.freeze.policy = "lora"
        c.optimizer.learning_rate = 1e-3
    if "chatterbot" in args:
        c.data.name = "chatterbot"
        c.data.max_train_examples = 0
    if "debug" in args:
        c.data.task_sizes = ml_collections.ConfigDict({"train": 64, "validation": 16, "test": 8})
        c.data.max_train_examples = 0
        c.data.max_length = 128
        c.data.batch_size = 2
        c.data.eval_batch_size = 4
        c.train.num_steps = 4
        c.train.eval_every_steps = 2
        c.train.log_every_steps = 1
        c.train.max_eval_batches = 2
        c.generation.max_new_tokens = 16
        c.generation.batch_size = 4
        c.generation.max_examples = 8
    c.lock()
    return c
