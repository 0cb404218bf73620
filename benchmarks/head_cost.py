"""Head cost vs number of identities: FC vs Partial FC (0.1) vs DCP (the paper's figure 1).

For N in {10k, 100k, 1M, 10M, 100M}, D = 512, batch B = 256, each head does one training step
(forward, backward, optimiser update) on random unit embeddings, using the project's own heads:

- ``fc``: full FC + ArcFace, SGD (momentum) over the N x D weight;
- ``pfc``: Partial FC, sample rate 0.1 (all positives + random negatives), sparse row update;
- ``dcp10``: the FFC head with a pool of 10 % of N (K = 2 rows), pool index assign + pool write +
  margin softmax over the pool + top-K negatives, backward to the embeddings (the pool has no
  optimiser state);
- ``dcpC``: the FFC head with a fixed pool of ``--fixed-c`` identities (default 100k).

Each (method, N) runs in a fresh subprocess so its peak RSS is its own; a configuration whose
computed requirement exceeds the memory budget is not run and is reported with ``fits: false`` and
the requirement. One DCP step here is one pass (B probes against the pool); a full FFC step does
two (trial + commit). Prints a table and, as the last line, one JSON object.

    python benchmarks/head_cost.py                 # all N (about 5-10 min on 2 cores)
    python benchmarks/head_cost.py --ns 10000 100000 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

D = 512
B = 256
K = 2
METHODS = ("fc", "pfc", "dcp10", "dcpC")


def requirement_bytes(method: str, n: int, fixed_c: int) -> int:
    """Computed memory of the head's state and step tensors (fp32), the 'fits' test."""
    f = 4
    if method == "fc":  # weight + grad + momentum, logits + their grad (+ margin temporaries)
        return 3 * n * D * f + 4 * B * n * f
    if method == "pfc":  # weight + momentum buffers; sampled rows + grad; sampled logits
        s = max(1, int(0.1 * n))
        return 2 * n * D * f + 2 * s * D * f + 4 * B * s * f
    c = max(1, int(round(0.1 * n))) if method == "dcp10" else min(fixed_c, n)
    # pool K x C x D; K logit sets of B x C (+ grad, temporaries); the index (slot arrays, map)
    return K * c * D * f + 4 * K * B * c * f + 64 * c + 4 * min(n, 4 * c + 2**20)


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(method: str, n: int, fixed_c: int, steps: int, seed: int = 0) -> dict:
    """One configuration, in this process: mean step seconds and peak RSS above the baseline."""
    import numpy as np
    import torch

    from ffc_ray.config import Config
    from ffc_ray.heads import build_head

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    over = {"model.embedding_dim": D, "head.margin_type": "arcface", "head.scale": 64.0}
    if method == "fc":
        over["head.type"] = "fc"
    elif method == "pfc":
        over.update({"head.type": "partial_fc", "head.sample_rate": 0.1})
    else:
        over["head.type"] = "ffc"
        if method == "dcp10":
            over["pool.fraction"] = 0.1
        else:
            over["pool.capacity"] = min(fixed_c, n)
    cfg = Config().with_overrides(over)
    base = _rss_bytes()
    head = build_head(cfg, n)
    opt = None
    params = [p for p in head.parameters() if p.requires_grad]
    if params:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    index = None
    if method.startswith("dcp"):
        from ffc_ray.pool.index import PoolIndex

        index = PoolIndex(head.capacity, "lru")

    def step() -> None:
        labels = rng.integers(0, n, size=B)
        emb = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_(True)
        if index is None:
            out = head(emb, torch.from_numpy(labels))
            out.loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            head.extra_step(0.1)
        else:
            # gallery = the same identities (as the identity-pair half of the dual loader)
            gallery = torch.nn.functional.normalize(torch.randn(B, D), dim=1)
            slots, new = index.assign(labels, return_new=True)
            probe_slots = index.lookup(labels)
            head.write(gallery, slots, new)
            out = head.loss(emb, probe_slots, head.hit_slots(slots, new))
            out.loss.backward()

    step()  # warm-up (allocations, first-touch of the weight)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    return {"step_s": dt, "peak_bytes": max(0, _rss_bytes() - base)}


def measure(method: str, n: int, fixed_c: int, steps: int, budget: int) -> dict:
    need = requirement_bytes(method, n, fixed_c)
    row = {"method": method, "n": n, "required_gb": need / 2**30}
    if need > budget:
        row.update(fits=False, step_s=None, peak_gb=None)
        return row
    cmd = [
        sys.executable,
        __file__,
        "--one",
        method,
        str(n),
        "--fixed-c",
        str(fixed_c),
        "--steps",
        str(steps),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        row.update(fits=False, step_s=None, peak_gb=None, error=proc.stderr.strip()[-300:])
        return row
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(fits=True, step_s=res["step_s"], peak_gb=res["peak_bytes"] / 2**30)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--ns", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000, 100_000_000]
    )
    ap.add_argument("--fixed-c", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--budget-fraction",
        type=float,
        default=0.7,
        help="share of MemAvailable a configuration may need",
    )
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        method, n = args.one[0], int(args.one[1])
        print(json.dumps(run_one(method, n, args.fixed_c, args.steps)))
        return 0

    budget = int(available_bytes() * args.budget_fraction)
    rows = []
    print(f"head cost, D={D}, B={B}, budget {budget / 2**30:.1f} GiB, {args.steps} timed steps")
    print(f"{'method':<7}{'N':>12}{'fits':>6}{'step ms':>10}{'peak GiB':>10}{'need GiB':>10}")
    for n in args.ns:
        for method in METHODS:
            r = measure(method, n, args.fixed_c, args.steps, budget)
            rows.append(r)
            ms = f"{r['step_s'] * 1e3:.1f}" if r["step_s"] is not None else "-"
            pk = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-"
            print(
                f"{method:<7}{n:>12,}{str(r['fits']):>6}{ms:>10}{pk:>10}{r['required_gb']:>10.2f}",
                flush=True,
            )

    def get(method: str, n: int) -> dict | None:
        return next((r for r in rows if r["method"] == method and r["n"] == n), None)

    def ratio(a: str, b: str, key: str, n: int = 1_000_000) -> float | None:
        ra, rb = get(a, n), get(b, n)
        if not ra or not rb or not ra["fits"] or not rb["fits"] or not rb[key]:
            return None
        return ra[key] / rb[key]

    big = get("dcpC", 100_000_000) or {}
    summary = {
        "benchmark": "head_cost",
        "d": D,
        "batch": B,
        "fixed_c": args.fixed_c,
        "rows": rows,
        "fc_over_dcp_time_1m": ratio("fc", "dcp10", "step_s"),
        "pfc_over_dcp_time_1m": ratio("pfc", "dcp10", "step_s"),
        "fc_over_dcp_mem_1m": ratio("fc", "dcp10", "peak_gb"),
        "dcp_runs_10m": bool((get("dcp10", 10_000_000) or {}).get("fits")),
        "dcp_runs_100m": bool(big.get("fits")),
    }
    from common import run_info  # benchmarks/common.py

    summary.update(run_info())
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
