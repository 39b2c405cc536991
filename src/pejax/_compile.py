"""Compiler settings for pejax's small kernels (random draws, selection, the glyph simulator).

Their compile time, not their run time, is what a PE run pays for them: a program of a few element-wise ops over
four threefry random streams took 2.75 s to compile at XLA's default backend optimisation and 1.16 s at level 1,
and ran in the same time (216 vs 202 us for 48 x 10 draws; measured on this project's 2-core CPU machine, under
load, same process, see BUILD_NOTES). The vote kernel is left at the default: its matmul gained nothing in compile
time and is the hot path of large runs.
"""

from __future__ import annotations

QUICK_COMPILE = {"xla_backend_optimization_level": 1}
"""``jax.jit(..., compiler_options=QUICK_COMPILE)``: the XLA backend (LLVM) at optimisation level 1."""
