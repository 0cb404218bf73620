"""The search: preflight checks, Optuna (TPE, RDB study) and the ASHA scheduler."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ffc_ray.config import ConfigError
from ffc_ray.preflight import check_run
from ffc_ray.ray.run_dir import resolve_paths
from ffc_ray.ray.sweep.results import (
    OPTUNA_FILE,
)
from ffc_ray.ray.sweep.spec import (
    SweepSpec,
    evaluation_steps,
    objectives_of,
)

log = logging.getLogger(__name__)


def resolve_spec_paths(spec: SweepSpec) -> SweepSpec:
    """Relative data / pairs paths made absolute: trials run in other working directories."""
    return dataclasses.replace(spec, base=resolve_paths(spec.base))


def preflight(spec: SweepSpec) -> None:
    """:func:`ffc_ray.preflight.check_run` for the base config and every searched value's
    ends (the pool fits, eval sets exist), each error naming the trial config it came from.

    The pure checks (keys, ranges, metrics the trainer reports) ran when the sweep was parsed.
    """
    from ffc_ray.data.source import num_training_classes  # torch: not at the CLI's start-up

    cfgs = [("base", spec.base)] + [
        (f"search.{p.key}={v!r}", spec.trial_config({p.key: v}))
        for p in spec.params
        for v in p.bounds()
    ]
    num_classes = num_training_classes(spec.base)
    walked: set[str] = set()  # each store's keys are walked once, not once per bound
    for where, cfg in cfgs:
        try:
            if cfg.data.source != spec.base.data.source:
                num = num_training_classes(cfg)
            else:
                num = num_classes
            check_run(cfg, num, check_store=cfg.data.source not in walked)
            walked.add(cfg.data.source)
        except ConfigError as exc:
            raise ConfigError(f"sweep {spec.name}, {where}: {exc}") from None
    asha = spec.tune.asha
    if asha is not None and not spec.tune.multi_objective:
        n = len(evaluation_steps(spec.base))
        if asha["max_t"] < n:
            log.warning(
                "tune.asha.max_t %d < the %d evaluations of train.steps %d: ASHA ends "
                "every trial after %d evaluations, before its last step",
                asha["max_t"],
                n,
                spec.base.train.steps,
                asha["max_t"],
            )


def optuna_storage_url(spec: SweepSpec, exp_dir: Path) -> str:
    return spec.tune.storage or f"sqlite:///{Path(exp_dir).resolve() / OPTUNA_FILE}"


def build_searcher(spec: SweepSpec, exp_dir: Path, study_name: str) -> Any:
    """OptunaSearch: TPE (seeded; multi-objective TPE with several objectives), RDB storage,
    the paper's defaults enqueued first; errored trials FAIL in the study."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class ErrorsFailSearch(OptunaSearch):
        """Ray 2.60's OptunaSearch tells Optuna an errored trial as COMPLETE with the values of
        its last report, so the sampler would learn from a crashed run and the study's best
        trials could name it. Here it is told without a result: FAIL."""

        def on_trial_complete(
            self, trial_id: str, result: dict | None = None, error: bool = False
        ) -> None:
            super().on_trial_complete(trial_id, None if error else result, error)

    objs = objectives_of(spec)
    startup = min(10, max(2, spec.tune.num_samples // 2))
    sampler = optuna.samplers.TPESampler(seed=spec.tune.seed, n_startup_trials=startup)
    rdb = optuna.storages.RDBStorage(optuna_storage_url(spec, exp_dir))
    if spec.tune.multi_objective:
        metric: Any = [o.metric for o in objs]
        mode: Any = [o.mode for o in objs]
    else:
        metric, mode = objs[0].metric, objs[0].mode
    return ErrorsFailSearch(
        space=spec.optuna_space(),
        metric=metric,
        mode=mode,
        points_to_evaluate=spec.initial_points() or None,
        sampler=sampler,
        study_name=study_name,
        storage=rdb,
    )


def build_scheduler(spec: SweepSpec) -> Any | None:
    """ASHA on the verification metric (one Tune iteration = one evaluation); None if off."""
    if spec.tune.asha is None:
        return None
    if spec.tune.multi_objective:
        log.info(
            "ASHA is disabled in multi-objective mode: it ranks trials on one metric and "
            "would cut trials on the Pareto front"
        )
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = spec.tune.asha
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=spec.tune.metric,
        mode=spec.tune.mode,
        max_t=int(a["max_t"]),
        grace_period=int(a["grace_period"]),
        reduction_factor=int(a["reduction_factor"]),
    )


def trial_dirname(trial: Any) -> str:
    """Short trial folders (the trial id); the default embeds every parameter value."""
    return str(trial.trial_id)


def check_study_is_new(url: str, study_name: str) -> None:
    import optuna

    try:
        names = optuna.get_all_study_names(storage=url)
    except Exception as exc:  # noqa: BLE001 - any database / driver error, reported by URL
        raise ConfigError(
            f"sweep field 'tune.storage': cannot open Optuna storage {url}: {exc}"
        ) from exc
    if study_name in names:
        raise ConfigError(
            f"Optuna study {study_name!r} already exists in {url}: resume it with "
            "--resume or start another with --name"
        )
