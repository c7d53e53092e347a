"""Matmul / convolution FLOPs counted from a jaxpr, against hand counts."""

import jax
import jax.numpy as jnp
import pytest

from sft_jax import benchmark_shapes, flop_count, tasks


def test_dense_einsum_and_convolution():
    x = jnp.ones((4, 5))
    assert flop_count.matmul_flops(lambda a, b: a @ b, x, jnp.ones((5, 6))) == 2 * 4 * 5 * 6
    q = jnp.ones((2, 3, 7, 8))  # [B, H, T, D] x [B, H, S, D] -> [B, H, T, S]
    flops = flop_count.matmul_flops(lambda a: jnp.einsum("bhtd,bhsd->bhts", a, a), q)
    assert flops == 2 * (2 * 3 * 7 * 7) * 8
    img, kernel = jnp.ones((1, 10, 10, 6)), jnp.ones((3, 3, 3, 4))  # groups 2: 3 inputs each
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    assert flop_count.matmul_flops(conv, img, kernel) == 2 * (1 * 5 * 5 * 4) * 3 * 9
    # Elementwise work and reductions are not model FLOPs.
    assert flop_count.matmul_flops(lambda a: jnp.tanh(a).sum(), x) == 0


def test_scan_jit_and_grad_are_followed():
    w = jnp.ones((5, 5))
    body = lambda c, _: (jnp.tanh(c @ w), None)
    scanned = lambda c: jax.lax.scan(body, c, None, length=3)[0]
    assert flop_count.matmul_flops(jax.jit(scanned), jnp.ones((2, 5))) == 3 * 2 * 2 * 5 * 5
    # The gradient of x @ w needs two matmuls more: dx and dw.
    grad = jax.grad(lambda x: (x @ w).sum())
    assert flop_count.matmul_flops(grad, jnp.ones((2, 5))) == 2 * (2 * 2 * 5 * 5)


def test_while_loops_are_refused():
    loop = lambda x: jax.lax.while_loop(lambda c: c.sum() < 10, lambda c: c @ c, x)
    with pytest.raises(ValueError, match="trip count"):
        flop_count.matmul_flops(loop, jnp.ones((2, 2)))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_forward_count_times_three_is_the_benchmarks_hand_formula(name):
    spec = benchmark_shapes.get_spec(name)
    model, batch = benchmark_shapes.build_model(spec), benchmark_shapes.make_batch(spec)
    task = tasks.get_task(spec.task)
    forward = flop_count.matmul_flops(lambda b: task.logits(model, b, None), batch)
    assert 3 * forward == benchmark_shapes.step_flops(spec)
