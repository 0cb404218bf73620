"""LFW comparison: FFC (pool 10 %) vs FC vs Partial FC (0.1) through the same Ray Train pipeline.

Protocol (issue 4, item 8; ../shared/data/lfw/README.md): train on the LFW identities that do NOT
occur in pairsDevTest.txt (all of them, one-image identities included as extra classes; the
identity stream uses those with >= 2 images), evaluate on the 1,000 pairsDevTest pairs (10 folds,
threshold chosen on the other nine). Every head runs the same config (configs/lfw_<head>.yaml:
backbone, input size, batch, optimiser, schedule, steps), so all see the same number of
samples; only FFC's learning rate is 1/4 of the others' (its loss sums four softmaxes: the same
step per sample, see configs/lfw_ffc.yaml). ``benchmarks/lfw_seeds.py`` repeats the comparison
over seeds. Images are cropped with the LFW face box and stored at ``--image-size`` px (64 by
default, to fit 30 minutes per head on a 2-core CPU).

    python benchmarks/lfw_compare.py                      # full comparison (config steps)
    python benchmarks/lfw_compare.py --steps 40 --tag short   # a short check of the pipeline
    python benchmarks/lfw_compare.py --heads ffc --tag v2     # rerun one head, keep the others

Writes results/lfw_compare.json (or --out) and prints a Markdown table; the last line is JSON.
Reported per head: verification accuracy (+- std over folds), AUC, TAR@FAR=1e-3, head memory
(``Head.memory_bytes()``: classifier rows or pool buffers; optimiser state excluded), mean
step time, samples seen, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = Path(__file__).resolve().parents[1]
HEADS = {"ffc": "lfw_ffc.yaml", "fc": "lfw_fc.yaml", "partial_fc": "lfw_pfc.yaml"}


def prepare_data(lfw: Path, size: int, cache: Path) -> tuple[Path, Path]:
    """The training store (identities of pairsDevTest excluded) and the pairsDevTest set."""
    from ffc_ray.data.importers import ImportOptions, exclude_from_pairs, import_folder
    from ffc_ray.data.pairs import LFW_CROP_BOX, load_lfw_pairs, save_verification_set

    store = cache / f"lfw_train_{size}"
    pairs = cache / f"lfw_devtest_{size}.npz"
    test_list = lfw / "pairsDevTest.txt"
    if not (store / "meta.json").is_file():
        opts = ImportOptions(
            image_size=size,
            crop=LFW_CROP_BOX,
            exclude=exclude_from_pairs([test_list]),
            num_shards=2,
            progress=False,
            workers=2,
        )
        s = import_folder(lfw / "images", store, opts)
        print(
            f"imported {s.to_dict()['num_images']} images of "
            f"{s.to_dict()['num_identities']} identities -> {store}"
        )
    if not pairs.is_file():
        vset = load_lfw_pairs(test_list, lfw / "images", size, LFW_CROP_BOX, "lfw_devtest")
        save_verification_set(vset, pairs)
    return store, pairs


def run_head(head: str, args: argparse.Namespace, store: Path, pairs: Path) -> dict:
    from ffc_ray.config import load_config
    from ffc_ray.ray.tb import read_progress
    from ffc_ray.ray.train import run_training

    over = {
        "data.source": str(store),
        "data.image_size": args.image_size,
        "eval.pairs": [str(pairs)],
        "train.output_dir": str(args.runs),
    }
    if args.steps:
        over["train.steps"] = args.steps
        over["train.eval_interval"] = args.steps
        over["train.checkpoint_interval"] = args.steps
        over["optim.warmup_steps"] = min(50, args.steps // 10)
    cfg = load_config(REPO / "configs" / HEADS[head], over).with_overrides(args.overrides)
    name = f"lfw-{head}-{args.tag}"
    t0 = time.perf_counter()
    run = run_training(cfg, name=name)
    wall = time.perf_counter() - t0
    recs, events = read_progress(run.run_dir)
    evals = [e for e in events if e["event"] == "eval"]
    last = evals[-1] if evals else {}
    set_name = next((k.split("/")[0] for k in last if k.endswith("/accuracy")), "lfw_devtest")
    st = [recs[k]["step_time"] for k in sorted(recs)][5:] or [float("nan")]
    steps = cfg.train.steps
    return {
        "head": head,
        "steps": steps,
        "samples_seen": steps * 2 * cfg.data.view_batch * max(1, cfg.ray.num_workers),
        "image_size": cfg.data.image_size,
        "backbone": cfg.model.backbone,
        "num_classes": (run.summary or {}).get("num_classes"),
        "accuracy": last.get(f"{set_name}/accuracy"),
        "accuracy_std": last.get(f"{set_name}/accuracy_std"),
        "auc": last.get(f"{set_name}/auc"),
        "tar@far=0.001": last.get(f"{set_name}/tar@far=0.001"),
        "head_memory_mb": (run.summary or {}).get("head_memory_bytes", 0) / 2**20,
        "step_time_ms": 1e3 * float(np.median(st)),
        "wall_s": round(wall, 1),
        "run_dir": _shown_path(run.run_dir),
    }


def _shown_path(path) -> str:
    """``path`` relative to the working folder (or the repository) so that results files
    committed to the repository never carry a path of the machine that produced them."""
    path = Path(path).resolve()
    for base in (Path.cwd().resolve(), REPO.resolve()):
        try:
            return str(path.relative_to(base))
        except ValueError:
            pass
    return os.path.relpath(path)


def keep_other_heads(out: Path, rows: list[dict]) -> list[dict]:
    """Rows of ``out`` (an earlier run) for heads not run now, then this run's rows: rerunning
    one head (``--heads ffc``) keeps the others' figures in the file and the table."""
    if not out.is_file():
        return rows
    try:
        old = json.loads(out.read_text()).get("rows", [])
    except (OSError, ValueError):
        return rows
    now = {r["head"] for r in rows}
    kept = [dict(r, kept_from_earlier_run=True) for r in old if r.get("head") not in now]
    order = list(HEADS)
    return sorted(kept + rows, key=lambda r: order.index(r["head"]) if r["head"] in order else 99)


