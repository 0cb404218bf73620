"""LFW FFC training through the Ray Data stream against the in-worker reader, back to back.

The same Ray Train run (configs/lfw_ffc.yaml, ``--steps`` steps, seed 0) with ``data.loader:
ray_data`` and ``data.loader: reader``, alternating (stream, reader, reader, stream, ... over
``--pairs`` pairs) so that the machine's drift hits both alike. Reported: the median step time
of every run, ``stream_over_reader`` (the ratio of the two loaders' mean step times; target
<= 1.10), the step's wait for the pool actor (median over every step of the stream runs;
target < 1 ms p50), and whether every run reached the same accuracy and AUC (the loaders feed
the same rows, so they must be bit-identical).

    python benchmarks/lfw_loaders.py [--steps 240] [--pairs 2]

Data and protocol as ``lfw_compare.py`` (it builds the store and the pairsDevTest set once).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", default=str(REPO.parent / "shared" / "data" / "lfw"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--cache", default=str(REPO / "data_cache"))
    ap.add_argument("--runs", default=str(REPO / "runs"))
    args = ap.parse_args()
    lfw = Path(args.lfw)
    if not (lfw / "images").is_dir():
        print(f"LFW not found at {lfw}", file=sys.stderr)
        return 2

    import ray
    from common import run_info  # benchmarks/common.py
    from lfw_compare import prepare_data, run_head

    from ffc_ray.ray.start import start_ray
    from ffc_ray.ray.tb import read_progress

    store, pairs = prepare_data(lfw, args.image_size, Path(args.cache))
    start_ray(num_cpus=2)
    order = ["ray_data", "reader", "reader", "ray_data"] * ((args.pairs + 1) // 2)
    order = order[: 2 * args.pairs]
    runs, waits = [], []
    for i, loader in enumerate(order):
        ns = argparse.Namespace(
            steps=args.steps,
            image_size=args.image_size,
            runs=args.runs,
            overrides=[f"data.loader={loader}"],
            tag=f"loaders-{i}-{loader}",
        )
        row = run_head("ffc", ns, store, pairs)
        recs, _ = read_progress(Path(args.runs) / f"lfw-ffc-{ns.tag}")
        if loader == "ray_data":
            waits += [r["actor_wait_ms"] for k, r in sorted(recs.items()) if k > 5]
        runs.append(
            {"loader": loader, **{k: row[k] for k in ("step_time_ms", "accuracy", "auc", "wall_s")}}
        )
        print(json.dumps(runs[-1]), flush=True)
    ray.shutdown()

    def mean_step(loader: str) -> float:
        return float(np.mean([r["step_time_ms"] for r in runs if r["loader"] == loader]))

    out = {
        "benchmark": "lfw_loaders",
        "steps": args.steps,
        "image_size": args.image_size,
        "runs": runs,
        "stream_step_ms": round(mean_step("ray_data"), 1),
        "reader_step_ms": round(mean_step("reader"), 1),
        "stream_over_reader": round(mean_step("ray_data") / mean_step("reader"), 3),
        "actor_wait_p50_ms": round(float(np.median(waits)), 3),
        "actor_wait_p99_ms": round(float(np.percentile(waits, 99)), 3),
        "same_accuracy": len({(r["accuracy"], r["auc"]) for r in runs}) == 1,
        "target_stream_over_reader": 1.10,
        "target_actor_wait_p50_ms": 1.0,
    }
    out["meets_target"] = out["stream_over_reader"] <= 1.10 and out["actor_wait_p50_ms"] < 1.0
    out.update(run_info())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
