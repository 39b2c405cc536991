"""Command line: ``pejax demo``, ``pejax run CONFIG``, ``pejax components``, ``pejax account``, ``pejax audit``."""

from __future__ import annotations

import argparse
import copy
import math
import sys

from pejax import accounting


def _account(args) -> int:
    if (args.epsilon is None) == (args.noise_multiplier is None):
        print(
            "pejax account: give exactly one of --epsilon and --noise-multiplier.", file=sys.stderr
        )
        return 2
    if args.epsilon is not None:
        sigma = accounting.noise_multiplier(
            epsilon=args.epsilon,
            iterations=args.iterations,
            delta=args.delta,
            accountant=args.accountant,
        )
        print(f"noise multiplier ({args.accountant}-calibrated): {sigma:.6f}")
    else:
        sigma = args.noise_multiplier
        print(f"noise multiplier: {sigma:.6f}")
    print(f"iterations: {args.iterations}, delta: {args.delta:g}")
    for name in accounting.ACCOUNTANTS:
        eps = accounting.epsilon(
            noise_multiplier=sigma, iterations=args.iterations, delta=args.delta, accountant=name
        )
        print(f"epsilon ({name}): {eps:.6f}")
    return 0


def _demo(args) -> int:
    from pejax.experiment import DEMO_CONFIG
    from pejax.experiment import run_experiment

    config = copy.deepcopy(DEMO_CONFIG)
    config["run"]["seed"] = args.seed
    if args.epsilon is not None:
        if math.isinf(args.epsilon):
            config["privacy"].update({"epsilon": None, "noise_multiplier": 0.0})
        else:
            config["privacy"]["epsilon"] = args.epsilon
    if args.iterations is not None:
        config["pe"]["iterations"] = args.iterations
    if args.noise_seed is not None:
        config["privacy"]["noise_seed"] = args.noise_seed
    run_experiment(config, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


def apply_overrides(config: dict, items) -> dict:
    """Applies ``--set section.key=value`` overrides (value parsed as TOML, else taken as a string)."""
    import tomllib

    from pejax.config import check_sections

    for item in items or ():
        target, sep, raw = item.partition("=")
        path = target.strip().split(".")
        if not sep or len(path) < 2 or not all(path):
            raise ValueError(
                f"--set takes section.key=value (e.g. --set data.path=/data/cifar10), got {item!r}."
            )
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        check_sections({path[0]: None}, f"--set {item!r}")
        table = config
        for part in path[:-1]:
            nxt = table.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a table in the config.")
            table = nxt
        table[path[-1]] = value
    return config


def _components(args) -> int:
    import json

    from pejax import registry

    if args.json:
        print(json.dumps(registry.describe(), indent=2))
    elif args.markdown:
        print(registry.markdown(), end="")
    else:
        print(registry.text(), end="")
    return 0


def _run(args) -> int:
    from pejax.config import load_config_file
    from pejax.experiment import run_experiment

    config = apply_overrides(load_config_file(args.config), args.set)
    if args.dry_run:  # print the requests an API generator would send, and their count; send none
        from pejax.generators.openai_chat import dry_run

        dry_run(config)
        return 0
    out = args.out or (config.get("run") or {}).get("out")
    if out is None:
        print("pejax run: give --out DIR or run.out in the config file.", file=sys.stderr)
        return 2
    run_experiment(config, out, resume=args.resume, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pejax", description="Differentially private synthetic data by Private Evolution."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="PE on scikit-learn's digits with the glyph simulator")
    demo.add_argument("--out", default="pejax-demo", help="output folder (default: pejax-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epsilon", type=float, default=None, help="default 1; inf = no noise")
    demo.add_argument("--iterations", type=int, default=None)
    demo.add_argument(
        "--noise-seed",
        type=int,
        default=None,
        help="reproducible noise for research: the run is then NOT a differentially private release",
    )
    demo.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(fn=_demo)

    run = sub.add_parser("run", help="run a TOML or YAML configuration")
    run.add_argument("config")
    run.add_argument("--out", default=None)
    run.add_argument("--resume", action="store_true")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--dry-run", action="store_true", help="print the API requests, send none")
    run.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax, e.g. --set pe.iterations=2); repeatable",
    )
    run.set_defaults(fn=_run)

    comp = sub.add_parser(
        "components",
        help="every generator kind, embedding, data source and metric a config can name, with its keys",
    )
    fmt = comp.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable JSON")
    fmt.add_argument("--markdown", action="store_true", help="the README's configuration reference")
    comp.set_defaults(fn=_components)

    acc = sub.add_parser("account", help="noise multiplier and epsilon under every accountant")
    acc.add_argument("--epsilon", type=float, default=None)
    acc.add_argument("--noise-multiplier", type=float, default=None)
    acc.add_argument("--delta", type=float, required=True)
    acc.add_argument("--iterations", type=int, required=True)
    acc.add_argument("--accountant", default="pld", choices=accounting.ACCOUNTANTS)
    acc.set_defaults(fn=_account)

    from pejax._audit_cli import add_audit_arguments
    from pejax._audit_cli import audit_main

    audit = sub.add_parser(
        "audit", help="empirical epsilon lower bound with canaries (jax-privacy's auditor)"
    )
    add_audit_arguments(audit)
    audit.set_defaults(fn=audit_main)
    return parser


def _enable_compilation_cache() -> None:
    """Keeps compiled XLA programs on disk so later runs skip most compilation (a speed setting only).

    The folder is ``$PEJAX_CACHE_DIR`` or ``~/.cache/pejax/xla``; ``PEJAX_CACHE_DIR=off`` disables it. It holds
    compiled programs (shapes and code), never data.
    """
    import os

    folder = os.environ.get(
        "PEJAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pejax", "xla")
    )
    if folder.lower() == "off":
        return
    import jax

    try:
        os.makedirs(folder, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except (
        OSError,
        AttributeError,
    ):  # pragma: no cover - read-only home or an old jax: run without it
        pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("demo", "run"):
        _enable_compilation_cache()
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError, RuntimeError, ImportError) as e:
        print(f"pejax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