def table(rows: list[dict]) -> str:
    head = (
        "| head | accuracy | AUC | TAR@FAR=1e-3 | head memory (MiB) | step (ms) | samples | "
        "wall (min) |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]

    def f(v: float | None, d: int = 4) -> str:
        return "n/a" if v is None else f"{v:.{d}f}"

    for r in rows:
        lines.append(
            f"| {r['head']} | {f(r['accuracy'])} +- {f(r['accuracy_std'], 3)} | "
            f"{f(r['auc'])} | {f(r['tar@far=0.001'])} | {r['head_memory_mb']:.2f} | "
            f"{r['step_time_ms']:.0f} | {r['samples_seen']} | {r['wall_s'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", default=str(REPO.parent / "shared" / "data" / "lfw"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=0, help="0: the configs' train.steps")
    ap.add_argument("--heads", default="ffc,fc,partial_fc")
    ap.add_argument("--tag", default="full")
    ap.add_argument("--cache", default=str(REPO / "data_cache"))
    ap.add_argument("--runs", default=str(REPO / "runs"))
    ap.add_argument("--out", default=str(REPO / "results" / "lfw_compare.json"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    lfw = Path(args.lfw)
    if not (lfw / "images").is_dir():
        print(f"LFW not found at {lfw}", file=sys.stderr)
        sys.exit(2)

    import ray

    store, pairs = prepare_data(lfw, args.image_size, Path(args.cache))
    for attempt in range(3):  # a raylet start can exceed Ray's 30 s on a busy machine
        try:
            from ffc_ray.ray.start import start_ray

            start_ray(num_cpus=2)
            break
        except Exception:  # noqa: BLE001
            if attempt == 2:
                raise
            time.sleep(10)
    rows = [run_head(h, args, store, pairs) for h in args.heads.split(",")]
    ray.shutdown()
    rows = keep_other_heads(Path(args.out), rows)
    by = {r["head"]: r for r in rows}
    out = {
        "benchmark": "lfw_compare",
        "tag": args.tag,
        "protocol": "train: LFW identities not "
        "in pairsDevTest; test: the 1,000 pairsDevTest pairs, 10 folds",
        "rows": rows,
    }
    if "ffc" in by and "fc" in by and by["ffc"]["accuracy"] is not None:
        out["ffc_minus_fc_points"] = round(100 * (by["ffc"]["accuracy"] - by["fc"]["accuracy"]), 2)
    from common import run_info  # benchmarks/common.py

    out.update(run_info())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(table(rows))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
