"""Mesh construction and logical-axis rules (8 fake CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sft_jax import sharding
from tests.toy import ToyClassifier
from tests.unit.test_steps import build, run


def test_make_mesh_fills_minus_one_and_checks_size():
    assert dict(sharding.make_mesh((-1, 1, 1)).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh((2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.make_mesh((1, 1, 1)).devices.size == 1
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh((16, 1, 1))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh((-1, -1, 1))


def test_rules_place_params_and_replicate_indivisible_dims():
    model = ToyClassifier(vocab=50, hidden=16)
    specs = sharding.param_shardings(model, sharding.make_mesh((1, 8, 1)))
    # ("vocab", "embed") -> vocab on tensor (size 1: replicated), embed on fsdp (16 % 8 == 0).
    assert specs["embeddings"]["embedding"].spec == P(None, "fsdp")
    assert specs["dense"]["kernel"].spec == P("fsdp", None)
    specs = sharding.param_shardings(model, sharding.make_mesh((1, 1, 8)))
    # vocab 50 is not divisible by 8: replicated rather than an error.
    assert specs["embeddings"]["embedding"].spec == P(None, None)
    assert specs["dense"]["kernel"].spec == P(None, "tensor")


def test_fsdp_step_matches_one_device_and_shards_params():
    s1, setup1, f1 = build(mesh_shape=(1, 1, 1))
    s8, setup8, f8 = build(mesh_shape=(1, 8, 1), devices=jax.devices())
    s1, l1 = run(s1, setup1, f1)
    s8, l8 = run(s8, setup8, f8)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    kernel = s8.params["dense"]["kernel"]  # [16, 16] split over 8 devices on dim 0
    assert kernel.addressable_shards[0].data.shape == (2, 16)


def test_process_rows_cover_this_process_devices():
    # One process here: its devices hold every row, whatever the mesh.
    for shape in ((8, 1, 1), (2, 2, 2), (1, 1, 8)):
        mesh = sharding.make_mesh(shape)
        assert sharding.process_rows(sharding.batch_sharding(mesh), 16) == slice(0, 16)


class _Held:
    """What one process of a multi-host run sees of a 4-part batch sharding: its devices hold
    parts ``parts`` (of 4) of the rows."""

    def __init__(self, *parts):
        real = sharding.batch_sharding(sharding.make_mesh((4, 1, 1), jax.devices()[:4]))
        self.spec, self.mesh, self.parts = real.spec, real.mesh, parts

    def addressable_devices_indices_map(self, shape):
        n = shape[0] // 4
        return {f"d{i}": (slice(p * n, (p + 1) * n),) for i, p in enumerate(self.parts)}


def test_process_rows_of_a_process_holding_part_of_the_batch():
    second_half = _Held(2, 3)  # process 1 of 2, data parallel
    assert sharding.process_rows(second_half, 16) == slice(8, 16)
    assert sharding.global_rows(second_half, 8) == 16  # its 8 rows are half of a 16-row batch
    batch = {"x": np.arange(32).reshape(16, 2), "y": np.arange(16)}
    mine = sharding.local_rows(batch, second_half)
    np.testing.assert_array_equal(mine["x"], batch["x"][8:])
    np.testing.assert_array_equal(mine["y"], np.arange(8, 16))
    with pytest.raises(ValueError, match="7 rows cannot be split into the 2 parts"):
        sharding.global_rows(second_half, 7)
    with pytest.raises(ValueError, match="10 rows .* 4 devices.*data.batch_size"):
        sharding.process_rows(second_half, 10)
    # Devices of one part on two processes (the tensor axis spans them): both build those rows.
    one_part_twice = _Held(1, 1)
    assert sharding.process_rows(one_part_twice, 16) == slice(4, 8)
    assert sharding.global_rows(one_part_twice, 4) == 16
    everything = _Held(0, 1, 2, 3)
    assert sharding.global_rows(everything, 16) == 16


def test_process_rows_refuses_scattered_rows_and_a_process_outside_the_mesh():
    with pytest.raises(ValueError, match=r"hold rows \[\(0, 4\), \(8, 12\)\] .* not one block"):
        sharding.process_rows(_Held(0, 2), 16)
    with pytest.raises(ValueError, match=r"holds no device of mesh.shape \(4, 1, 1\)"):
        sharding.process_rows(_Held(), 16)


def test_make_mesh_minus_one_must_divide_the_devices():
    # 8 devices: (3, -1, 1) used to build a 3 x 2 mesh (2 devices idle), (16, -1, 1) asked for 0.
    for shape in ((3, -1, 1), (16, -1, 1), (1, 3, -1)):
        with pytest.raises(ValueError, match=r"mesh.shape .* cannot be split"):
            sharding.make_mesh(shape)


def test_indivisible_batch_names_the_config_keys():
    mesh = sharding.make_mesh((2, 2, 2))  # the batch splits over data x fsdp = 4 devices
    batch = {"input_ids": np.zeros((6, 3), np.int32)}
    with pytest.raises(ValueError, match=r"6 rows .* 4 devices.*data.batch_size"):
        sharding.put_batch(batch, sharding.batch_sharding(mesh))
    assert sharding.put_batch({"x": np.zeros((8, 3))}, sharding.batch_sharding(mesh))[
        "x"
    ].shape == (8, 3)
    with pytest.raises(ValueError, match="data.batch_size"):
        sharding.pmap_batch(batch, 4)


def test_feed_rows_whole_batch_in_one_process_and_pmap_refuses_several(monkeypatch):
    from types import SimpleNamespace

    from sft_jax.trainer import Trainer

    assert sharding.feed_rows(sharding.make_mesh((-1, 1, 1)), 16) is None  # one process
    trainer = SimpleNamespace(mode="pmap", cfg=SimpleNamespace(mesh=SimpleNamespace(shape=None)))
    assert Trainer._make_mesh(trainer).shape == {"data": 1, "fsdp": 1, "tensor": 1}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="mesh.mode=pmap runs in one process; this run has 2"):
        Trainer._make_mesh(trainer)
