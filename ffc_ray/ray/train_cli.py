"""``ffc-ray train CONFIG [--set key=value ...] [--address auto|ray://...] [--name RUN]``.

Starts a local Ray (or joins a cluster with ``--address``) and trains the config on Ray Train.
The run folder is ``<ray.storage_path or train.output_dir>/<name>``; the name defaults to
``train.name`` or the config file's stem, so running the same command again resumes the run from
its latest checkpoint (Ray Train V2 restores by run name). ``ray.storage_path`` may be a bucket
URI (``--set ray.storage_path=s3://bucket/runs``, ``gs://...``): Ray writes the checkpoints
there, the run's own files are staged in ``<train.output_dir>/<name>`` and uploaded at every
checkpoint and at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config YAML (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. head.margin=0.4",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: 'auto' or 'ray://host:10001' (default: a "
        "local Ray, or ray.address from the config)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="run name (default: train.name or the config file stem); the same "
        "name resumes from the latest checkpoint",
    )


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def run(args: argparse.Namespace) -> int:
    from ffc_ray.config import load_config
    from ffc_ray.ray.train import run_training

    cfg = load_config(args.config, args.overrides)
    try:
        out = run_training(cfg, name=args.name, address=args.address, config_path=args.config)
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError and friends
        if type(exc).__name__ in ("ConfigError", "FileNotFoundError"):
            raise
        print(f"ffc-ray train: training failed: {exc}", file=sys.stderr)
        return 1
    result = out.result
    metrics = dict(getattr(result, "metrics", None) or {})
    if out.run_uri:
        from ffc_ray.storage import join

        print(f"run {out.name}: {out.run_uri}  (local staging {out.run_dir})")
        tb_uri = join(out.run_uri, "tb")
        print(f"tensorboard --logdir {out.run_dir / 'tb'}   (uploaded to {tb_uri})")
    else:
        print(f"run {out.name}: {out.run_dir}")
        print(f"tensorboard --logdir {out.run_dir / 'tb'}")
    if getattr(result, "checkpoint", None) is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    best = getattr(result, "best_checkpoints", None) or []
    scored = [
        (m.get("score"), c)
        for c, m in best
        if isinstance(m.get("score"), (int, float)) and m["score"] >= 0
    ]
    if scored:
        s, c = max(scored, key=lambda t: t[0])
        print(f"best checkpoint (score {s:.4f}): {c.path}")
    if metrics:
        print(
            "final: "
            + ", ".join(
                f"{k}={_fmt(v)}"
                for k, v in metrics.items()
                if k in ("step", "loss", "score") or k.endswith(("/accuracy", "/auc"))
            )
        )
    print(
        json.dumps(
            {
                "run": out.name,
                "run_dir": str(out.run_dir),
                **({"run_uri": out.run_uri} if out.run_uri else {}),
                **{
                    k: v
                    for k, v in metrics.items()
                    if isinstance(v, (int, float, str))
                    and not (isinstance(v, float) and math.isnan(v))
                },
            }
        )
    )
    return 0
