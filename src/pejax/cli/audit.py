"""``pejax audit``: empirical privacy audit with canaries.

``--target run`` (the default) audits the shipped run, ``PrivateEvolution.run`` itself, as a black box
(:func:`pejax.run_audit.audit_run`); ``--target kernel`` audits the vote-histogram kernels in a re-assembled,
vmapped loop (:func:`pejax.auditing.audit_mechanism`: faster, for the kernels alone).

Wired into :func:`pejax.cli.build_parser` as::

    audit = sub.add_parser("audit", help="empirical epsilon lower bound beside the accountants' epsilon")
    add_audit_arguments(audit)
    audit.set_defaults(fn=audit_main)

Exit status: 0 when no violation is detected, 3 when the lower bound exceeds the claimed epsilon, 2 for a usage
error (and 1, from :func:`pejax.cli.main`, for invalid values).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

EXIT_PASS = 0
EXIT_USAGE = 2
EXIT_VIOLATION = 3

BROKEN_CHOICES = ("none", "sensitivity", "no_group_norm", "reused_noise")
RUN_BROKEN_CHOICES = (
    "none",
    "shared_noise_across_classes",
    "shared_noise_across_iterations",
    "noise_before_class_mask",
    "public_noise_key",
    "continuous_noise",
)
KERNEL_ONLY = ("noise_multiplier", "k", "user_level", "num_private", "num_synthetic")


def add_audit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``pejax audit`` options to ``parser`` and returns it.

    Args:
      parser: an ``argparse`` (sub)parser.

    Returns:
      the same parser.
    """
    from pejax.accounting import ACCOUNTANTS

    parser.add_argument(
        "--target",
        choices=("run", "kernel"),
        default="run",
        help="run: audit PrivateEvolution.run itself, the shipped code path (default); kernel: the "
        "vote-histogram kernels in a re-assembled loop (--noise-multiplier, --k, --user-level, ...)",
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="claimed epsilon; the noise is calibrated to it (give this or --noise-multiplier)",
    )
    parser.add_argument(
        "--noise-multiplier", type=float, default=None, help="noise multiplier sigma (> 0)"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=1,
        help="T releases per run; 1 audits the histogram mechanism, T > 1 a short PE loop (default 1)",
    )
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    parser.add_argument(
        "--runs",
        type=int,
        default=2000,
        help="runs with the canary, and as many without (default 2000)",
    )
    parser.add_argument(
        "--k", type=int, default=1, help="neighbours per private sample (default 1)"
    )
    parser.add_argument(
        "--user-level",
        action="store_true",
        help="neighbouring data sets differ by one user of --group-size samples",
    )
    parser.add_argument(
        "--group-size", type=int, default=4, help="samples per user at user level (default 4)"
    )
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="confidence of the bound (default 0.95)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--broken",
        choices=sorted(set(BROKEN_CHOICES) | set(RUN_BROKEN_CHOICES)),
        default="none",
        help="audit a deliberately broken mechanism (kernel: "
        + ", ".join(BROKEN_CHOICES[1:])
        + "; run: "
        + ", ".join(RUN_BROKEN_CHOICES[1:])
        + ") instead of pejax's, to validate the audit",
    )
    parser.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default="pld",
        help="accountant whose epsilon the verdict tests and --epsilon is calibrated with (default pld)",
    )
    parser.add_argument(
        "--num-private",
        type=int,
        default=64,
        help="private samples besides the canary (default 64)",
    )
    parser.add_argument(
        "--num-synthetic", type=int, default=64, help="candidates = histogram bins (default 64)"
    )
    parser.add_argument("--out", default=None, help="also write the report as JSON to this file")
    return parser


