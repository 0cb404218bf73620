"""Ray Train overhead: the same training steps in one plain process and in Ray Train (1 worker).

Both sides build the same Trainer on the same data (``WorkerData``: sampler plan, flips) for
the same config; the plain side plans pool slots with a local ``PoolIndex``, the Ray side runs
the full worker loop (pool-index actor round trip per step, loss all-reduce no-op, progress and
TensorBoard logging, the final report + checkpoint). Per-step wall time is measured in the steady
state (steps ``--warmup`` .. end, from the progress records' timestamps on the Ray side) with the
same torch thread count on both sides (Ray gives a 1-CPU worker one thread). The plain side runs
before and after the Ray side and is averaged, because the machine may be shared.

Last line: JSON with ``overhead`` = ray_step_s / plain_step_s - 1 (target <= 0.10, wall clock),
``cpu_overhead`` (the same ratio in CPU time of the training process: robust when other jobs
share the cores; it does not see waiting), the load average, and the end-to-end wall times
including Ray start-up, for information.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = Path(__file__).resolve().parents[1]


def plain_steps(cfg, steps: int, warmup: int, threads: int) -> dict:
    import torch

    from ffc_ray.data.source import WorkerData
    from ffc_ray.engine.trainer import Trainer

    torch.set_num_threads(threads)
    data = WorkerData(cfg, 0, 1)
    trainer = Trainer(cfg, data.num_classes, "cpu")
    times, cpu = [], []
    t_prev, c_prev = time.perf_counter(), time.process_time()
    for step in range(steps):
        trainer.train_step(*data.batch(step))
        now, c_now = time.perf_counter(), time.process_time()
        times.append(now - t_prev)
        cpu.append(c_now - c_prev)
        t_prev, c_prev = now, c_now
    return {
        "step_s": float(np.mean(times[warmup:])),
        "cpu_s": float(np.mean(cpu[warmup:])),
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "synthetic_ffc.yaml"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from ffc_ray.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, args.overrides).with_overrides(
            {
                "train.steps": args.steps,
                "train.eval_interval": 10 * args.steps,
                "train.checkpoint_interval": 10 * args.steps,
                "train.log_interval": 10,
                "train.output_dir": tmp,
                "ray.num_workers": 1,
                "ray.cpus_per_worker": args.cpus_per_worker,
                "eval.pairs": ["synthetic"],
                "data.num_pairs": 100,
            }
        )
        threads = max(1, int(args.cpus_per_worker))
        plain_a = plain_steps(cfg, args.steps, args.warmup, threads)

        import ray

        from ffc_ray.ray.tb import read_progress
        from ffc_ray.ray.train import run_training

        t0 = time.perf_counter()
        from ffc_ray.ray.start import start_ray

        start_ray(num_cpus=2)
        t_init = time.perf_counter() - t0
        run = run_training(cfg, name="bench-overhead")
        t_ray = time.perf_counter() - t0
        ray.shutdown()
        recs, _ = read_progress(Path(tmp) / "bench-overhead")
        ts = np.array([recs[k]["time"] for k in sorted(recs)])
        cs = np.array([recs[k]["cpu_s"] for k in sorted(recs)])
        ray_step = float(np.diff(ts[args.warmup - 1 :]).mean())
        ray_cpu = float(np.diff(cs[args.warmup - 1 :]).mean())
        actor_ms = float(
            np.median([recs[k]["actor_latency_ms"] for k in sorted(recs) if k > args.warmup])
        )
        plain_b = plain_steps(cfg, args.steps, args.warmup, threads)
    plain = (plain_a["step_s"] + plain_b["step_s"]) / 2
    plain_cpu = (plain_a["cpu_s"] + plain_b["cpu_s"]) / 2
    out = {
        "benchmark": "ray_overhead",
        "config": Path(args.config).name,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch_threads": threads,
        "ray_worker_threads": (run.summary or {}).get("torch_threads"),
        "plain_step_ms": round(plain * 1e3, 2),
        "plain_step_ms_runs": [
            round(plain_a["step_s"] * 1e3, 2),
            round(plain_b["step_s"] * 1e3, 2),
        ],
        "ray_step_ms": round(ray_step * 1e3, 2),
        "actor_latency_p50_ms": round(actor_ms, 3),
        "overhead": round(ray_step / plain - 1, 4),
        "plain_cpu_ms_per_step": round(plain_cpu * 1e3, 2),
        "ray_worker_cpu_ms_per_step": round(ray_cpu * 1e3, 2),
        "cpu_overhead": round(ray_cpu / plain_cpu - 1, 4),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "target_overhead": 0.10,
        "ray_init_s": round(t_init, 2),
        "ray_end_to_end_s": round(t_ray, 2),
        "plain_end_to_end_s": round(plain * args.steps, 2),
    }
    out["meets_target"] = out["overhead"] <= 0.10
    print(
        f"plain {out['plain_step_ms']} ms/step, Ray Train {out['ray_step_ms']} ms/step: "
        f"overhead {100 * out['overhead']:.1f} %"
    )
    from common import run_info  # benchmarks/common.py

    out.update(run_info())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
