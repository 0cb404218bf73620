"""`ffc-ray demo` (``make demo``): the embedded-default demo.

Default: a Ray Tune + Optuna sweep of FFC trials on synthetic identities written into an LMDB
store (:mod:`ffc_ray.ray.sweep.demo`): prints the results table, the best config and the
TensorBoard command; about 5 minutes on 2 CPU cores.

``--single-process``: train FFC on the generated data set in one process, print verification
accuracy on held-out identities before and after (about 2-3 minutes on 2 CPU cores). Its defaults
(:data:`DEMO_OVERRIDES`) are a small budget that reaches >= 90 % pair accuracy with the tiny
backbone at 32 px; any field can be changed with ``--set key=value``, e.g.
``ffc-ray demo --single-process --set head.type=fc`` for the FC baseline on the same budget.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ffc_ray.config import Config, load_config

log = logging.getLogger(__name__)

#: The single-process demo budget (also used by the end-to-end test): tiny CNN at 32 px, 800
#: identities x 8 images, C = 200 pool slots (25 %), 1000 steps. Measured on 2 shared CPU
#: cores, one torch thread: ~0.12 s/step, held-out pair accuracy FFC 0.607 -> 0.935 and FC
#: 0.607 -> 0.930. Tuned for the short budget: s = 32 (s = 16 learned slower), G-Net momentum
#: 0.5 (the official 0.99 lags too far behind in 1000 steps; 0.9 was ~2 points worse at 150
#: steps), 800 rather than 400 identities (FC over-fits 400 and plateaus near 0.90).
DEMO_OVERRIDES: dict[str, Any] = {
    "data.num_identities": 800,
    "data.images_per_identity": 8,
    "data.holdout_identities": 100,
    "data.num_pairs": 1000,
    "data.image_size": 32,
    "data.instance_batch": 32,
    "data.identity_batch": 32,
    "model.backbone": "tiny",
    "model.embedding_dim": 128,
    "head.type": "ffc",
    "head.margin_type": "cosface",
    "head.margin": 0.3,
    "head.scale": 32.0,
    "pool.fraction": 0.25,
    "pool.momentum": 0.5,
    "optim.lr": 0.1,
    "optim.schedule": "cosine",
    "optim.warmup_steps": 20,
    "optim.weight_decay": 5e-4,
    "train.steps": 1000,
    "train.device": "cpu",
    "train.log_interval": 100,
    "train.eval_interval": 250,
}


def demo_config(overrides: list[str] | None = None, path: str | None = None) -> Config:
    """The demo config: a YAML file (or the defaults) + :data:`DEMO_OVERRIDES` + ``overrides``."""
    base = load_config(path) if path else Config()
    return base.with_overrides(DEMO_OVERRIDES).with_overrides(list(overrides or []))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--single-process",
        action="store_true",
        help="train one FFC model in this process instead of the Ray sweep",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per run (default: 1000 single-process, the sweep "
        "file's train.steps otherwise)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override (repeatable)",
    )
    sweep = parser.add_argument_group("sweep (default)")
    sweep.add_argument("--sweep", default=None, help="sweep YAML (default: sweeps/demo.yaml)")
    sweep.add_argument(
        "--workdir",
        default="runs/demo",
        help="data store, pairs and experiments go here (default: runs/demo)",
    )
    sweep.add_argument(
        "--name", default=None, help="experiment name (default: <sweep name>-<date>-<time>)"
    )
    sweep.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs of the local Ray (default: the machine's cores)",
    )
    sweep.add_argument(
        "--show-ray",
        action="store_true",
        help="also show Tune's status tables and the trial workers' output",
    )
    single = parser.add_argument_group("--single-process")
    single.add_argument("--config", default=None, help="YAML config to start from")
    single.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine a second thread made "
        "the tiny model's steps ~7x slower; 0 = torch's choice)",
    )


def _fmt(m: dict[str, float]) -> str:
    return (
        f"accuracy {100 * m.get('accuracy', float('nan')):.2f} % "
        f"(+- {100 * m.get('accuracy_std', float('nan')):.2f}), "
        f"auc {m.get('auc', float('nan')):.4f}"
    )


def run(args: argparse.Namespace) -> int:
    if getattr(args, "single_process", False):
        return run_single(args)
    return run_sweep_demo(args)


def run_sweep_demo(args: argparse.Namespace) -> int:
    import time

    import yaml

    from ffc_ray.ray.sweep.cli import print_summary
    from ffc_ray.ray.sweep.demo import run_demo

    t0 = time.time()
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        if "=" not in item:
            from ffc_ray.config import ConfigError

            raise ConfigError(f"--set {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    print(
        "ffc-ray demo: synthetic identities -> LMDB store -> Tune + Optuna sweep of FFC trials",
        flush=True,
    )
    outcome, t_data = run_demo(
        workdir=args.workdir,
        sweep=args.sweep,
        num_cpus=args.num_cpus,
        name=args.name,
        overrides=overrides or None,
        quiet=not args.show_ray,
    )
    print_summary(outcome, outcome.spec)
    print(
        f"demo finished in {time.time() - t0:.0f} s (data {t_data:.0f} s, sweep "
        f"{outcome.wall_s:.0f} s)"
    )
    return 0 if outcome.best is not None else 1


def run_single(args: argparse.Namespace) -> int:
    import torch

    from ffc_ray.engine.loop import run_single_process

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = demo_config(overrides, args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    h = cfg.head
    print(
        f"ffc-ray demo: head {h.type} ({h.margin_type} m={h.margin} s={h.scale}), backbone "
        f"{cfg.model.backbone} {cfg.data.image_size}px, {cfg.data.num_identities} identities, "
        f"{cfg.train.steps} steps"
    )

    def log_fn(step: int, m: dict[str, float]) -> None:
        extra = f" pos {m['pos_fraction']:.2f}" if "pos_fraction" in m else ""
        print(
            f"  step {step:5d}  loss {m['loss']:.4f}  lr {m['lr']:.4g}{extra}  "
            f"{m['images_per_s']:.0f} img/s",
            flush=True,
        )

    res = run_single_process(cfg, log_fn=log_fn)
    print(f"held-out verification ({int(res['before'].get('num_pairs', 0))} pairs)")
    print(f"  before training: {_fmt(res['before'])}")
    print(f"  after training:  {_fmt(res['after'])}")
    print(
        f"  {res['train']['mean_step_time'] * 1e3:.1f} ms/step, "
        f"{res['train']['images_per_s']:.0f} img/s, train {res['train_time_s']:.1f} s, "
        f"total {res['total_time_s']:.1f} s"
    )
    return 0
