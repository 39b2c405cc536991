"""``pejax account``: noise multiplier and epsilon under every accountant."""

from __future__ import annotations

import argparse
import sys

from pejax import accounting


def account_main(args: argparse.Namespace) -> int:
    """``pejax account``: the noise multiplier of a target epsilon (or the epsilon of a multiplier) under every
    accountant. Returns the exit status (2: not exactly one of --epsilon and --noise-multiplier)."""
    if (args.epsilon is None) == (args.noise_multiplier is None):
        print(
            "pejax account: give exactly one of --epsilon and --noise-multiplier.", file=sys.stderr
        )
        return 2
    # Everything is computed (and every input checked) before anything is printed.
    lines = []
    if args.epsilon is not None:
        sigma = accounting.noise_multiplier(
            epsilon=args.epsilon,
            iterations=args.iterations,
            delta=args.delta,
            accountant=args.accountant,
        )
        lines.append(f"noise multiplier ({args.accountant}-calibrated): {sigma:.6f}")
    else:
        sigma = args.noise_multiplier
        lines.append(f"noise multiplier: {sigma:.6f}")
    lines.append(f"iterations: {args.iterations}, delta: {args.delta:g}")
    for name in accounting.ACCOUNTANTS:
        eps = accounting.epsilon(
            noise_multiplier=sigma, iterations=args.iterations, delta=args.delta, accountant=name
        )
        lines.append(f"epsilon ({name}): {eps:.6f}")
    print("\n".join(lines))
    return 0
