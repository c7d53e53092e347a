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

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.9  # sgd only
    c.optimizer.nesterov = False  # sgd only
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"  # constant | linear | cosine (after warmup)
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.accumulation_steps = 1

    c.freeze = ml_collections.ConfigDict()
    c.freeze.policy = "full"  # a preset of sft_jax.freezing.PRESETS ("lora" with adapters)

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 1
    c.train.num_steps = 0  # > 0 overrides num_epochs
    c.train.eval_every_steps = 40  # 0 = once per epoch
    c.train.log_every_steps = 5
    c.train.early_stopping_patience = 0
    c.train.max_eval_batches = 0  # 0 = the whole validation split

    c.generation = ml_collections.ConfigDict()
    c.generation.max_new_tokens = 48
    c.generation.batch_size = 50
    c.generation.max_examples = 0  # exact match on the first N test records (0 = all)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep_latest = 1
    c.checkpoint.keep_best = 1
    c.checkpoint.best_metric = "loss"
    c.checkpoint.best_mode = "min"
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices

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
