"""BERT import/export against transformers (PyTorch): tiny random models and all-MiniLM-L6-v2."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sft_jax.hf import io
from sft_jax.hf.bert import export_bert_classifier, load_bert_classifier, load_bert_model
from sft_jax.pretrained import resolve_model_dir

TOL = 1e-4
BASE = dict(
    vocab_size=53, hidden_size=12, num_attention_heads=3, num_hidden_layers=2,
    intermediate_size=20, max_position_embeddings=20, type_vocab_size=2,
)  # fmt: skip
CASES = {
    "3heads_types2": dict(BASE, num_labels=3),
    "5heads_types1_gelu_new": dict(
        vocab_size=101,
        hidden_size=20,
        num_attention_heads=5,
        num_hidden_layers=1,
        intermediate_size=7,
        max_position_embeddings=33,
        type_vocab_size=1,
        num_labels=2,
        hidden_act="gelu_new",
    ),  # fmt: skip
    "4heads_relu_eps": dict(
        vocab_size=37,
        hidden_size=16,
        num_attention_heads=4,
        num_hidden_layers=3,
        intermediate_size=24,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=5,
        hidden_act="relu",
        layer_norm_eps=1e-5,
    ),  # fmt: skip
}


def _torch_model(cls, num_labels=None, seed=0, **config):
    """A random HF model whose weights are large enough to make parity meaningful."""
    torch.manual_seed(seed)
    kw = {} if num_labels is None else {"num_labels": num_labels}
    cfg = transformers.BertConfig(**config, **kw, attn_implementation="eager")
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "LayerNorm.weight" in name else 0.0))
    return model


def _inputs(vocab, type_vocab, b=3, t=9, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (b, t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.array([t, 5, 2])[:b, None]).astype(np.int32)
    types = (np.arange(t)[None] >= t // 2).astype(np.int32).repeat(b, 0) % type_vocab
    return ids * mask, mask, types


def _torch_logits(model, ids, mask=None, types=None):
    as_t = lambda a: None if a is None else torch.tensor(a, dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        out = model(as_t(ids), attention_mask=as_t(mask), token_type_ids=as_t(types))
    return out.logits.numpy()


def _ours(model, ids, mask=None, types=None):
    as_j = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    return np.asarray(model(as_j(ids), as_j(mask), as_j(types)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_classifier_logits_match_transformers(case, tmp_path):
    config = dict(CASES[case])
    num_labels = config.pop("num_labels")
    ref = _torch_model(transformers.BertForSequenceClassification, num_labels, **config)
    ref.save_pretrained(tmp_path)
    ours = load_bert_classifier(tmp_path)  # the head comes from the checkpoint
    assert ours.num_labels == num_labels
    ids, mask, types = _inputs(config["vocab_size"], config["type_vocab_size"])
    for args in [(ids, mask, types), (ids, mask, None), (ids, None, None)]:
        diff = np.abs(_ours(ours, *args) - _torch_logits(ref, *args)).max()
        print(f"{case} mask={args[1] is not None} types={args[2] is not None}: {diff:.2e}")
        assert diff <= TOL


@pytest.fixture(scope="module")
def minilm():
    model_dir = resolve_model_dir("minilm-l6")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    sentences = [
        "The movie was surprisingly good, I would watch it again.",
        "Terrible service.",
        "JAX and PyTorch should agree on every one of these tokens, including padding!",
        "ok",
    ]
    enc = tok(sentences, padding=True, return_tensors="np")
    names = ("input_ids", "attention_mask", "token_type_ids")
    batch = tuple(enc[k].astype(np.int32) for k in names)
    return model_dir, batch


def test_minilm_encoder_matches_transformers(minilm):
    model_dir, (ids, mask, types) = minilm
    ref = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(*(torch.tensor(a, dtype=torch.long) for a in (ids, mask, types)))
    ours = load_bert_model(model_dir)
    seq, pooled = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    seq_diff = np.abs(np.asarray(seq) - out.last_hidden_state.numpy()).max()
    pooled_diff = np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max()
    print(f"MiniLM sequence {seq_diff:.2e} pooled {pooled_diff:.2e}")
    assert seq_diff <= TOL and pooled_diff <= TOL


def test_minilm_classifier_with_new_head_matches_transformers(minilm):
    model_dir, (ids, mask, types) = minilm
    ours = load_bert_classifier(model_dir, num_labels=3, seed=7)
    assert ours.label_names is None
    ref = transformers.BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=3, attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # copy our random head into torch
        ref.classifier.weight.copy_(torch.tensor(np.asarray(ours.classifier.kernel[...]).T))
        ref.classifier.bias.copy_(torch.tensor(np.asarray(ours.classifier.bias[...])))
    diff = np.abs(_ours(ours, ids, mask, types) - _torch_logits(ref, ids, mask, types)).max()
    print(f"MiniLM classifier {diff:.2e}")
    assert diff <= TOL


def test_export_round_trip(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _torch_model(transformers.BertModel, **BASE).save_pretrained(src)  # no head
    ours = load_bert_classifier(src, num_labels=4, seed=1)
    labels = ["neg", "neu", "pos", "other"]
    tokenizer_dir = resolve_model_dir("minilm-l6")
    export_bert_classifier(ours, out, label_names=labels, tokenizer_dir=tokenizer_dir)
    ids, mask, types = _inputs(BASE["vocab_size"], BASE["type_vocab_size"])
    want = _ours(ours, ids, mask, types)

    ref = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    assert type(ref).__name__ == "BertForSequenceClassification"
    assert ref.config.id2label == dict(enumerate(labels)) and ref.config.num_labels == 4
    diff = np.abs(_torch_logits(ref, ids, mask, types) - want).max()
    print(f"export -> transformers {diff:.2e}")
    assert diff <= TOL

    again = load_bert_classifier(out)
    np.testing.assert_array_equal(_ours(again, ids, mask, types), want)
    assert again.label_names == tuple(labels)
    written = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= written
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"


@pytest.fixture
def tiny_dir(tmp_path):
    _torch_model(transformers.BertForSequenceClassification, 2, **BASE).save_pretrained(tmp_path)
    return tmp_path


def _edit_checkpoint(model_dir, fn):
    path = model_dir / "model.safetensors"
    tensors = io.read_safetensors(path)
    fn(tensors)
    io.write_safetensors(tensors, path)
    return str(path)


def test_missing_tensor_is_named(tiny_dir):
    key = "bert.encoder.layer.1.attention.self.key.bias"
    path = _edit_checkpoint(tiny_dir, lambda t: t.pop(key))
    with pytest.raises(ValueError, match="missing") as e:
        load_bert_classifier(tiny_dir)
    assert path in str(e.value) and key in str(e.value)


def test_unexpected_tensor_is_named(tiny_dir):
    key = "bert.encoder.layer.0.attention.self.rotary.weight"
    path = _edit_checkpoint(tiny_dir, lambda t: t.update({key: np.zeros((2, 2), np.float32)}))
    with pytest.raises(ValueError, match="unused") as e:
        load_bert_classifier(tiny_dir)
    assert path in str(e.value) and key in str(e.value)


def test_shape_mismatch_names_both_shapes(tiny_dir):
    key = "bert.pooler.dense.weight"
    _edit_checkpoint(tiny_dir, lambda t: t.update({key: np.zeros((12, 13), np.float32)}))
    with pytest.raises(ValueError) as e:
        load_bert_classifier(tiny_dir)
    assert f"{key}: checkpoint shape (12, 13), model expects (12, 12)" in str(e.value)


def test_head_and_num_labels_conflicts(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="2-way classifier head but num_labels=5"):
        load_bert_classifier(tiny_dir, num_labels=5)
    bare = tmp_path / "bare"
    _torch_model(transformers.BertModel, **BASE).save_pretrained(bare)
    with pytest.raises(ValueError, match="no classifier head: pass num_labels"):
        load_bert_classifier(bare)


def _legacy_name(key):
    """The gamma/beta spelling of a LayerNorm tensor name."""
    return key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta"
    )


def test_legacy_layer_norm_gamma_beta_names_load(tiny_dir, tmp_path):
    """Older Google BERT checkpoints (bert-base-uncased) name LayerNorm tensors gamma/beta."""
    ref = transformers.BertForSequenceClassification.from_pretrained(
        tiny_dir, attn_implementation="eager"
    ).eval()

    def rename(tensors):
        for key in list(tensors):
            tensors[_legacy_name(key)] = tensors.pop(key)

    _edit_checkpoint(tiny_dir, rename)
    assert any(k.endswith("LayerNorm.gamma") for k in io.read_model_tensors(tiny_dir)[0])
    ours = load_bert_classifier(tiny_dir)
    ids, mask, types = _inputs(BASE["vocab_size"], BASE["type_vocab_size"])
    diff = np.abs(_ours(ours, ids, mask, types) - _torch_logits(ref, ids, mask, types)).max()
    print(f"gamma/beta checkpoint {diff:.2e}")
    assert diff <= TOL
    export_bert_classifier(ours, tmp_path / "out")  # exports keep the weight/bias names
    written = io.read_safetensors(tmp_path / "out" / io.SAFETENSORS_NAME)
    assert "bert.embeddings.LayerNorm.weight" in written
    assert not any(k.endswith(("LayerNorm.gamma", "LayerNorm.beta")) for k in written)


def test_both_layer_norm_spellings_is_an_error(tiny_dir):
    key = "bert.encoder.layer.0.output.LayerNorm.weight"
    legacy = _legacy_name(key)
    path = _edit_checkpoint(tiny_dir, lambda t: t.update({legacy: t[key].copy()}))
    with pytest.raises(ValueError, match="holds both") as e:
        load_bert_classifier(tiny_dir)
    assert path in str(e.value) and key in str(e.value) and legacy in str(e.value)
