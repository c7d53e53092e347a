"""The declarative HF <-> ours mapping engine."""

import numpy as np
import pytest

from sft_jax.hf import io
from sft_jax.hf.mapping import (
    TRANSPOSE,
    Rule,
    add_prefix,
    export_weights,
    import_weights,
    layer_norm,
    linear,
)

RULES = [*linear(r"h.{i:\d+}.{p:q|k}"), *layer_norm("ln", "norm")]
MODEL = {
    "h.0.q.kernel": np.zeros((3, 2), np.float32),
    "h.0.q.bias": np.zeros((2,), np.float32),
    "h.1.k.kernel": np.zeros((3, 2), np.float32),
    "h.1.k.bias": np.zeros((2,), np.float32),
    "norm.scale": np.zeros((3,), np.float32),
    "norm.bias": np.zeros((3,), np.float32),
}


def _hf():
    rng = np.random.RandomState(0)
    return {
        "h.0.q.weight": rng.randn(2, 3),  # torch layout [out, in]
        "h.0.q.bias": rng.randn(2),
        "h.1.k.weight": rng.randn(2, 3),
        "h.1.k.bias": rng.randn(2),
        "ln.weight": rng.randn(3),
        "ln.bias": rng.randn(3),
    }


def test_rule_both_directions():
    rule = Rule(r"a.{i:\d+}.w", "b.{i}.kernel", TRANSPOSE)
    assert rule.to_ours("a.12.w") == "b.12.kernel"
    assert rule.to_hf("b.3.kernel") == "a.3.w"
    assert rule.to_ours("a.x.w") is None and rule.to_ours("a.1.w.extra") is None
    with pytest.raises(ValueError, match="placeholders differ"):
        Rule("a.{i}", "b")


def test_import_transposes_casts_and_export_inverts():
    hf = _hf()
    ours = import_weights(hf, MODEL, RULES, source="x.safetensors")
    assert set(ours) == set(MODEL)
    np.testing.assert_allclose(ours["h.0.q.kernel"], hf["h.0.q.weight"].T, rtol=1e-6)
    assert ours["norm.scale"].dtype == np.float32
    back = export_weights(ours, RULES)
    assert set(back) == set(hf)
    np.testing.assert_allclose(back["h.1.k.weight"], hf["h.1.k.weight"], rtol=1e-6)


def test_import_reports_every_problem_with_the_source():
    hf = _hf()
    del hf["ln.bias"], hf["h.1.k.bias"]
    hf["extra.weight"] = np.zeros(1)
    hf["h.7.q.weight"] = np.zeros((2, 3))  # a rule matches, the model has no layer 7
    hf["h.0.q.weight"] = np.zeros((5, 3))
    with pytest.raises(ValueError) as e:
        import_weights(hf, MODEL, RULES, source="ckpt/model.safetensors")
    msg = str(e.value)
    assert "ckpt/model.safetensors" in msg
    assert "extra.weight (no rule matches)" in msg
    assert "h.7.q.weight (-> h.7.q.kernel, not in the model)" in msg
    assert "norm.bias" in msg and "h.1.k.bias" in msg
    assert "h.0.q.weight: checkpoint shape (5, 3), model expects (2, 3)" in msg


def test_ignore_and_allow_missing_are_explicit():
    hf = _hf()
    hf["buffers.position_ids"] = np.arange(3)
    del hf["ln.weight"]
    ours = import_weights(
        hf, MODEL, RULES, source="s", ignore=[r"buffers\..*"], allow_missing=[r"norm\.scale"]
    )
    assert "norm.scale" not in ours


def test_export_rejects_unmapped_params():
    with pytest.raises(ValueError, match="stray.kernel"):
        export_weights({**MODEL, "stray.kernel": np.zeros(1)}, RULES)


def test_add_prefix_only_touches_base_roots():
    out = add_prefix({"embeddings.w": 1, "bert.encoder.x": 2, "cls.y": 3}, "bert.", ["embeddings"])
    assert set(out) == {"bert.embeddings.w", "bert.encoder.x", "cls.y"}


def test_io_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        io.read_safetensors(tmp_path / "nothing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        io.read_safetensors(bad)
    (tmp_path / "c.json").write_text("{oops")
    with pytest.raises(ValueError, match="c.json"):
        io.read_json(tmp_path / "c.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        io.read_model_tensors(tmp_path)
    io.write_safetensors({"a": np.arange(6, dtype=np.float32).reshape(2, 3).T}, tmp_path / "o.st")
    back = io.read_safetensors(tmp_path / "o.st")["a"]
    np.testing.assert_array_equal(back, [[0, 3], [1, 4], [2, 5]])
