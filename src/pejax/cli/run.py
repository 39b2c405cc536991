"""``pejax demo``, ``pejax run CONFIG`` and ``pejax components``: the config-driven commands."""

from __future__ import annotations

import argparse
import copy
import math
import sys


def demo_main(args: argparse.Namespace) -> int:
    """``pejax demo``: the embedded digits configuration with the command line's seed, epsilon and iterations."""
    from pejax.run_config import DEMO_CONFIG
    from pejax.run_config import run_experiment

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


def components_main(args: argparse.Namespace) -> int:
    """``pejax components``: every registered component and its keys, as text, JSON or Markdown."""
    import json

    from pejax import registry

    if args.json:
        print(json.dumps(registry.describe(), indent=2))
    elif args.markdown:
        print(registry.markdown(), end="")
    else:
        print(registry.text(), end="")
    return 0


def run_main(args: argparse.Namespace) -> int:
    """``pejax run CONFIG``: a TOML or YAML configuration with ``--set`` overrides (2: no output folder)."""
    from pejax.config import load_config_file
    from pejax.run_config import run_experiment

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
