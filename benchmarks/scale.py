"""A million identities through the whole pipeline: import, Ray Data stream, 2 Ray Train workers,
the pool actor, and every head replicated and sharded.

1. ``ffc-ray data import synthetic`` writes N identities x 2 images at 32 px (timed, with the
   importer's peak RSS). The store is kept under ``--store`` and reused by later runs.
2. ``run_training`` on ``--workers`` workers, ``--steps`` steps per method, through the Ray Data
   stream: FC replicated and sharded, Partial FC 0.1 sharded, DCP 10 % and 1 % replicated and
   sharded, and a triplet run (no class state) whose step is the pipeline without a classifier:
   a method's "head part" is its step time minus that one. Per method: median step time (from
   step 3 on), the workers' peak RSS (rank 0's log), head memory per worker (class rows or pool,
   their gradient and momentum), the pool actor's round trip, and the bytes that the
   torch.distributed collectives carry per step per worker, counted at the calls (a loop
   callback wraps ``all_reduce`` / ``all_gather`` / ``broadcast`` in each worker; DDP's own
   bucketed all-reduce of the P-Net gradients bypasses them and is added as the P-Net's size).
   A method whose head would not fit in ``--mem-budget-gib`` per worker is reported with
   ``fits: false`` and its requirement, and not run.
3. From the counted bytes, a paper projection of each method's communication time per step at
   64 and 512 GPUs and N = 10M and 100M (network model in ``NETWORK``).

    python benchmarks/scale.py [--identities 1000000 --steps 30 --workers 2]

The last line is one JSON object (kept as results/scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = Path(__file__).resolve().parents[1]

from ffc_ray.engine.loop import Callback  # noqa: E402

#: The projection's network: 8 GPUs per node on NVLink (300 GB/s), 100 Gb/s (12.5 GB/s)
#: between nodes; a ring collective moves about 2 (W - 1) / W of its payload over the slowest
#: link, an all-gather (W - 1) / W of its output.
NETWORK = {"gpus_per_node": 8, "intra_node_gbps": 300.0, "inter_node_gbps": 12.5}

METHODS = {
    "triplet": {"head.type": "triplet"},
    "fc_replicated": {"head.type": "fc"},
    "fc_sharded": {"head.type": "fc", "head.parallel": "sharded"},
    "pfc_sharded": {"head.type": "partial_fc", "head.parallel": "sharded", "head.sample_rate": 0.1},
    "dcp10_replicated": {"head.type": "ffc", "pool.fraction": 0.1},
    "dcp10_sharded": {"head.type": "ffc", "pool.fraction": 0.1, "head.parallel": "sharded"},
    "dcp1_replicated": {"head.type": "ffc", "pool.fraction": 0.01},
    "dcp1_sharded": {"head.type": "ffc", "pool.fraction": 0.01, "head.parallel": "sharded"},
}


class CommCount(Callback):
    """In each worker: wrap the torch.distributed collectives and put the bytes the step's
    calls carried (payload per worker: the reduced tensor, the gathered output) into the
    step's metrics as ``comm_bytes`` (the worker's logging collectives come after it)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.installed = False

    def _install(self) -> None:
        import torch.distributed as dist

        def size(t: Any) -> int:
            if isinstance(t, (list, tuple)):
                return sum(size(x) for x in t)
            return t.numel() * t.element_size() if hasattr(t, "numel") else 0

        def wrap(name: str, payload: Any) -> None:
            real = getattr(dist, name)

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.bytes += payload(*args)
                return real(*args, **kwargs)

            setattr(dist, name, counted)

        wrap("all_reduce", lambda t, *a: size(t))
        wrap("broadcast", lambda t, *a: size(t))
        wrap("all_gather", lambda out, t, *a: size(out))
        wrap("all_gather_into_tensor", lambda out, t, *a: size(out))
        self.installed = True

    def before_step(self, trainer: Any, batch: Any) -> None:
        if not self.installed:
            self._install()
        self.bytes = 0

    def after_step(self, trainer: Any, metrics: dict[str, Any], loop: Any) -> None:
        metrics["comm_bytes"] = float(self.bytes)