def audit_main(args: argparse.Namespace) -> int:
    """Runs the audit described by ``args`` (see :func:`add_audit_arguments`) and prints the report.

    Args:
      args: parsed arguments.

    Returns:
      0 when no violation is detected, 3 when one is, 2 for a usage error.

    Raises:
      ValueError, TypeError: invalid values (from :func:`pejax.auditing.audit_mechanism`).
      ImportError: jax-privacy is missing (the message names the ``audit`` extra to install).
    """
    try:
        import jax_privacy  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "pejax audit needs jax-privacy, which comes with the 'audit' extra: install it with "
            "pip install 'pejax[audit]'."
        ) from e
    if args.target == "run":
        return _audit_run_main(args)
    import jax

    from pejax import auditing

    if args.broken not in BROKEN_CHOICES:
        print(
            f"pejax audit: --broken {args.broken} is a bug of the run; use it with --target run.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if (args.epsilon is None) == (args.noise_multiplier is None):
        print("pejax audit: give exactly one of --epsilon and --noise-multiplier.", file=sys.stderr)
        return EXIT_USAGE
    mechanism = "correct" if args.broken == "none" else args.broken
    notes = []
    if args.broken == "sensitivity" and args.k == 1:
        notes.append(
            "--broken sensitivity is identical to the correct mechanism at --k 1; use --k 16."
        )
    if args.broken == "no_group_norm" and not args.user_level:
        notes.append(
            "--broken no_group_norm only differs from the correct mechanism with --user-level."
        )
    if args.broken == "reused_noise" and args.iterations == 1:
        notes.append(
            "--broken reused_noise only differs from the correct one with --iterations > 1."
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    key = jax.random.key(args.seed)
    setup_key, audit_key = jax.random.split(key)
    setup = auditing.make_audit_setup(
        setup_key,
        num_private=args.num_private,
        num_synthetic=args.num_synthetic,
        group_size=args.group_size if args.user_level else None,
    )
    start = time.perf_counter()
    report = auditing.audit_mechanism(
        audit_key,
        setup,
        epsilon=args.epsilon,
        noise_multiplier=args.noise_multiplier,
        iterations=args.iterations,
        k=args.k,
        delta=args.delta,
        runs=args.runs,
        confidence=args.confidence,
        mechanism=mechanism,
        accountant=args.accountant,
    )
    seconds = time.perf_counter() - start
    print(report.summary())
    print(f"time: {seconds:.1f} s ({2 * args.runs} runs, compilation included)")
    if args.out is not None:
        doc = report.to_dict()
        doc["seconds"] = seconds
        doc["settings"] = {
            "seed": args.seed,
            "broken": args.broken,
            "group_size": args.group_size if args.user_level else None,
            "num_private": args.num_private,
            "num_synthetic": args.num_synthetic,
            "epsilon_target": args.epsilon,
        }
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return EXIT_PASS if report.passed else EXIT_VIOLATION


def _audit_run_main(args: argparse.Namespace) -> int:
    from pejax import run_audit

    defaults = {
        "noise_multiplier": None,
        "k": 1,
        "user_level": False,
        "num_private": 64,
        "num_synthetic": 64,
    }
    given = [name for name in KERNEL_ONLY if getattr(args, name) != defaults[name]]
    if given:
        flags = ", ".join("--" + g.replace("_", "-") for g in given)
        print(
            f"pejax audit: {flags} apply to --target kernel only; the run audit calibrates its noise to "
            "--epsilon like a real run.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.broken not in RUN_BROKEN_CHOICES:
        print(
            f"pejax audit: --broken {args.broken} is a kernel bug; use it with --target kernel.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    epsilon = 1.0 if args.epsilon is None else args.epsilon
    iterations = max(args.iterations, 2)
    report = run_audit.audit_run(
        runner="correct" if args.broken == "none" else args.broken,
        epsilon=epsilon,
        delta=args.delta,
        iterations=iterations,
        runs=args.runs,
        confidence=args.confidence,
        seed=args.seed,
    )
    print(report.summary())
    print(f"time: {report.seconds:.1f} s ({2 * args.runs} runs of PrivateEvolution.run)")
    if args.out is not None:
        doc = report.to_dict()
        doc["settings"] = {"target": "run", "epsilon": epsilon, "iterations": iterations}
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return EXIT_PASS if report.passed else EXIT_VIOLATION


__all__ = ["BROKEN_CHOICES", "RUN_BROKEN_CHOICES", "add_audit_arguments", "audit_main"]
