"""Matmul and convolution FLOPs of a JAX function, counted on its jaxpr with loop trip counts.

XLA's cost analysis counts the body of a `scan` / `while` once, not once per
iteration, so it undercounts scanned layer stacks. `matmul_flops` walks the
jaxpr instead: 2 x (output elements) x (contracted size) for every
`dot_general`, 2 x (output elements) x (input channels per group) x (kernel
window) for every convolution, multiplied by `scan` lengths and summed through
nested jaxprs (jit, remat, custom_vjp; a `cond` counts its most expensive
branch, a `while` its body once).
Elementwise work (softmax, norms, activations) is not counted: this is the
model-FLOPs numerator of MFU.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core


def matmul_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of the matmuls and convolutions of `fn(*args)` (args may be abstract ShapeDtypeStructs)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr: core.Jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
            window = np.prod([rhs[d] for d in spec[2:]])
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * rhs[spec[1]] * window
        elif name == "scan":
            total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(_jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:  # jit, remat, custom_vjp / custom_jvp, while (body counted once: its trip count is unknown)
            total += sum(_nested(value) for value in eqn.params.values())
    return total


def _nested(value: Any) -> float:
    """FLOPs of a jaxpr held in an equation parameter (jit, remat, custom_vjp/jvp bodies)."""
    if isinstance(value, core.ClosedJaxpr):
        return _jaxpr_flops(value.jaxpr)
    if isinstance(value, core.Jaxpr):
        return _jaxpr_flops(value)
    return 0.0