def import_store(store: Path, n: int, size: int) -> dict[str, Any]:
    if (store / "meta.json").is_file():
        return {"reused": True}
    cmd = [
        sys.executable, "-m", "ffc_ray.cli", "data", "import", "synthetic", str(store),
        "--num-identities", str(n), "--images-per-identity", "2", "--image-size", str(size),
        "--shards", "8", "--no-progress",
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(peak, 2)}


def head_bytes(method: str, n: int, d: int, workers: int, k: int = 2) -> int:
    """Class state per worker: FC rows + gradient + momentum; Partial FC rows + momentum (the
    sampled rows' gradient is small); the DCP pool's K rows per slot (no gradient)."""
    share = (lambda rows: -(-rows // workers)) if "sharded" in method else (lambda rows: rows)
    if method.startswith("fc"):
        return 3 * share(n) * d * 4
    if method.startswith("pfc"):
        return 2 * share(n) * d * 4
    if method.startswith("dcp"):
        frac = 0.1 if method.startswith("dcp10") else 0.01
        return k * share(int(round(frac * n))) * d * 4
    return 0


def run_method(method: str, args: argparse.Namespace, store: Path, pnet_bytes: int) -> dict:
    from ffc_ray.config import Config
    from ffc_ray.ray.tb import read_progress
    from ffc_ray.ray.train import run_training

    need = head_bytes(method, args.identities, args.embedding_dim, args.workers)
    if need > args.mem_budget_gib * 2**30:
        return {"fits": False, "head_gib_per_worker": round(need / 2**30, 2)}
    over = {
        "data.source": str(store),
        "data.image_size": args.image_size,
        "data.instance_batch": 64,
        "data.identity_batch": 32,
        "model.backbone": "tiny",
        "model.embedding_dim": args.embedding_dim,
        "head.margin_type": "cosface",
        "head.margin": 0.35,
        "optim.schedule": "constant",
        "optim.lr": 0.05,
        "train.steps": args.steps,
        "train.log_interval": 1,
        "train.eval_interval": args.steps,
        "train.checkpoint_interval": args.steps,
        "train.output_dir": str(args.runs),
        "eval.pairs": [],
        "ray.num_workers": args.workers,
        "ray.cpus_per_worker": 0.5,
        **METHODS[method],
    }
    name = f"scale-{method}-{int(time.time())}"
    t0 = time.perf_counter()
    run = run_training(Config().with_overrides(over), name=name, loop_callbacks=[CommCount()])
    wall = time.perf_counter() - t0
    recs, _ = read_progress(run.run_dir)
    steps = [recs[k] for k in sorted(recs) if k >= 3]

    def med(key: str) -> float | None:
        vals = [r[key] for r in steps if r.get(key) is not None]
        return round(statistics.median(vals), 3) if vals else None

    return {
        "fits": True,
        "step_ms": round(1e3 * med("step_time"), 1),
        "peak_rss_gib": round(max(r.get("memory_mb", 0.0) for r in steps) / 1024, 2),
        "head_gib_per_worker": round(need / 2**30, 3),
        "actor_latency_ms": med("actor_latency_ms"),
        "comm_bytes_per_step": int((med("comm_bytes") or 0) + pnet_bytes),
        "wall_s": round(wall, 1),
        "error": None if run.result.error is None else str(run.result.error)[:200],
    }


def bookkeeping(n: int, workers: int, steps: int, fraction: float = 0.1) -> dict[str, Any]:
    """The label side of a DCP run at ``n`` identities, without images: the store's labels
    (2 images each), every rank's sampler plan for an epoch, and the pool index sized for
    ``n`` planning ``steps`` steps of the gathered labels. Run in a fresh process: its peak RSS
    is what this bookkeeping costs a worker (the actor holds the index)."""
    import numpy as np

    from ffc_ray.data.sampling import DualSampler
    from ffc_ray.pool.index import PoolIndex
    from ffc_ray.pool.plan import plan_step

    t0 = time.perf_counter()
    labels = np.repeat(np.arange(n, dtype=np.int64), 2)
    samplers = [
        DualSampler(labels, 64, 32, seed=0, world_size=workers, rank=r) for r in range(workers)
    ]
    plans = [s.epoch_plan(0) for s in samplers]
    t_plan = time.perf_counter() - t0
    index = PoolIndex(int(round(fraction * n)), "lru", num_labels=n)
    times = []
    for k in range(steps):
        lx = np.concatenate([labels[p.x[k]] for p in plans])
        ly = np.concatenate([labels[p.y[k]] for p in plans])
        t1 = time.perf_counter()
        plan_step(index, ly, lx, lx, ly)
        times.append(time.perf_counter() - t1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "n_identities": n,
        "plan_epoch_s": round(t_plan, 2),
        "plan_step_ms": round(1e3 * statistics.median(times), 3),
        "peak_gib": round(peak, 2),
    }


def projection(res: dict, n_meas: int, workers: int) -> dict:
    """Communication seconds per step at 64 / 512 GPUs and N = 10M / 100M: class-size terms
    (the replicated FC gradient) scale with N, batch-size terms with the GPU count."""
    out = {}
    bw = NETWORK["inter_node_gbps"] * 1e9
    for gpus in (64, 512):
        for n in (10_000_000, 100_000_000):
            row = {}
            for m, r in res.items():
                if not r.get("fits") or r.get("comm_bytes_per_step") is None:
                    continue
                b = r["comm_bytes_per_step"]
                if m == "fc_replicated":
                    b = b * n / n_meas  # dominated by the N x D gradient all-reduce
                elif "sharded" in m:
                    b = b * gpus / workers  # gathered batch grows with the workers
                row[m] = round(2 * (gpus - 1) / gpus * b / bw, 4)
            out[f"{gpus}gpu_{n // 1_000_000}M"] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=1_000_000)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--embedding-dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mem-budget-gib", type=float, default=4.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--store", default=str(REPO / "data_cache" / "scale_1m"))
    ap.add_argument("--runs", default=str(REPO / "runs"))
    ap.add_argument("--bookkeeping-identities", type=int, default=10_000_000)
    args = ap.parse_args()
    store = Path(args.store)
    store.parent.mkdir(parents=True, exist_ok=True)
    imp = import_store(store, args.identities, args.image_size)
    print(f"[scale] store {store}: {imp}", flush=True)

    import torch

    from ffc_ray.config import ModelConfig
    from ffc_ray.models import build_backbone

    net = build_backbone(ModelConfig(backbone="tiny", embedding_dim=args.embedding_dim), 32)
    pnet_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    del net, torch
    res = {}
    for m in [m for m in args.methods.split(",") if m]:
        res[m] = run_method(m, args, store, pnet_bytes)
        print(f"[scale] {m}: {res[m]}", flush=True)
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import scale; "
        f"print(json.dumps(scale.bookkeeping({args.bookkeeping_identities}, {args.workers}, 50)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    book = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    print(f"[scale] bookkeeping: {book or out.stderr[-500:]}", flush=True)

    base = res.get("triplet", {}).get("step_ms")

    def head_ms(m: str) -> float | None:
        r = res.get(m, {})
        return round(r["step_ms"] - base, 1) if r.get("step_ms") and base else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b and b > 0 else None

    for m in res:
        if res[m].get("step_ms") is not None:
            res[m]["head_ms"] = head_ms(m)
    out = {
        "benchmark": "scale",
        "n_identities": args.identities,
        "workers": args.workers,
        "embedding_dim": args.embedding_dim,
        "import": imp,
        "methods": res,
        "fc_over_dcp_sharded_time": ratio(
            res.get("fc_replicated", {}).get("step_ms"), res.get("dcp10_sharded", {}).get("step_ms")
        ),
        "pfc_sharded_over_dcp_sharded_time": ratio(
            head_ms("pfc_sharded"), head_ms("dcp10_sharded")
        ),
        "sharded_over_replicated_head_mem": ratio(
            res.get("dcp10_sharded", {}).get("head_gib_per_worker"),
            res.get("dcp10_replicated", {}).get("head_gib_per_worker"),
        ),
        # the label side at 10M (labels, sampler plans, pool index; no images: the synthetic
        # source of 10M identities would not fit this machine's memory)
        "dcp_10m_peak_gib_per_worker": book["peak_gib"] if book else None,
        "bookkeeping_10m": book,
        "targets": {
            "fc_over_dcp_sharded_time": 5.0,
            "pfc_sharded_over_dcp_sharded_time": 1.5,
            "sharded_over_replicated_head_mem": 1.0 / args.workers,
        },
        "network": NETWORK,
        "projection_comm_s": projection(res, args.identities, args.workers),
    }
    from common import run_info  # benchmarks/common.py

    out.update(run_info())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
