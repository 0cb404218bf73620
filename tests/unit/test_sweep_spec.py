"""Sweep files -> Optuna distributions, every invalid-sweep error, and the pure result helpers.

No Ray here: :mod:`ffc_ray.ray.sweep.spec` and :mod:`ffc_ray.ray.sweep.results` are pure.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import optuna.distributions as od
import pytest
import yaml

from ffc_ray.config import Config, ConfigError, load_config
from ffc_ray.ray.sweep.results import (
    STATUS_COMPLETED,
    STATUS_ERROR,
    STATUS_STOPPED,
    SweepTensorBoard,
    _ProgressTail,
    has_session,
    ready_config,
    trial_row,
    tune_metrics,
    write_config,
    write_table,
)
from ffc_ray.ray.sweep.spec import (
    REPORTED_METRICS,
    Objective,
    evaluation_steps,
    load_sweep,
    objectives_of,
    parse_sweep,
)

SEARCH = {
    "pool.fraction": {"loguniform": [0.2, 0.5]},
    "head.margin": {"uniform": [0.2, 0.4]},
    "head.scale": {"uniform": [16, 64], "step": 8},
    "head.top_k": {"int": [3, 11], "step": 2},
    "optim.lr": {"loguniform": [0.01, 0.2]},
    "optim.warmup_steps": {"logint": [1, 16]},
    "head.margin_type": {"choice": ["cosface", "arcface"]},
}


def sweep(search=None, tune=None, **extra) -> dict:
    d = {"name": "t", "search": search if search is not None else dict(SEARCH)}
    if tune is not None:
        d["tune"] = tune
    d.update(extra)
    return d


# ------------------------------------------------------------------------------------------
# translation


def test_search_space_translates_to_optuna_distributions():
    spec = parse_sweep(sweep())
    space = spec.optuna_space()
    assert list(space) == list(SEARCH)
    assert space["pool.fraction"] == od.FloatDistribution(0.2, 0.5, log=True)
    assert space["head.margin"] == od.FloatDistribution(0.2, 0.4, log=False)
    assert space["head.scale"] == od.FloatDistribution(16.0, 64.0, step=8)
    assert space["head.top_k"] == od.IntDistribution(3, 11, step=2)
    assert space["optim.warmup_steps"] == od.IntDistribution(1, 16, log=True)
    assert space["head.margin_type"] == od.CategoricalDistribution(["cosface", "arcface"])
    assert spec.tune.metric == "accuracy" and spec.tune.mode == "max"
    assert spec.tune.asha == {"max_t": 4, "grace_period": 1, "reduction_factor": 2}


def test_paper_defaults_first_clipped_into_the_space():
    spec = parse_sweep(sweep(tune={"points_to_evaluate": ["paper", {"head.margin": 0.3}]}))
    paper, custom = spec.initial_points()
    # official FFC: fraction 0.1 (-> low 0.2), m 0.5 (-> high 0.4), s 32, lr 0.1, arcface;
    # top_k has no paper value and the base leaves it None -> low end; warmup base 0 -> low 1
    assert paper == {
        "pool.fraction": 0.2,
        "head.margin": 0.4,
        "head.scale": 32.0,
        "head.top_k": 3,
        "optim.lr": 0.1,
        "optim.warmup_steps": 1,
        "head.margin_type": "arcface",
    }
    assert custom == {**paper, "head.margin": 0.3}
    for point in (paper, custom):
        for key, value in point.items():
            assert spec.optuna_space()[key]._contains(
                spec.optuna_space()[key].to_internal_repr(value)
            )


def test_paper_choice_falls_back_to_first_choice_and_ints_snap_to_the_step():
    spec = parse_sweep(
        sweep(
            {
                "head.margin_type": {"choice": ["cosface", "am"]},
                "head.top_k": {"int": [4, 10], "step": 3},
            },
            tune={"points_to_evaluate": ["paper", {"head.top_k": 10}]},
        )
    )
    paper, point = spec.initial_points()
    assert paper == {"head.margin_type": "cosface", "head.top_k": 4}  # base None -> low
    assert point == {"head.margin_type": "cosface", "head.top_k": 10}
    spec = parse_sweep(
        sweep(
            {
                "optim.weight_decay": {"uniform": [0.1, 0.5]},
                "head.top_k": {"int": [4, 10], "step": 3},
            },
            overrides={"head.top_k": 8, "optim.weight_decay": 0.7},
        )
    )
    # base values (no paper value for these keys) off the grid / out of range are moved into
    # the space: 8 -> 7, 0.7 -> 0.5
    assert spec.initial_points() == [{"optim.weight_decay": 0.5, "head.top_k": 7}]


def test_trial_config_applies_sampled_values_on_base_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump({"train": {"steps": 50, "eval_interval": 10}, "head": {"scale": 20.0}})
    )
    spec = parse_sweep(
        sweep(
            {"head.margin": {"uniform": [0.1, 0.6]}}, base=str(base), overrides={"train.steps": 40}
        )
    )
    cfg = spec.trial_config({"head.margin": 0.33})
    assert (cfg.head.margin, cfg.head.scale, cfg.train.steps) == (0.33, 20.0, 40)
    assert cfg == load_config(base, {"train.steps": 40, "head.margin": 0.33})


def test_load_sweep_file_and_extra_overrides(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep(overrides={"train.steps": 40})))
    spec = load_sweep(f, overrides={"train.eval_interval": 20})
    assert (spec.base.train.steps, spec.base.train.eval_interval) == (40, 20)
    assert spec.overrides == {"train.steps": 40, "train.eval_interval": 20}
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="unknown key"):
        load_sweep(f, overrides={"train.nope": 1})


def test_shipped_sweeps_parse():
    root = Path(__file__).resolve().parents[2]
    demo = load_sweep(root / "sweeps" / "demo.yaml", root=root)
    assert 4 <= demo.tune.num_samples <= 6 and demo.base.head.type == "ffc"
    fc = load_sweep(root / "sweeps" / "fc_vs_ffc.yaml", root=root)
    assert fc.tune.multi_objective and {p.key for p in fc.params} >= {"head.type"}
    assert sorted(p["head.type"] for p in fc.initial_points()) == ["fc", "ffc", "partial_fc"]
    lfw = load_sweep(root / "sweeps" / "lfw_ffc.yaml", root=root)  # store not needed to parse
    assert {p.key for p in lfw.params} == {
        "pool.fraction",
        "head.margin",
        "head.scale",
        "head.top_k",
    }
    assert lfw.initial_points()[0]["pool.fraction"] == 0.1 and lfw.base.data.image_size == 64


# ------------------------------------------------------------------------------------------
# every invalid sweep fails before any trial, naming the field

INVALID = [
    ({"foo": 1}, "sweep field 'foo': unknown key"),
    ({"search": {}}, "sweep field 'search': needs at least one"),
    ({"search": {"nope.key": {"uniform": [0, 1]}}}, "'search.nope.key': unknown config key"),
    ({"search": {"head.margin": {"uniform": [0.5, 0.5]}}}, "empty range"),
    ({"search": {"head.margin": {"uniform": [0.5, 0.2]}}}, "empty range"),
    ({"search": {"head.margin": {"gaussian": [0, 1]}}}, "expected one of uniform, loguniform"),
    ({"search": {"head.margin": [0.1, 0.2]}}, "expected one of"),
    ({"search": {"head.margin": {"uniform": [0.1]}}}, "needs [low, high]"),
    ({"search": {"head.margin": {"uniform": [0.1, float("inf")]}}}, "finite numbers"),
    ({"search": {"head.margin": {"uniform": ["a", 1]}}}, "finite numbers"),
    ({"search": {"head.top_k": {"int": [1.5, 4]}}}, "bounds must be integers"),
    ({"search": {"pool.fraction": {"loguniform": [0, 0.5]}}}, "needs low > 0"),
    ({"search": {"head.margin": {"uniform": [0.1, 0.5], "step": -1}}}, "positive number"),
    (
        {"search": {"pool.fraction": {"loguniform": [0.1, 0.5], "step": 0.1}}},
        "does not take a step",
    ),
    ({"search": {"head.margin_type": {"choice": []}}}, "non-empty list"),
    ({"search": {"head.margin_type": {"choice": ["arcface", "arcface"]}}}, "duplicates"),
    (
        {"search": {"head.margin_type": {"choice": ["arcface", "nope"]}}},
        "value 'nope' is rejected by the config",
    ),
    ({"search": {"pool.fraction": {"uniform": [0.1, 1.5]}}}, "value 1.5 is rejected"),
    ({"tune": {"metric": "nope"}}, "'tune.metric': metric 'nope' is not reported"),
    ({"tune": {"metric": "accuracy", "mode": "up"}}, "mode must be max or min"),
    ({"tune": {"foo": 1}}, "'tune.foo': unknown key"),
    ({"tune": {"num_samples": 0}}, "'tune.num_samples': must be an integer >= 1"),
    ({"tune": {"max_concurrent": 1.5}}, "'tune.max_concurrent'"),
    ({"tune": {"seed": "x"}}, "'tune.seed'"),
    ({"tune": {"trial_cpus": 0}}, "'tune.trial_cpus': must be > 0"),
    ({"tune": {"asha": {"foo": 1}}}, "'tune.asha.foo': unknown key"),
    ({"tune": {"asha": {"max_t": 0}}}, "'tune.asha.max_t'"),
    ({"tune": {"asha": {"max_t": 2, "grace_period": 3}}}, "must not exceed max_t"),
    ({"tune": {"asha": {"reduction_factor": 1}}}, "must be >= 2"),
    ({"tune": {"asha": [1]}}, "'tune.asha': expected a mapping"),
    ({"tune": {"objectives": [{"metric": "accuracy", "mode": "max"}]}}, "at least two"),
    (
        {
            "tune": {
                "objectives": [
                    {"metric": "accuracy", "mode": "max"},
                    {"metric": "accuracy", "mode": "min"},
                ]
            }
        },
        "must be distinct",
    ),
    (
        {
            "tune": {
                "objectives": [
                    {"metric": "accuracy", "mode": "max"},
                    {"metric": "memory", "mode": "min"},
                ]
            }
        },
        "'tune.objectives[1]': metric 'memory' is not reported",
    ),
    (
        {"tune": {"objectives": [{"metric": "accuracy", "mode": "max"}, "loss"]}},
        "'tune.objectives[1]': expected {metric, mode}",
    ),
    (
        {"tune": {"points_to_evaluate": [{"head.scale": 30}]}},
        "'tune.points_to_evaluate[0].head.scale': is not a searched key",
    ),
    ({"tune": {"points_to_evaluate": ["papers"]}}, "'tune.points_to_evaluate'"),
    (
        {"tune": {"points_to_evaluate": [{"pool.fraction": 2.0}]}},
        "'tune.points_to_evaluate[0].pool.fraction': 2.0 is outside the search space",
    ),
    (
        {
            "search": {"head.top_k": {"int": [4, 10], "step": 3}},
            "tune": {"points_to_evaluate": [{"head.top_k": 8}]},
        },
        "'tune.points_to_evaluate[0].head.top_k': 8 is outside the search space",
    ),
    (
        {
            "search": {"head.margin_type": {"choice": ["arcface", "cosface"]}},
            "tune": {"points_to_evaluate": [{"head.margin_type": "am"}]},
        },
        "'am' is outside the search space",
    ),
    ({"base": "no/such/config.yaml"}, "'base': config file no/such/config.yaml not found"),
    ({"overrides": {"train.nope": 3}}, "sweep field 'overrides'"),
    ({"overrides": ["train.steps=3"]}, "'overrides': expected a mapping"),
    ({"name": "a/b"}, "'name': name 'a/b': use letters, digits"),
    ({"name": ".."}, "'name': name '..': use letters, digits"),
    ({"name": "."}, "'name': name '.': use letters, digits"),
    # the trainer would never report the metric / ASHA could never act
    ({"overrides": {"eval.pairs": []}}, "'tune.metric': 'accuracy' comes from verification"),
    ({"overrides": {"data.num_pairs": 0}}, "the synthetic set has no pairs"),
    (
        {"tune": {"metric": "tar@far=0.0001"}, "overrides": {"eval.far_targets": [0.001]}},
        "add 0.0001 to eval.far_targets",
    ),
    (
        {
            "tune": {"asha": {"max_t": 4, "grace_period": 3}},
            "overrides": {"train.steps": 100, "train.eval_interval": 50},
        },
        "'tune.asha.grace_period': 3 exceeds the 2 evaluation(s)",
    ),
    ({"overrides": {"pool.capacity": 100}}, "'search.pool.fraction': has no effect"),
]


@pytest.mark.parametrize("patch, message", INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_sweep_fails_naming_the_field(patch, message):
    data = {"name": "t", "search": {"pool.fraction": {"loguniform": [0.1, 0.5]}}}
    data.update(patch)
    with pytest.raises(ConfigError) as exc:
        parse_sweep(data)
    assert message in str(exc.value)


def test_preflight_checks_the_pool_at_every_searched_bound():
    """The pool fit needs the data's identity count, so it runs in the preflight (before Ray
    starts), at the ends of every searched range: 0.01 x 1000 ids = 10 slots < 64 per step."""
    from ffc_ray.ray.sweep.search import preflight

    base = {"name": "t", "overrides": {"data.num_identities": 1000}}
    preflight(parse_sweep({**base, "search": {"pool.fraction": {"uniform": [0.1, 0.5]}}}))
    bad = parse_sweep({**base, "search": {"pool.fraction": {"uniform": [0.01, 0.5]}}})
    match = r"search.pool.fraction=0.01: .*'pool.fraction': pool of 10 "
    with pytest.raises(ConfigError, match=match):
        preflight(bad)


def test_metrics_that_need_no_verification_set_are_accepted():
    spec = parse_sweep(
        {
            "search": {"head.margin": {"uniform": [0.2, 0.5]}},
            "overrides": {"eval.pairs": []},
            "tune": {"metric": "head_memory_mb", "mode": "min"},
        }
    )
    assert objectives_of(spec) == (Objective("head_memory_mb", "min"),)
    mo = parse_sweep(
        {
            "search": {"head.margin": {"uniform": [0.2, 0.5]}},
            "tune": {
                "objectives": [
                    {"metric": "accuracy", "mode": "max"},
                    {"metric": "step_time_ms", "mode": "min"},
                ]
            },
        }
    )
    assert mo.tune.multi_objective
    assert [o.metric for o in objectives_of(mo)] == ["accuracy", "step_time_ms"]


def test_evaluation_steps_are_the_report_points():
    cfg = Config().with_overrides({"train.steps": 250, "train.eval_interval": 100})
    assert evaluation_steps(cfg) == [100, 200, 250]
    cfg = Config().with_overrides({"train.steps": 200, "train.eval_interval": 100})
    assert evaluation_steps(cfg) == [100, 200]


# ------------------------------------------------------------------------------------------
# trainer metrics -> sweep names, table rows, outputs

REPORT = {
    "step": 40,
    "epoch": 0,
    "loss": 3.5,
    "lr": 0.1,
    "score": 0.71,
    "synthetic/accuracy": 0.71,
    "synthetic/auc": 0.8,
    "synthetic/tar@far=0.001": 0.2,
    "synthetic/tar@far=0.0001": 0.1,
    "synthetic/f1": 0.7,
    "synthetic/accuracy_std": 0.02,
    "other/accuracy": 0.5,
}


def test_tune_metrics_maps_the_first_eval_set_and_fills_every_reported_name():
    out = tune_metrics(
        REPORT, static={"head_memory_mb": 1.5}, speed={"images_per_s": 900.0, "step_time_ms": 70.0}
    )
    assert set(REPORTED_METRICS) <= set(out)
    assert (out["accuracy"], out["auc"], out["tar@far=0.001"], out["f1"]) == (0.71, 0.8, 0.2, 0.7)
    assert (out["head_memory_mb"], out["images_per_s"], out["step_time_ms"]) == (1.5, 900.0, 70.0)
    assert out["loss"] == 3.5 and out["eval_set"] == "synthetic"
    assert out["other/accuracy"] == 0.5  # the trainer's own keys are kept
    # a report without evaluation is not forwarded; a name the trainer reports wins
    assert tune_metrics({"step": 10, "loss": 1.0, "score": float("nan")}) is None
    direct = tune_metrics(
        {**REPORT, "accuracy": 0.9, "head_memory_mb": 7.0}, static={"head_memory_mb": 1.5}
    )
    assert (direct["accuracy"], direct["head_memory_mb"]) == (0.9, 7.0)
    assert math.isnan(tune_metrics(REPORT)["images_per_s"])  # missing -> NaN, not dropped


def test_progress_tail_means_by_step_window(tmp_path):
    f = tmp_path / "progress.jsonl"
    recs = [{"event": "start", "step": 0}] + [
        {"step": s, "images_per_s": 100.0 * s, "step_time": 0.01 * s} for s in range(1, 7)
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 7, "imag')  # cut line
    tail = _ProgressTail(str(f))
    assert tail.speed(3) == {"images_per_s": 200.0, "step_time_ms": pytest.approx(20.0)}
    # a late report: steps 4..6 only, even though more lines were read
    assert tail.speed(6) == {"images_per_s": 500.0, "step_time_ms": pytest.approx(50.0)}
    assert tail.speed(6) == {"images_per_s": 500.0, "step_time_ms": pytest.approx(50.0)}
    with open(f, "a") as fh:
        fh.write('es_per_s": 700.0, "step_time": 0.07}\n')
    assert tail.speed(7) == {"images_per_s": 700.0, "step_time_ms": pytest.approx(70.0)}


@pytest.fixture()
def small_spec():
    return parse_sweep(
        {
            "name": "s",
            "search": {
                "pool.fraction": {"uniform": [0.1, 0.5]},
                "head.margin_type": {"choice": ["arcface", "cosface"]},
            },
            "overrides": {"train.steps": 60, "train.eval_interval": 20},
        }
    )


def test_trial_row_status(small_spec):
    cfg = {"pool.fraction": 0.2, "head.margin_type": "cosface"}
    done = trial_row(
        small_spec,
        "a",
        cfg,
        {"step": 60, "accuracy": 0.8, "training_iteration": 3, "time_total_s": 12.34},
    )
    assert (done["status"], done["step"], done["evals"], done["time_s"]) == (
        STATUS_COMPLETED,
        60,
        3,
        12.3,
    )
    assert (done["pool.fraction"], done["head.margin_type"], done["accuracy"]) == (
        0.2,
        "cosface",
        0.8,
    )
    assert trial_row(small_spec, "b", cfg, {"step": 20})["status"] == STATUS_STOPPED
    assert trial_row(small_spec, "c", cfg, {"step": 20}, errored=True)["status"] == STATUS_ERROR
    assert trial_row(small_spec, "d", cfg, {"step": 20}, state="RUNNING")["status"] == "running"
    assert trial_row(small_spec, "e", cfg, {}, state="PENDING")["status"] == "pending"


def test_ready_config(small_spec, tmp_path):
    rows = [
        {
            "trial": "a",
            "status": STATUS_ERROR,
            "accuracy": 0.99,
            "pool.fraction": 0.1,
            "head.margin_type": "arcface",
        },
        {
            "trial": "b",
            "status": STATUS_STOPPED,
            "accuracy": 0.7,
            "pool.fraction": 0.3,
            "head.margin_type": "cosface",
        },
        {
            "trial": "c",
            "status": STATUS_COMPLETED,
            "accuracy": 0.8,
            "pool.fraction": 0.4,
            "head.margin_type": "arcface",
        },
        {"trial": "d", "status": STATUS_COMPLETED, "accuracy": float("nan")},
    ]
    cfg = ready_config(small_spec, rows[2])
    path = tmp_path / "best.yaml"
    write_config(cfg, path, "best trial c\nline two")
    assert path.read_text().startswith("# best trial c\n# line two\n")
    loaded = load_config(path)
    assert loaded == cfg and loaded.pool.fraction == 0.4 and loaded.train.name == "s-c"


def test_write_table_csv_and_markdown(tmp_path):
    rows = [
        {"trial": "a", "status": "completed", "x": 0.123456789, "y": None},
        {"trial": "b", "status": "error", "x": float("nan"), "y": 3},
    ]
    write_table(rows, tmp_path / "r.csv", tmp_path / "r.md", "title")
    with open(tmp_path / "r.csv") as fh:
        got = list(csv.DictReader(fh))
    assert [r["trial"] for r in got] == ["a", "b"]
    assert float(got[0]["x"]) == 0.123456789 and got[0]["y"] == "" and got[1]["y"] == "3"
    md = (tmp_path / "r.md").read_text().splitlines()
    assert md[0] == "# title" and md[2] == "| trial | status | x | y |"
    assert md[4] == "| a | completed | 0.1235 |  |" and md[5] == "| b | error | nan | 3 |"


def test_tensorboard_hparams_session_per_trial(small_spec, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    tb = SweepTensorBoard(small_spec, tmp_path)
    tb.write_experiment()
    for i, (trial, frac) in enumerate([("t1", 0.2), ("t2", 0.4)]):
        for it, step in enumerate((20, 40), start=1):
            tb.result(trial, {"step": step, "training_iteration": it, "accuracy": 0.5 + i / 10})
        row = {
            "trial": trial,
            "pool.fraction": frac,
            "head.margin_type": "arcface",
            "status": STATUS_COMPLETED,
            "step": 40,
            "accuracy": 0.5 + i / 10,
        }
        assert not has_session(tmp_path / trial)
        tb.end(trial, row)
        assert has_session(tmp_path / trial)
    tb.close()
    root = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    root.Reload()
    exp = plugin_data_pb2.HParamsPluginData.FromString(
        root.PluginTagToContent("hparams")["_hparams_/experiment"]
    ).experiment
    assert {h.name for h in exp.hparam_infos} == {"pool.fraction", "head.margin_type", "status"}
    assert "hparam/accuracy" in {m.name.tag for m in exp.metric_infos}
    for i, (trial, frac) in enumerate([("t1", 0.2), ("t2", 0.4)]):
        acc = EventAccumulator(str(tmp_path / trial), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        start = plugin_data_pb2.HParamsPluginData.FromString(
            acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        ).session_start_info
        assert start.hparams["pool.fraction"].number_value == frac
        assert start.hparams["status"].string_value == STATUS_COMPLETED
        curve = [(e.step, e.value) for e in acc.Scalars("sweep/accuracy")]
        assert curve == [(20, pytest.approx(0.5 + i / 10)), (40, pytest.approx(0.5 + i / 10))]
        assert acc.Scalars("hparam/accuracy")[-1].value == pytest.approx(0.5 + i / 10)


def test_all_search_kinds_reach_optuna_and_back():
    # the product of choices: every combination is a valid config (the bounds are checked)
    spec = parse_sweep(
        sweep(
            {
                "head.margin_type": {"choice": ["arcface", "cosface", "am"]},
                "pool.policy": {"choice": ["lru", "fifo"]},
            }
        )
    )
    for mt, pol in itertools.product(["arcface", "cosface", "am"], ["lru", "fifo"]):
        cfg = spec.trial_config({"head.margin_type": mt, "pool.policy": pol})
        assert (cfg.head.margin_type, cfg.pool.policy) == (mt, pol)


@pytest.mark.parametrize(
    ("param", "inside", "outside"),
    [
        (dict(kind="uniform", low=0.2, high=0.4), [0.2, 0.3, 0.4], [0.19, 0.41, "0.3", None, True]),
        (dict(kind="uniform", low=0.0, high=1.0, step=0.25), [0.0, 0.75, 1.0], [0.3, 1.25]),
        (dict(kind="loguniform", low=1e-3, high=1e-1), [1e-3, 0.05], [1e-4, 0.2]),
        (dict(kind="int", low=2, high=10, step=2), [2, 4, 10, 6.0], [3, 12, 0, 4.5]),
        (dict(kind="logint", low=1, high=64), [1, 7, 64], [0, 65, 2.5]),
        (dict(kind="choice", choices=("arcface", "cosface")), ["cosface"], ["am", 1, None]),
    ],
)
def test_in_space_follows_range_step_and_choices(param, inside, outside):
    """points_to_evaluate membership, by hand (Optuna has no public membership test)."""
    from ffc_ray.ray.sweep.spec import Param, _in_space

    p = Param("head.margin", **param)
    assert all(_in_space(p, v) for v in inside), inside
    assert not any(_in_space(p, v) for v in outside), outside
