"""Compiler settings for pejax's small kernels (random draws, selection, the glyph simulator).

Their compile time, not their run time, is what a PE run pays for them: a program of a few element-wise ops over
four threefry random streams took 2.75 s to compile at XLA's default backend optimisation and 1.16 s at level 1,
and ran in the same time (216 vs 202 us for 48 x 10 draws; measured on this project's 2-core CPU machine, under
load, same process, see BUILD_NOTES). The vote kernel is left at the default: its matmul gained nothing in compile
time and is the hot path of large runs.
"""

from __future__ import annotations

import functools

import jax

QUICK_COMPILE = {"xla_backend_optimization_level": 1}
"""``jax.jit(..., compiler_options=QUICK_COMPILE)``: the XLA backend (LLVM) at optimisation level 1."""


def quick_jit(fun=None, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)`` compiled with :data:`QUICK_COMPILE` when called at top level.

    XLA takes compiler options only for a top-level program, so a call with traced arguments (inside another
    ``jit``/``vmap``) uses the plain jitted function, which the outer program inlines and compiles its own way.
    Usable as a decorator, with or without keyword arguments.
    """
    if fun is None:
        return functools.partial(quick_jit, **jit_kwargs)
    quick = jax.jit(fun, compiler_options=QUICK_COMPILE, **jit_kwargs)
    plain = jax.jit(fun, **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        leaves = jax.tree_util.tree_leaves((args, kwargs))
        traced = any(isinstance(x, jax.core.Tracer) for x in leaves)
        return (plain if traced else quick)(*args, **kwargs)

    return call
