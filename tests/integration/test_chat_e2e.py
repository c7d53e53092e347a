"""End to end chat SFT on a tiny random Llama that uses SmolLM2's real tokenizer and chat
template: train (full and LoRA) on the seeded instruction tasks, evaluate (loss, perplexity,
exact match), talk to it, export to transformers with the same logits."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

import sft_jax
from configs import chat_sft
from sft_jax import logging as log_lib
from sft_jax.hf.mapping import flat_params
from sft_jax.trainer import Trainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from sft_jax.data.lm import load_chat_tokenizer

    try:
        gguf = sft_jax.resolve_model_dir("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    tok = load_chat_tokenizer(gguf)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chat") / "tiny_llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_config(model_dir, data_dir, *args):
    c = chat_sft.get_config(",".join(("debug",) + args))
    c.unlock()
    c.model.path = str(model_dir)
    c.data.data_dir = str(data_dir)
    c.optimizer.learning_rate = 1e-2
    c.data.batch_size = c.data.eval_batch_size = 8  # the 8 fake devices
    c.train.num_steps = 6
    c.train.eval_every_steps = 3
    c.checkpoint.async_save = False
    c.lock()
    return c


def cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, check=True, input=stdin
    )


def hf_logits(path, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.slow
def test_full_sft_evaluate_chat_export(model_dir, tmp_path):
    cfg = make_config(model_dir, tmp_path / "tfds")
    workdir = str(tmp_path / "full")
    final = Trainer(cfg, workdir).run()
    evals = [r for r in log_lib.read_metrics(workdir) if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[1]["loss"] < evals[0]["loss"]  # it learns
    assert final["perplexity"] == pytest.approx(np.exp(final["loss"]), rel=1e-6)

    # The pretrained model as built (on one device; experiments.evaluate --config) is evaluated
    # on the config's mesh, here all 8 devices, like a restored run.
    from sft_jax import components
    from sft_jax.eval_run import evaluate_model

    assert jax.device_count() == 8
    before = evaluate_model(cfg, components.build_model(cfg), "test")
    assert before["num_examples"] == 8 and before["loss"] > final["loss"]

    out = cli("experiments.evaluate", "--workdir", workdir, "--split", "test")
    result = json.loads((tmp_path / "full" / "eval_test.json").read_text())
    assert result["num_examples"] == 8 and 0.0 <= result["exact_match"] <= 1.0
    assert set(result["exact_match_by_family"]) <= {
        "arithmetic", "date_format", "extract_field", "reverse_list", "sort_list",
        "unit_conversion",
    }  # fmt: skip
    assert result["num_target_tokens"] > 0 and "perplexity" in out.stdout
    assert len(result["samples"]) == 8

    reply = cli("experiments.chat", "--workdir", workdir, "--prompt", "Hi", "--max_new_tokens", "4")
    assert reply.stdout.strip()
    session = cli(
        "experiments.chat", "--workdir", workdir, "--max_new_tokens", "3",
        stdin="Hi\n/reset\nBye\n/quit\nnever read\n",
    )  # fmt: skip
    assert session.stdout.count("assistant:") == 2

    export_dir = tmp_path / "export"
    cli("experiments.export", "--workdir", workdir, "--out", str(export_dir))
    from sft_jax.restore import restore_run

    model = restore_run(workdir).model
    ids = np.array([[1, 520, 33, 2000, 7, 9]], np.int64)
    np.testing.assert_allclose(
        np.asarray(model(ids.astype(np.int32))), hf_logits(export_dir, ids), atol=1e-4
    )
    tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    assert "<|im_start|>" in tok.chat_template


@pytest.mark.slow
def test_lora_trains_adapters_only_and_exports_merged(model_dir, tmp_path):
    from sft_jax.restore import restore_run

    cfg = make_config(model_dir, tmp_path / "tfds", "lora")
    workdir = str(tmp_path / "lora")
    Trainer(cfg, workdir).run()
    info = json.loads((tmp_path / "lora" / "run.json").read_text())
    # Adapters on 7 projections x 2 layers, rank 16: r * (in + out) each.
    per_layer = 16 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
    assert info["num_trainable_params"] == 2 * per_layer
    assert info["optimizer_state_bytes"] < 3 * 4 * info["num_trainable_params"] + 1024

    run = restore_run(workdir)
    base = sft_jax.load_pretrained(model_dir, task="causal_lm")
    flat = {k: np.asarray(v[...]) for k, v in flat_params(run.model).items()}
    base_flat = {k: np.asarray(v[...]) for k, v in flat_params(base).items()}
    assert all(np.array_equal(flat[k], v) for k, v in base_flat.items())  # base untouched
    assert any(np.abs(v).max() > 0 for k, v in flat.items() if k.endswith("lora_b"))

    export_dir = tmp_path / "export"
    cli("experiments.export", "--workdir", workdir, "--out", str(export_dir))
    ids = np.array([[1, 520, 33, 2000, 7, 9]], np.int64)
    np.testing.assert_allclose(
        np.asarray(run.model(ids.astype(np.int32))), hf_logits(export_dir, ids), atol=1e-4
    )
