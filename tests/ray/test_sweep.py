"""Sweeps on the shared local Ray: ASHA + hang guard + outputs, kill and resume, multi-objective.

Every sweep runs as ``ffc-ray sweep ... --address <the session's Ray>`` in a subprocess: that is
the CLI users run, it lets the resume test kill a real driver, and the job's workers get
``RAY_ADDRESS`` (Train's placement-group cleaner needs it when several Ray instances share the
machine). Trials are tiny (64 synthetic identities, 32 px, 12 steps, one Train worker), so each
costs mostly Ray start-up: ~10-15 s on 2 cores.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BASE = {
    "data": {
        "source": "synthetic",
        "num_identities": 64,
        "images_per_identity": 4,
        "holdout_identities": 24,
        "num_pairs": 120,
        "image_size": 32,
        "instance_batch": 8,
        "identity_batch": 4,
    },
    "model": {"backbone": "tiny", "embedding_dim": 32},
    "head": {"type": "ffc", "margin_type": "cosface", "margin": 0.3, "scale": 16.0},
    "pool": {"fraction": 0.5},
    "optim": {"lr": 0.05, "schedule": "constant", "weight_decay": 0.0005},
    "train": {
        "steps": 12,
        "log_interval": 4,
        "eval_interval": 4,
        "checkpoint_interval": 4,
        "keep_checkpoints": 2,
    },
    "eval": {"folds": 5},
    "ray": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 0},
}


def write_sweep(
    tmp_path: Path, name: str, search: dict, tune: dict, cpus_per_worker: float = 0.5
) -> Path:
    base = dict(BASE)
    base["train"] = {**BASE["train"], "output_dir": str(tmp_path / "runs")}
    base["ray"] = {**BASE["ray"], "cpus_per_worker": cpus_per_worker}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": name, "base": str(tmp_path / "base.yaml"), "search": search, "tune": tune}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def sweep_cmd(sweep: Path, storage: Path, address: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ffc_ray.cli",
        "sweep",
        str(sweep),
        "--address",
        address,
        "--storage",
        str(storage),
        *extra,
    ]


def run_cli(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as fh:
        proc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=str(log.parent)
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-60:])
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


def read_rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def num(v: str) -> float:
    return float(v) if v not in ("", None) else float("nan")


def hparams_session(run_dir: Path) -> dict:
    """hparams of a TensorBoard run's session-start summary (EventAccumulator, as TB reads it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_end_info" in content
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    return {
        k: (v.string_value if v.HasField("string_value") else v.number_value)
        for k, v in start.hparams.items()
    }


def wait_placement_groups_removed(ray, timeout: float = 60.0) -> list:
    """The CREATED placement groups still held after ``timeout`` (the leak that hangs sweeps)."""
    deadline = time.time() + timeout
    while True:
        live = [
            pg
            for pg in ray.util.placement_group_table().values()
            if pg["state"] not in ("REMOVED",)
        ]
        if not live or time.time() > deadline:
            return live
        time.sleep(1.0)


def progress_starts(run_dir: Path) -> int:
    lines = (run_dir / "progress.jsonl").read_text().splitlines()
    return sum(1 for ln in lines if ln.strip() and json.loads(ln).get("event") == "start")


