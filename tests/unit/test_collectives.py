"""What a compiled step communicates: collectives counted from HLO text, loops by their trip
counts."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sft_jax import collectives

NONE = {"count": 0, "bytes": 0}


def test_bare_instructions_count_once_each_by_their_result():
    hlo = """
  %a = f32[16,3]{1,0} all-reduce(f32[16,3]{1,0} %x), channel_id=1, to_apply=%add
  %b = (f32[4]{0}, bf16[8,2]{1,0}) all-reduce(f32[4]{0} %y, bf16[8,2]{1,0} %z), channel_id=2
  %c = (f32[4]{0}, f32[16]{0}) all-gather-start(f32[4]{0} %y), dimensions={0}
  %d = f32[16]{0} all-gather-done((f32[4]{0}, f32[16]{0}) %c)
  %e = pred[3]{0} collective-permute(pred[3]{0} %p), source_target_pairs={{0,1},{1,0}}
  %f = f32[2]{0} add(f32[2]{0} %g, f32[2]{0} %h)
  %all-reduce.7 = f32[2]{0} negate(f32[2]{0} %g)
"""
    assert collectives.collective_traffic(hlo) == {
        "all-gather": {"count": 1, "bytes": 16 * 4},
        "all-reduce": {"count": 2, "bytes": 16 * 3 * 4 + 4 * 4 + 8 * 2 * 2},
        "all-to-all": {"count": 0, "bytes": 0},
        "collective-permute": {"count": 1, "bytes": 3},
        "reduce-scatter": {"count": 0, "bytes": 0},
    }


def test_loop_bodies_count_once_per_iteration_through_nested_calls():
    """A while loop of 3 iterations whose body runs a loop of 2 and a fusion calling a
    computation: the inner all-reduce runs 6 times, the all-gather (in the called computation)
    3 times, the entry's permute once. The loop condition's trip count is not used."""

    def loop(body: str, n: int) -> str:
        trips = f'{{"known_trip_count":{{"n":"{n}"}}}}'
        return f"while(%t), condition=%c, body=%{body}, backend_config={trips}"

    hlo = f"""HloModule m

%inner_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {{
  %r = f32[4]{{0}} all-reduce(f32[4]{{0}} %x), channel_id=1, to_apply=%add
}}

%gathered (q: f32[2]) -> f32[8] {{
  %g = f32[8]{{0}} all-gather(f32[2]{{0}} %q), dimensions={{0}}
}}

%outer_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {{
  %w = (s32[], f32[4]{{0}}) {loop("inner_body", 2)}
  %f = f32[8]{{0}} fusion(f32[2]{{0}} %y), kind=kLoop, calls=%gathered
}}

ENTRY %main (a: f32[4]) -> f32[4] {{
  %loop = (s32[], f32[4]{{0}}) {loop("outer_body", 3)}
  %p = f32[4]{{0}} collective-permute(f32[4]{{0}} %a), source_target_pairs={{{{0,1}}}}
}}
"""
    assert collectives.collective_traffic(hlo) == {
        "all-gather": {"count": 3, "bytes": 3 * 8 * 4},
        "all-reduce": {"count": 6, "bytes": 6 * 4 * 4},
        "all-to-all": NONE,
        "collective-permute": {"count": 1, "bytes": 4 * 4},
        "reduce-scatter": NONE,
    }


def test_a_compiled_scan_counts_its_collectives_per_iteration():
    """``lax.scan`` over 5 row-sharded slices, each summed over the devices: the compiled loop's
    one all-reduce runs 5 times (XLA records the trip count on the loop)."""
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("d",))
    x = jax.device_put(jnp.ones((5, 8, 16)), NamedSharding(mesh, P(None, "d")))

    def f(x):
        def body(carry, rows):
            return carry + jnp.sum(rows), None

        return jax.lax.scan(body, 0.0, x)[0]

    traffic = collectives.collective_traffic(jax.jit(f).lower(x).compile().as_text())
    assert traffic["all-reduce"]["count"] == 5, traffic
    assert float(jax.jit(f)(x)) == 5 * 8 * 16


def test_an_async_wrapped_computation_counts_at_its_start_only():
    hlo = """HloModule m

%wrapped (q: f32[2]) -> f32[8] {
  %g = f32[8]{0} all-gather(f32[2]{0} %q), dimensions={0}
}

ENTRY %main (a: f32[2]) -> f32[8] {
  %s = ((f32[2]{0}), f32[8]{0}, u32[]) async-start(f32[2]{0} %a), calls=%wrapped
  %u = ((f32[2]{0}), f32[8]{0}, u32[]) async-update(%s), calls=%wrapped
  %d = f32[8]{0} async-done(%u), calls=%wrapped
}
"""
    traffic = collectives.collective_traffic(hlo)
    assert traffic["all-gather"] == {"count": 1, "bytes": 8 * 4}
