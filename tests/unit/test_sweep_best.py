"""The sweep's best rows come from the Optuna study (best_trial / best_trials), matched to
Tune's rows; errored trials FAIL in the study. Checked against a brute-force Pareto filter."""

from __future__ import annotations

import math
import random

import optuna
import pytest

from ffc_ray.ray.sweep.outputs import best_rows
from ffc_ray.ray.sweep.results import STATUS_COMPLETED, STATUS_ERROR, STATUS_STOPPED
from ffc_ray.ray.sweep.search import build_searcher
from ffc_ray.ray.sweep.spec import parse_sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)


def spec_for(objectives):
    tune = {"metric": "accuracy", "mode": "max"}
    if len(objectives) > 1:
        tune = {"objectives": [{"metric": m, "mode": d} for m, d in objectives], "asha": None}
    search = {
        "pool.fraction": {"uniform": [0.1, 0.5]},
        "head.margin_type": {"choice": ["arcface", "cosface"]},
    }
    return parse_sweep({"name": "s", "search": search, "tune": tune})


def study_of(spec, rows, objectives, path):
    """The study Tune's OptunaSearch would leave: COMPLETE trials with the rows' last values,
    FAIL for errored ones."""
    dist = {p.key: p.to_optuna() for p in spec.params}
    db = path / f"study{len(list(path.glob('*.db')))}.db"  # a new database per call
    url = f"sqlite:///{db}"
    study = optuna.create_study(
        storage=url,
        study_name=spec.name,
        directions=["maximize" if d == "max" else "minimize" for _, d in objectives],
    )
    for r in rows:
        params = {p.key: r[p.key] for p in spec.params}
        if r["status"] == STATUS_ERROR:
            t = optuna.trial.create_trial(
                params=params, distributions=dist, state=optuna.trial.TrialState.FAIL
            )
        else:
            t = optuna.trial.create_trial(
                params=params, distributions=dist, values=[r[m] for m, _ in objectives]
            )
        study.add_trial(t)
    return url


def brute_force_front(rows, objectives):
    """Non-error rows no other non-error row beats on every objective, strictly on one."""

    def better_eq(a, b, mode):
        return a >= b if mode == "max" else a <= b

    ok = [i for i, r in enumerate(rows) if r["status"] != STATUS_ERROR]
    front = []
    for i in ok:
        dominated = any(
            all(better_eq(rows[j][m], rows[i][m], d) for m, d in objectives)
            and any(rows[j][m] != rows[i][m] for m, _ in objectives)
            for j in ok
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def row(i, fraction, margin, status=STATUS_COMPLETED, **metrics):
    return {
        "trial": f"t{i}",
        "status": status,
        "pool.fraction": fraction,
        "head.margin_type": margin,
        **metrics,
    }


def test_single_objective_best_skips_errors_and_takes_the_first_tie(tmp_path):
    objs = [("accuracy", "max")]
    spec = spec_for(objs)
    rows = [
        row(0, 0.1, "arcface", STATUS_ERROR, accuracy=0.99),  # crashed after a good report
        row(1, 0.2, "cosface", STATUS_STOPPED, accuracy=0.7),
        row(2, 0.3, "arcface", accuracy=0.8),
        row(3, 0.3, "arcface", accuracy=0.8),  # same params and value: the first row wins
    ]
    assert best_rows(spec, rows, study_of(spec, rows, objs, tmp_path)) == [2]
    rows[2]["accuracy"] = rows[3]["accuracy"] = 0.6
    assert best_rows(spec, rows, study_of(spec, rows, objs, tmp_path)) == [1]  # ASHA-stopped counts
    only_errors = rows[:1]
    assert best_rows(spec, only_errors, study_of(spec, only_errors, objs, tmp_path)) == []


@pytest.mark.parametrize("seed", range(4))
def test_pareto_rows_equal_a_brute_force_front(seed, tmp_path):
    rng = random.Random(seed)
    objs = [("accuracy", "max"), ("head_memory_mb", "min")]
    spec = spec_for(objs)
    rows = [
        row(
            i,
            rng.choice([0.1, 0.2, 0.3, rng.uniform(0.1, 0.5)]),
            rng.choice(["arcface", "cosface"]),
            STATUS_ERROR if i % 7 == 3 else STATUS_COMPLETED,
            accuracy=rng.choice([0.5, 0.6, 0.7, rng.random()]),
            head_memory_mb=rng.choice([1.0, 2.0, rng.random() * 4]),
        )
        for i in range(30)
    ]
    got = best_rows(spec, rows, study_of(spec, rows, objs, tmp_path))
    assert got == brute_force_front(rows, objs) and got  # non-empty: 4 seeds of 30 rows


def test_searcher_fails_errored_trials_in_the_study(tmp_path):
    spec = spec_for([("accuracy", "max")])
    searcher = build_searcher(spec, tmp_path, "s")
    for tid in ("ok", "crashed"):
        assert searcher.suggest(tid) is not None
    searcher.on_trial_complete("ok", {"accuracy": 0.5})
    searcher.on_trial_complete("crashed", {"accuracy": 0.9}, error=True)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert math.isclose(study.best_value, 0.5)


def test_an_objective_outside_the_table_metrics_reaches_the_rows_and_the_best():
    from ffc_ray.ray.sweep.results import trial_row

    spec = parse_sweep(
        {
            "name": "s",
            "search": {"pool.fraction": {"uniform": [0.1, 0.5]}},
            "tune": {"metric": "f1", "mode": "max"},
        }
    )
    steps = spec.base.train.steps
    rows = [
        trial_row(spec, f"t{i}", {"pool.fraction": f}, {"f1": v, "step": steps})
        for i, (f, v) in enumerate([(0.2, 0.6), (0.3, 0.8)])
    ]
    assert [r["f1"] for r in rows] == [0.6, 0.8]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        assert best_rows(spec, rows, study_of(spec, rows, [("f1", "max")], Path(d))) == [1]