def load_study(exp: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{exp / 'optuna.db'}")


# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_asha_sweep_stops_early_keeps_starting_trials_and_writes_outputs(ray_session, tmp_path):
    """3 trials; ASHA on head memory (deterministic: it grows with the pool), so which trial
    is stopped does not hinge on 12 CPU steps of learning: fraction 0.3 completes, 0.9 is
    stopped at the first rung, 0.5 at the second. Trials 2 and 3 must still start after a
    stop (the hang guard): a trial takes 0.25 + 1.0 of the session's 2 CPUs, so a placement
    group leaked by a stopped trial would leave the next one waiting forever."""
    ray = ray_session
    address = ray.get_runtime_context().gcs_address
    sweep = write_sweep(
        tmp_path,
        "asha",
        {"pool.fraction": {"uniform": [0.2, 0.9]}},
        {
            "metric": "head_memory_mb",
            "mode": "min",
            "num_samples": 3,
            "max_concurrent": 1,
            "asha": {"max_t": 3, "grace_period": 1, "reduction_factor": 2},
            "points_to_evaluate": [
                {"pool.fraction": 0.3},
                {"pool.fraction": 0.9},
                {"pool.fraction": 0.5},
            ],
        },
        cpus_per_worker=1.0,
    )
    storage = tmp_path / "sweeps"
    t0 = time.time()
    run_cli(sweep_cmd(sweep, storage, address), tmp_path / "sweep.log", timeout=480)
    print(f"3-trial ASHA sweep: {time.time() - t0:.1f} s")
    exp = storage / "asha"

    rows = {float(r["pool.fraction"]): r for r in read_rows(exp / "results.csv")}
    assert sorted(rows) == [0.3, 0.5, 0.9]
    assert rows[0.3]["status"] == "completed" and int(rows[0.3]["step"]) == 12
    assert rows[0.9]["status"] == "stopped early (ASHA)" and int(rows[0.9]["evals"]) == 1
    assert rows[0.5]["status"] == "stopped early (ASHA)" and int(rows[0.5]["evals"]) < 3
    for r in rows.values():  # every table metric filled for every trial
        for key in ("accuracy", "auc", "head_memory_mb", "images_per_s"):
            assert math.isfinite(num(r[key])), (key, r)
        # the set's 60 negative pairs are too few to measure FAR 0.001: no number made up
        assert not math.isfinite(num(r["tar@far=0.001"] or "nan"))
        assert 0.0 <= num(r["accuracy"]) <= 1.0
    mem = [num(rows[f]["head_memory_mb"]) for f in (0.3, 0.5, 0.9)]
    assert mem[0] < mem[1] < mem[2]
    md = (exp / "results.md").read_text()
    assert md.count("\n| ") == 4 and "stopped early (ASHA)" in md  # header + 3 rows

    # no leaked placement group (the hang): all removed once the sweep is over
    assert wait_placement_groups_removed(ray) == []

    # TensorBoard: every trial a run with its hparams session (parameters + status)
    for frac, r in rows.items():
        hp = hparams_session(exp / "tb" / r["trial"])
        assert hp["pool.fraction"] == pytest.approx(frac) and hp["status"] == r["status"]
    assert (exp / "tb").glob("events.out.tfevents.*")

    # Optuna storage holds the three trials, the enqueued points in order
    study = load_study(exp, "asha")
    assert [t.params["pool.fraction"] for t in study.trials] == [0.3, 0.9, 0.5]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.best_trial.params["pool.fraction"] == 0.3

    # the best config is a ready training config: train it for a few steps
    from ffc_ray.cli import main
    from ffc_ray.config import load_config

    best = exp / "best_config.yaml"
    assert load_config(best).pool.fraction == 0.3
    out = tmp_path / "best-run"
    rc = main(
        [
            "train",
            str(best),
            "--name",
            "best",
            "--set",
            "train.steps=4",
            "--set",
            f"train.output_dir={out}",
        ]
    )
    assert rc == 0
    steps = [
        json.loads(ln)
        for ln in (out / "best" / "progress.jsonl").read_text().splitlines()
        if ln.strip()
    ]
    assert max(s.get("step", 0) for s in steps if "event" not in s) == 4


@pytest.mark.timeout(600)
def test_killed_sweep_resumes_without_rerunning_completed_trials(ray_session, tmp_path):
    ray = ray_session
    address = ray.get_runtime_context().gcs_address
    sweep = write_sweep(
        tmp_path,
        "resume",
        {"pool.fraction": {"uniform": [0.2, 0.9]}},
        {
            "metric": "accuracy",
            "mode": "max",
            "num_samples": 3,
            "max_concurrent": 1,
            "asha": None,
            "seed": 3,
        },
    )
    storage = tmp_path / "sweeps"
    exp = storage / "resume"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log1 = tmp_path / "first.log"
    with open(log1, "w") as fh:
        proc = subprocess.Popen(
            sweep_cmd(sweep, storage, address),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        done: list[dict] = []
        while not done:
            assert proc.poll() is None, log1.read_text()[-3000:]
            assert time.time() < deadline, "no trial completed in time"
            time.sleep(1.0)
            if (exp / "results.csv").is_file():
                done = [r for r in read_rows(exp / "results.csv") if r["status"] == "completed"]
        time.sleep(4.0)  # > TUNE_GLOBAL_CHECKPOINT_S (2 s): the completion is in the state
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's own process group only
        proc.wait(timeout=30)
    first = {r["trial"] for r in done}
    runs = {t: exp / "train" / f"train-{t}" for t in first}
    results_before = {t: (exp / t / "result.json").read_text() for t in first}
    assert all(progress_starts(d) == 1 for d in runs.values())
    # the dead driver's trial actors go with it; their placement groups must be cleaned up
    assert wait_placement_groups_removed(ray) == []

    t0 = time.time()
    run_cli(sweep_cmd(sweep, storage, address, "--resume"), tmp_path / "resume.log", timeout=480)
    print(f"resume after kill: {time.time() - t0:.1f} s")
    rows = read_rows(exp / "results.csv")
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows), rows
    assert first <= {r["trial"] for r in rows}
    for t in first:  # not re-run: one start of its Train run, Tune results untouched
        assert progress_starts(runs[t]) == 1
        assert (exp / t / "result.json").read_text() == results_before[t]
    study = load_study(exp, "resume")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3
    assert complete[0].params["pool.fraction"] == 0.2  # the paper's 10 %, clipped: first
    assert (exp / "best_config.yaml").is_file()


@pytest.mark.timeout(600)
def test_multi_objective_sweep_reports_the_pareto_front(ray_session, tmp_path):
    from ffc_ray.ray.sweep.spec import Objective

    address = ray_session.get_runtime_context().gcs_address
    objectives = (Objective("accuracy", "max"), Objective("head_memory_mb", "min"))
    sweep = write_sweep(
        tmp_path,
        "pareto",
        {"pool.fraction": {"uniform": [0.2, 0.9]}, "head.margin": {"uniform": [0.1, 0.5]}},
        {
            "objectives": [{"metric": o.metric, "mode": o.mode} for o in objectives],
            "num_samples": 4,
            "max_concurrent": 2,
            "seed": 1,
        },
    )
    storage = tmp_path / "sweeps"
    t0 = time.time()
    run_cli(sweep_cmd(sweep, storage, address), tmp_path / "sweep.log", timeout=480)
    print(f"4-trial multi-objective sweep (2 at a time): {time.time() - t0:.1f} s")
    exp = storage / "pareto"
    rows = read_rows(exp / "results.csv")
    assert len(rows) == 4
    assert all(r["status"] == "completed" for r in rows)  # ASHA is off in this mode
    pts = [(r["trial"], num(r["accuracy"]), num(r["head_memory_mb"])) for r in rows]
    # brute force: a trial is on the front unless another is at least as good on both
    # objectives and strictly better on one
    expected = {
        t
        for t, a, m in pts
        if not any(a2 >= a and m2 <= m and (a2 > a or m2 < m) for _, a2, m2 in pts)
    }
    front = {r["trial"] for r in read_rows(exp / "pareto.csv")}
    assert front == expected and front
    assert {p.stem for p in (exp / "pareto_configs").glob("*.yaml")} == front
    assert (exp / "best_config.yaml").is_file()
    study = load_study(exp, "pareto")
    assert len(study.directions) == 2 and len(study.trials) == 4
    # Optuna's own Pareto set of the study is the same trials
    front_params = {float(r["pool.fraction"]) for r in read_rows(exp / "pareto.csv")}
    assert {t.params["pool.fraction"] for t in study.best_trials} == front_params
