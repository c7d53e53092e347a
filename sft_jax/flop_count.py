"""Model FLOPs of a function, counted from its jaxpr: the matmuls and convolutions.

``matmul_flops(fn, *args)`` traces ``fn`` abstractly (no computation, no device memory) and sums
``2 * MACs`` over every ``dot_general`` (dense layers, einsums, attention) and
``conv_general_dilated`` (convolutions, any stride, padding or grouping) it runs, descending into
jitted, checkpointed, custom-derivative and ``scan`` bodies (a scan body counts ``length``
times; of a ``cond``'s branches the most expensive). Elementwise work, reductions and gathers
(embedding lookups) are not model FLOPs and are not counted. This is the convention of
``sft_jax.benchmark``'s hand formulas (PaLM appendix B), which it reproduces for the text models
(``tests/unit/test_benchmark.py``); the benchmark uses it for the image models, whose
convolution shapes would otherwise be counted by hand per architecture.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core


def _dot_flops(eqn: Any) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    k = math.prod(lhs[d] for d in lhs_contract)
    return 2 * math.prod(eqn.outvars[0].aval.shape) * k


def _conv_flops(eqn: Any) -> int:
    """2 * out elements * (input features per group) * kernel window."""
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial) dims
    window = math.prod(rhs[d] for d in spec[2:])
    return 2 * math.prod(eqn.outvars[0].aval.shape) * rhs[spec[1]] * window


def _sub_jaxprs(value: Any) -> list[core.Jaxpr]:
    if isinstance(value, core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_flops(jaxpr: core.Jaxpr) -> int:
    """Matmul + convolution FLOPs of one execution of ``jaxpr`` (see the module doc)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "while":
            raise ValueError("a while loop's trip count is unknown: its FLOPs cannot be counted")
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def matmul_flops(fn: Callable[..., Any], *args: Any) -> int:
    """FLOPs of the matmuls and convolutions of one call ``fn(*args)``; ``args`` may be arrays
    or ``jax.ShapeDtypeStruct``s."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
