"""`ffc-ray bench [NAME [ARGS ...]]`: run a script of the checkout's ``benchmarks/`` folder.

Without NAME, lists the benchmarks with their first docstring line. Each benchmark measures
side by side in one run and prints one JSON object as its last line; ``ffc-ray bench NAME
--help`` shows its options. The scripts live in the repository, not in the installed package,
so this needs a checkout (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def available(bench_dir: Path = BENCH_DIR) -> dict[str, str]:
    """Benchmark name -> the first line of its docstring."""
    out: dict[str, str] = {}
    if not bench_dir.is_dir():
        return out
    for path in sorted(bench_dir.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        except (SyntaxError, OSError, UnicodeDecodeError):
            doc = ""
        out[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="benchmark to run (omit to list them)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def run(args: argparse.Namespace, bench_dir: Path = BENCH_DIR) -> int:
    names = available(bench_dir)
    if not names:
        print(
            f"ffc-ray bench: no benchmarks found in {bench_dir} (they ship with the source "
            "checkout: install it with `pip install -e .`)",
            file=sys.stderr,
        )
        return 2
    if not args.name:
        width = max(len(n) for n in names)
        for name, doc in names.items():
            print(f"{name:<{width}}  {doc}")
        return 0
    name = args.name[:-3] if args.name.endswith(".py") else args.name
    if name not in names:
        print(
            f"ffc-ray bench: unknown benchmark {args.name!r}; available: {', '.join(names)}",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(bench_dir / f"{name}.py"), *args.args])
