"""Text classification: fine-tune a BERT-family encoder (default: all-MiniLM-L6-v2 on the
shipped 3-class tweet sentiment corpus).

  python -m experiments.train --config configs/text_cls.py --workdir runs/text_cls
  python -m experiments.train --config configs/text_cls.py:debug --workdir /tmp/dbg
  python -m experiments.train --config configs/text_cls.py:probe ...   # frozen encoder
  python -m experiments.train --config configs/text_cls.py:full ...    # 2 epochs, all data

Arguments (comma separated, combinable): ``debug`` (tiny, ~1 minute), ``probe`` (train only the
head: a linear probe on the frozen encoder), ``full`` (the whole train split for 2 epochs).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = {a for a in arg.split(",") if a}
    unknown = args - {"debug", "probe", "full"}
    if unknown:
        raise ValueError(
            f"configs/text_cls.py: unknown argument(s) {sorted(unknown)}; use debug, probe, full"
        )
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.path = "minilm-l6"  # short name, a local Hugging Face directory, or a GGUF file
    c.model.task = "classification"
    c.model.classifier_dropout = 0.1
    c.model.dtype = "float32"  # compute: float32 | bfloat16 | float16 (loss-scaled); params f32

    c.data = ml_collections.ConfigDict()
    c.data.name = "tweet_sentiment"  # or "files" with train_file/validation_file/test_file
    c.data.data_dir = ""  # tfds data_dir; "" -> $SFT_JAX_DATA_DIR or ~/tensorflow_datasets
    c.data.train_file = ""
    c.data.validation_file = ""
    c.data.test_file = ""
    c.data.text_field = "text"
    c.data.text_pair_field = ""
    c.data.label_field = "label"
    c.data.max_train_examples = 16000  # 0 = all (29,795); the default job uses a subsample
    c.data.max_length = 128
    c.data.truncate = True  # longer examples are cut (with a warning and a count); False = error
    c.data.buckets = (32, 64, 128)
    c.data.batch_size = 32
    c.data.eval_batch_size = 64

    c.optimizer = common.optimizer()

    c.freeze = common.freeze("full")

    c.train = common.train(eval_every_steps=125)

    c.checkpoint = common.checkpoint("macro_f1", "max")

    c.mesh = common.mesh()
    c.runtime = common.runtime()

    if "full" in args:
        c.data.max_train_examples = 0
        c.train.num_epochs = 2
        c.train.eval_every_steps = 0
    if "probe" in args:
        c.freeze.policy = "head_only"
        c.optimizer.learning_rate = 1e-3
        c.model.classifier_dropout = 0.0
    if "debug" in args:
        c.data.max_train_examples = 256
        c.data.batch_size = 16
        c.data.buckets = (32, 64)
        c.data.max_length = 64
        c.train.num_steps = 12
        c.train.eval_every_steps = 6
        c.train.log_every_steps = 2
        c.train.max_eval_batches = 2
    c.lock()
    return c
