"""A tiny random BERT directory and tiny CSV splits for end-to-end text classification tests."""

import ml_collections
import numpy as np
import torch
import transformers

from configs import text_cls
from sft_jax.pretrained import resolve_model_dir

WORDS = {
    "negative": ["awful", "bad", "hate"],
    "neutral": ["table", "maybe", "today"],
    "positive": ["great", "love", "good"],
}


def write_csv(path, n, seed):
    rng = np.random.default_rng(seed)
    names = sorted(WORDS)
    lines = ["text,label"]
    for i in range(n):
        label = names[i % 3]
        words = list(rng.choice(WORDS[label], 2)) + list(rng.choice(["the", "a", "it", "so"], 3))
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def make_tiny_setup(root):
    """``(root, model_dir, files)``: a 2-layer random BERT with MiniLM's tokenizer, and CSV
    train / validation / test files of 96 / 30 / 30 examples under ``root``."""
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model_dir = root / "tiny_bert"
    transformers.BertModel(cfg).save_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(resolve_model_dir("minilm-l6"))
    tok.save_pretrained(model_dir)
    files = {
        s: write_csv(root / f"{s}.csv", n, seed)
        for s, n, seed in (("train", 96, 0), ("validation", 30, 1), ("test", 30, 2))
    }
    return root, model_dir, files


def config_overrides(root, model_dir, files, **train) -> dict:
    """Flat ``{key: value}`` overrides of ``configs/text_cls.py:debug`` for the tiny setup."""
    out = {
        "model.path": str(model_dir),
        "data.name": "files",
        "data.data_dir": str(root / "tfds"),
        "data.train_file": files["train"],
        "data.validation_file": files["validation"],
        "data.test_file": files["test"],
        "data.max_train_examples": 0,
        "data.batch_size": 8,
        "optimizer.learning_rate": 1e-3,
        "train.num_steps": 8,
        "train.eval_every_steps": 4,
        "train.max_eval_batches": 0,
        "train.log_every_steps": 1,
        "checkpoint.async_save": False,
    }
    out.update({f"train.{k}" if "." not in k else k: v for k, v in train.items()})
    return out


def make_config(root, model_dir, files, **train):
    """The debug text-classification config on the tiny setup (``train`` overrides keys of
    ``train``, or any dotted key such as ``checkpoint.every_steps``)."""
    c = text_cls.get_config("debug")
    c.unlock()
    for key, value in config_overrides(root, model_dir, files, **train).items():
        section, name = key.split(".")
        c[section][name] = value
    c.lock()
    return c


def as_flags(overrides: dict) -> list[str]:
    """The same overrides as ``--config.KEY=VALUE`` command-line flags."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def files_data_cfg(**kw) -> ml_collections.ConfigDict:
    """A ``data`` config block for text-classification files (``data.name="files"``)."""
    cfg = dict(
        name="files",
        train_file="",
        validation_file="",
        test_file="",
        text_field="text",
        label_field="label",
        text_pair_field="",
        max_train_examples=0,
    )
    return ml_collections.ConfigDict({**cfg, **kw})
