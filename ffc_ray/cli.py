"""`ffc-ray`: one entry point, a subcommand per area.

Each subcommand lives in its own module exposing ``configure(parser)`` and ``run(args) -> int``;
this file only dispatches, so importing it is cheap and Ray is reached only through
``ffc_ray/ray/``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ffc_ray.config import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("ffc_ray.data.cli", "import, inspect and verify face stores and verification sets"),
    "train": ("ffc_ray.ray.train_cli", "train one model on Ray Train (local Ray or a cluster)"),
    "sweep": ("ffc_ray.ray.sweep.cli", "run a Ray Tune + Optuna sweep from a sweep YAML"),
    "eval": ("ffc_ray.eval.cli", "evaluate a checkpoint on verification pairs"),
    "bench": ("ffc_ray.bench", "run a benchmark script from benchmarks/"),
    "demo": ("ffc_ray.demo", "the embedded-default demo (synthetic data, small run)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffc-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).configure(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "_missing", False):
        print(f"ffc-ray {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"ffc-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a storage URI that cannot be read or written: its message names it
        from ffc_ray.storage import StorageError

        if not isinstance(exc, StorageError):
            raise
        print(f"ffc-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a checkpoint holding more than plain data: refused, named
        from ffc_ray.engine.checkpoint import CheckpointError

        if not isinstance(exc, CheckpointError):
            raise
        print(f"ffc-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
