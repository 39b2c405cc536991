"""Command line: ``pejax demo``, ``pejax run CONFIG``, ``pejax components``, ``pejax account``, ``pejax audit``.

The parser and :func:`main` (the ``pejax`` console script, also ``python -m pejax.cli``) live here; each command's
code lives in its module: :mod:`pejax.cli.run` (demo, run, components), :mod:`pejax.cli.account` and
:mod:`pejax.cli.audit`.
"""

from __future__ import annotations

import argparse
import errno
import sys

from pejax import accounting
from pejax.cli.account import account_main
from pejax.cli.audit import add_audit_arguments
from pejax.cli.audit import audit_main
from pejax.cli.run import apply_overrides as apply_overrides
from pejax.cli.run import components_main
from pejax.cli.run import demo_main
from pejax.cli.run import run_main


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
    demo.set_defaults(fn=demo_main)

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
    run.set_defaults(fn=run_main)

    comp = sub.add_parser(
        "components",
        help="every generator kind, embedding, data source and metric a config can name, with its keys",
    )
    fmt = comp.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable JSON")
    fmt.add_argument("--markdown", action="store_true", help="the README's configuration reference")
    comp.set_defaults(fn=components_main)

    acc = sub.add_parser("account", help="noise multiplier and epsilon under every accountant")
    acc.add_argument("--epsilon", type=float, default=None)
    acc.add_argument("--noise-multiplier", type=float, default=None)
    acc.add_argument("--delta", type=float, required=True)
    acc.add_argument("--iterations", type=int, required=True)
    acc.add_argument("--accountant", default="pld", choices=accounting.ACCOUNTANTS)
    acc.set_defaults(fn=account_main)

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
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    except (
        OSError,
        AttributeError,
    ):  # pragma: no cover - read-only home or an old jax: run without it
        pass


# Top-level modules of the optional extras (pyproject.toml), to name the extra when one is missing.
_EXTRA_OF_MODULE = {
    "jax_privacy": "audit",
    "PIL": "demo",
    "matplotlib": "demo",
    "sklearn": "demo",
    "tqdm": "demo",
    "yaml": "demo",
    "fontTools": "demo",
    "flax": "flax",
    "optax": "flax",
    "orbax": "flax",
    "torch": "diffusers",
    "diffusers": "diffusers",
    "transformers": "diffusers",
    "safetensors": "diffusers",
    "sentence_transformers": "text",
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_message(command: str, error: BaseException) -> str:
    """The one-line message ``pejax COMMAND`` prints for an expected failure (see :func:`main`)."""
    resumable = command in ("demo", "run")
    if isinstance(error, KeyboardInterrupt):
        return f"pejax {command}: interrupted" + ("; resume with --resume." if resumable else ".")
    if (
        isinstance(error, ModuleNotFoundError)
        and (error.name or "").split(".")[0] in _EXTRA_OF_MODULE
    ):
        module = error.name.split(".")[0]
        extra = _EXTRA_OF_MODULE[module]
        return (
            f"pejax {command}: error: this needs the optional module {module!r} from the {extra!r} extra; "
            f"install it with pip install 'pejax[{extra}]'."
        )
    if isinstance(error, OSError) and error.errno is not None:
        text = error.strerror or str(error)
        if error.filename is not None:
            text += f": {str(error.filename)!r}"
        if resumable and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            text += (
                " (checkpoints already written are intact: make room, then resume with --resume)"
            )
        return f"pejax {command}: error: {_one_line(text)}."
    if isinstance(error, MemoryError):
        return f"pejax {command}: error: out of memory ({_one_line(error) or 'MemoryError'})."
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    return f"pejax {command}: error: {_one_line(text)}"


def main(argv=None) -> int:
    """Runs ``pejax`` with ``argv`` and returns the exit status.

    Expected failures never print a traceback: invalid values and files (``ValueError``, ``TypeError``,
    ``KeyError``, ``EOFError``), folders in use or runtime conditions (``RuntimeError``), operating-system errors
    (disk full, read-only or non-folder paths: ``OSError``), memory exhaustion and a missing optional extra
    (named, with the ``pip install`` line) print one line on stderr and exit 1; Ctrl-C prints "interrupted"
    (with "resume with --resume" for ``demo`` and ``run``) and exits 130.
    """
    args = build_parser().parse_args(argv)
    if args.command in ("demo", "run"):
        _enable_compilation_cache()
    try:
        return args.fn(args)
    except KeyboardInterrupt as e:
        print(error_message(args.command, e), file=sys.stderr)
        return 130
    except (
        ValueError,
        TypeError,
        KeyError,
        EOFError,
        RuntimeError,
        OSError,
        ImportError,
        MemoryError,
    ) as e:
        print(error_message(args.command, e), file=sys.stderr)
        return 1
