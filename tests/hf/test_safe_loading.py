"""Safe loading (issue 7): weights come from safetensors, or from torch files only through the
weights-only unpickler; nothing in a checkpoint directory is ever executed. Also sharded
checkpoints whose index and shards disagree."""

import ast
import json
import os
import pathlib
import pickle

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import sft_jax
from sft_jax.hf import io
from sft_jax.hf.bert import load_bert_classifier

BASE = dict(
    vocab_size=53, hidden_size=12, num_attention_heads=3, num_hidden_layers=2,
    intermediate_size=20, max_position_embeddings=20, type_vocab_size=2, num_labels=3,
)  # fmt: skip


class _Payload:
    """Unpickling this runs `exec(code)`: what a malicious checkpoint would do."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _touch(marker: pathlib.Path) -> _Payload:
    return _Payload(f"open({str(marker)!r}, 'w').close()")


def _tiny_bert(seed: int = 0) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(**BASE, attn_implementation="eager")
    model = transformers.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _bin_dir(model, path: pathlib.Path) -> pathlib.Path:
    """`path` with config.json and pytorch_model.bin (a torch state dict), no safetensors."""
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / io.PYTORCH_NAME)
    return path


@pytest.mark.parametrize("fmt", ["torch_zip", "legacy_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "pwned"
    model_dir = _bin_dir(_tiny_bert(), tmp_path / "model")
    path = model_dir / io.PYTORCH_NAME
    if fmt == "torch_zip":
        torch.save({"bert.pooler.dense.bias": torch.zeros(2), "x": _touch(marker)}, path)
    else:  # a bare pickle (protocol 2, as torch's legacy format) that is only the payload
        path.write_bytes(pickle.dumps({"x": _touch(marker)}, protocol=2))
    with pytest.raises(ValueError, match=rf"refusing to load {path}: .*weights_only=True .*exec"):
        load_bert_classifier(model_dir)
    with pytest.raises(ValueError, match=rf"refusing to load {path}"):
        io.read_model_tensors(model_dir)
    assert not marker.exists()
    # The payload is live: an ordinary unpickler runs it.
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_touch(live)))
    assert live.exists()


def test_garbage_torch_file_is_named(tmp_path):
    (tmp_path / io.PYTORCH_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"refusing to load {tmp_path / io.PYTORCH_NAME}"):
        io.read_model_tensors(tmp_path)


def test_torch_state_dict_loads_with_the_same_logits_as_safetensors(tmp_path):
    ref = _tiny_bert()
    ref.save_pretrained(tmp_path / "st")
    bin_dir = _bin_dir(ref, tmp_path / "bin")
    assert not (bin_dir / io.SAFETENSORS_NAME).exists()
    _, source = io.read_model_tensors(bin_dir)
    assert source == bin_dir / io.PYTORCH_NAME

    rng = np.random.RandomState(0)
    ids = rng.randint(1, BASE["vocab_size"], (3, 7)).astype(np.int32)
    mask = (np.arange(7)[None] < np.array([[7], [4], [2]])).astype(np.int32)
    from_st = np.asarray(load_bert_classifier(tmp_path / "st")(jnp.asarray(ids), jnp.asarray(mask)))
    from_bin = np.asarray(load_bert_classifier(bin_dir)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(from_bin, from_st)
    with torch.no_grad():
        want = ref(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits
    np.testing.assert_allclose(from_bin, want.numpy(), atol=1e-4)


def test_torch_reader_keeps_bfloat16_and_rejects_non_tensors(tmp_path):
    w = torch.randn(3, 2).bfloat16()
    torch.save({"w": w}, tmp_path / "a.bin")
    got = io.read_torch_state_dict(tmp_path / "a.bin")["w"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), w.float().numpy())
    torch.save({"w": w, "step": 3}, tmp_path / "b.bin")
    with pytest.raises(ValueError, match=r"b\.bin: entries that are not tensors: \['step'\]"):
        io.read_torch_state_dict(tmp_path / "b.bin")
    with pytest.raises(FileNotFoundError, match=r"c\.bin"):
        io.read_torch_state_dict(tmp_path / "c.bin")


def _shard(tmp_path: pathlib.Path, writer, suffix: str) -> pathlib.Path:
    """Two shards and an index of a 3-tensor checkpoint."""
    a, b = np.ones((2, 2), np.float32), np.zeros(3, np.float32)
    writer({"a": a, "b": b}, tmp_path / f"part-1.{suffix}")
    writer({"c": a}, tmp_path / f"part-2.{suffix}")
    weight_map = {"a": f"part-1.{suffix}", "b": f"part-1.{suffix}", "c": f"part-2.{suffix}"}
    return weight_map


def _write_bin(tensors, path):
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)


@pytest.mark.parametrize(
    "writer, suffix, index_name",
    [
        (io.write_safetensors, "safetensors", io.SAFETENSORS_INDEX_NAME),
        (_write_bin, "bin", io.PYTORCH_INDEX_NAME),
    ],
)
def test_sharded_checkpoints_and_their_errors(tmp_path, writer, suffix, index_name):
    weight_map = _shard(tmp_path, writer, suffix)
    index = tmp_path / index_name
    index.write_text(json.dumps({"weight_map": {**weight_map, "d": f"part-2.{suffix}"}}))
    with pytest.raises(ValueError, match=rf"{index} lists tensors that its shards do not hold: "):
        io.read_model_tensors(tmp_path)
    index.write_text(json.dumps({"weight_map": weight_map}))
    tensors, source = io.read_model_tensors(tmp_path)
    assert source == index and sorted(tensors) == ["a", "b", "c"]
    (tmp_path / f"part-2.{suffix}").unlink()
    with pytest.raises(FileNotFoundError, match=rf"part-2\.{suffix}"):
        io.read_model_tensors(tmp_path)


def test_safetensors_are_preferred_over_torch_files(tmp_path):
    (tmp_path / io.PYTORCH_NAME).write_bytes(pickle.dumps(_touch(tmp_path / "pwned")))
    io.write_safetensors({"a": np.ones(2, np.float32)}, tmp_path / io.SAFETENSORS_NAME)
    tensors, source = io.read_model_tensors(tmp_path)
    assert source.name == io.SAFETENSORS_NAME and list(tensors) == ["a"]
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------- source audit

_SAFE_YAML_LOADERS = {"BaseLoader", "SafeLoader", "CSafeLoader", "CBaseLoader"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function, e.g. "torch.load"."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _kw(call: ast.Call, key: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == key), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        loader = _kw(node, "Loader")
        if _is_true(_kw(node, "trust_remote_code")):
            found.append((node.lineno, "trust_remote_code=True"))
        elif name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load"):
            found.append((node.lineno, name))
        elif name.endswith("np.load") and _is_true(_kw(node, "allow_pickle")):
            found.append((node.lineno, "np.load(allow_pickle=True)"))
        elif name == "yaml.load" and _name(loader).split(".")[-1] not in _SAFE_YAML_LOADERS:
            found.append((node.lineno, "yaml.load with an unsafe Loader"))
        elif name == "yaml.unsafe_load":
            found.append((node.lineno, name))
    return found


def test_audit_finds_unsafe_calls():
    bad = (
        "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\n"
        "AutoModel.from_pretrained(d, trust_remote_code=True)\nnp.load(p, allow_pickle=True)\n"
        "yaml.load(s, Loader=yaml.Loader)\n"
        "torch.load(p, weights_only=True)\nyaml.load(s, Loader=yaml.BaseLoader)\n"
    )
    assert [line for line, _ in _unsafe_calls(ast.parse(bad))] == [1, 2, 3, 4, 5, 6]


def test_no_code_execution_paths_in_the_library():
    root = pathlib.Path(sft_jax.__file__).parent
    problems = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        rel = os.path.relpath(path, root.parent)
        problems += [f"{rel}:{n}: {what}" for n, what in _unsafe_calls(ast.parse(source))]
        problems += [f"{rel}: mentions trust_remote_code=True"] * (
            "trust_remote_code=True" in source
        )
    assert not problems, "\n".join(problems)
