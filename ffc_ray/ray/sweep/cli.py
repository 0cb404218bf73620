"""``ffc-ray sweep SWEEP.yaml [--resume] [--address ...] [--name ...] [--storage PATH]``.

Runs a Ray Tune + Optuna sweep (:mod:`ffc_ray.ray.sweep`) described by a sweep file (see
``sweeps/``), then prints the results table, the best config (ready for ``ffc-ray train``), the
Pareto front in multi-objective mode, and the TensorBoard command. The experiment folder is
``<storage>/<name>`` (default ``<train.output_dir>/sweeps/<sweep name>``, i.e. ``runs/sweeps``);
``--resume`` continues a sweep whose driver died, keeping its finished trials. ``--storage`` may
be a bucket URI (``s3://bucket/sweeps``, ``gs://...``): Tune and the trials' Train runs write
there natively, the sweep's own files (tables, best config, ``tb/``, a copy of the SQLite Optuna
study unless ``tune.storage`` names a database) are staged in
``<train.output_dir>/sweeps/<name>`` and uploaded whenever a trial ends and at the end.
Exit codes: 0 done, 1 no trial produced the objective, 2 invalid sweep or arguments.
"""

from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep YAML (see sweeps/)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep in its experiment folder (finished trials kept)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: 'auto' or 'ray://host:10001' (default: start "
        "a local Ray with the dashboard)",
    )
    parser.add_argument(
        "--name", default=None, help="experiment and Optuna study name (default: the sweep's name)"
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="folder or bucket URI (s3://..., gs://...) holding experiment folders "
        "(default: <train.output_dir>/sweeps); shared storage on a multi-node cluster",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override of the base training config, e.g. train.steps=60",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs of the local Ray (default: the machine's cores)",
    )


def _overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    from ffc_ray.config import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not of the form key=value (e.g. train.steps=60)")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def print_summary(outcome: Any, spec: Any) -> None:
    """The table, best config, Pareto front and TensorBoard / Optuna commands."""
    from ffc_ray.ray.sweep.results import TABLE_METRICS, markdown_table
    from ffc_ray.ray.sweep.spec import objectives_of

    objs = objectives_of(spec)
    cols = ["trial", "status", *[p.key for p in spec.params]]
    cols += [
        m
        for m in (*[o.metric for o in objs], *TABLE_METRICS, "step")
        if m not in cols and any(r.get(m) is not None for r in outcome.rows)
    ]
    cols = list(dict.fromkeys(cols))
    print()
    print(
        f"sweep {outcome.name}: {len(outcome.rows)} trials in {outcome.wall_s:.0f} s "
        f"({', '.join(f'{o.metric} {o.mode}' for o in objs)})"
    )
    print(markdown_table(outcome.rows, cols))
    print()
    for r in outcome.rows:
        if r.get("error"):
            print(f"trial {r['trial']} failed: {r['error']}  (see {outcome.exp_dir / r['trial']})")
    if getattr(outcome, "exp_uri", None):
        print(f"experiment:  {outcome.exp_uri}  (local staging {outcome.exp_dir})")
    print(f"results:     {outcome.results_md}  (and {outcome.results_csv.name})")
    if outcome.pareto:
        n = len(outcome.pareto)
        print(f"pareto front ({n} trial{'' if n == 1 else 's'}): {outcome.exp_dir / 'pareto.md'}")
        print(markdown_table(outcome.pareto, cols))
    if outcome.best_config is not None:
        b = outcome.best
        vals = ", ".join(f"{o.metric} {_fmt(b.get(o.metric))}" for o in objs)
        print(f"best config: {outcome.best_config}  (trial {b['trial']}: {vals})")
        print(f"  train it:  ffc-ray train {shlex.quote(str(outcome.best_config))}")
    print(
        f"tensorboard: tensorboard --logdir {shlex.quote(str(outcome.tb_dir))} "
        "--host 127.0.0.1   (or: make tensorboard)"
    )
    print(
        f"optuna:      optuna.load_study(study_name={outcome.name!r}, "
        f"storage={outcome.optuna_storage!r})"
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def run(args: argparse.Namespace) -> int:
    from ffc_ray.ray.sweep.run import run_sweep
    from ffc_ray.ray.sweep.spec import load_sweep

    spec = load_sweep(args.sweep, root=Path.cwd(), overrides=_overrides(args.overrides))
    outcome = run_sweep(
        spec,
        storage=args.storage,
        name=args.name,
        address=args.address,
        resume=args.resume,
        num_cpus=args.num_cpus,
    )
    print_summary(outcome, outcome.spec or spec)
    if outcome.best is None and not outcome.pareto:
        print("no trial produced the objective: see the errors in the experiment folder")
        return 1
    return 0
