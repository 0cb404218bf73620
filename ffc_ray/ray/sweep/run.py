"""run_sweep: preflight, Ray start-up, the Tuner (new or restored), the outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from ffc_ray.config import ConfigError, check_name
from ffc_ray.preflight import check_data_cpus
from ffc_ray.ray.start import cluster_cpus, start_ray
from ffc_ray.ray.sweep.experiment import (
    experiment_dir,
    experiment_uri,
    prepare_remote_sweep,
    push_sweep,
)
from ffc_ray.ray.sweep.outputs import SweepOutcome, spec_record, write_outputs
from ffc_ray.ray.sweep.progress import SweepProgress, SweepTrialTensorBoardOff
from ffc_ray.ray.sweep.results import (
    SPEC_FILE,
)
from ffc_ray.ray.sweep.search import (
    build_scheduler,
    build_searcher,
    check_study_is_new,
    optuna_storage_url,
    preflight,
    resolve_spec_paths,
    trial_dirname,
)
from ffc_ray.ray.sweep.spec import (
    SweepSpec,
    objectives_of,
)
from ffc_ray.ray.sweep.trial import trial_driver
from ffc_ray.storage import atomic_write_text

log = logging.getLogger(__name__)


def run_sweep(
    spec: SweepSpec,
    *,
    storage: str | Path | None = None,
    name: str | None = None,
    address: str | None = None,
    resume: bool = False,
    num_cpus: int | None = None,
    verbose: int = 1,
    log_to_driver: bool = True,
) -> SweepOutcome:
    """Run (or ``resume``) the sweep; write the tables, best config, Pareto front, TensorBoard."""
    import ray.tune as tune

    t0 = time.time()
    if name is not None:
        spec = dataclasses.replace(spec, name=check_name(name, "sweep name"))
    spec = resolve_spec_paths(spec)
    preflight(spec)
    exp_dir = experiment_dir(spec, storage)
    exp_uri = experiment_uri(spec, storage)
    url = optuna_storage_url(spec, exp_dir)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # completed trials saved promptly
    if verbose == 0:  # Tune's new console output prints its header (and a TB path) even then
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    prepare_experiment(spec, exp_dir, exp_uri, url, resume)

    start_ray(address, num_cpus, log_to_driver, need_dashboard=True)
    concurrent = int(spec.tune.max_concurrent or 1)
    check_data_cpus(spec.base, cluster_cpus(), concurrent, float(spec.tune.trial_cpus))
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_driver,
            spec=spec,
            exp_dir=exp_uri or str(exp_dir),
            staging=str(exp_dir) if exp_uri else None,
        ),
        {"cpu": float(spec.tune.trial_cpus)},
    )
    progress = SweepProgress(spec, str(exp_dir), exp_uri)
    if resume:
        log.info("sweep %s: resuming %s", spec.name, exp_uri or exp_dir)
        tuner = tune.Tuner.restore(
            exp_uri or str(exp_dir), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        progress.tb.write_experiment()
        storage_path = str(storage) if exp_uri else str(exp_dir.parent)
        searcher = build_searcher(spec, exp_dir, spec.name)
        tuner = new_tuner(spec, trainable, searcher, storage_path, [progress], verbose)
        log.info(
            "sweep %s: %d trials (%d at a time), objectives %s, ASHA %s, Optuna %s, folder %s",
            spec.name,
            spec.tune.num_samples,
            spec.tune.max_concurrent,
            ", ".join(f"{o.metric} ({o.mode})" for o in objectives_of(spec)),
            "off" if build_scheduler(spec) is None else dict(spec.tune.asha or {}),
            url,
            exp_uri or exp_dir,
        )
    grid = tuner.fit()
    return write_outputs(spec, exp_dir, grid, url, time.time() - t0, exp_uri)


def prepare_experiment(
    spec: SweepSpec, exp_dir: Path, exp_uri: str | None, url: str, resume: bool
) -> None:
    """The experiment folder before Ray starts: a new sweep needs an empty folder and a new
    Optuna study, a resumed one a Tune experiment there; the sweep as run is recorded in
    ``sweep.yaml`` (a different one on resume is kept aside with a warning)."""
    import ray.tune as tune

    if exp_uri is not None:
        prepare_remote_sweep(spec, exp_dir, exp_uri, resume)
    elif resume:
        if not (exp_dir.is_dir() and tune.Tuner.can_restore(str(exp_dir))):
            raise ConfigError(f"nothing to resume: {exp_dir} holds no Tune experiment")
    elif exp_dir.exists() and any(exp_dir.iterdir()):
        raise ConfigError(
            f"experiment folder {exp_dir} already exists: continue it with "
            "--resume, or choose another --name / --storage"
        )
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        check_study_is_new(url, spec.name)
    record = spec_record(spec)
    old_record = exp_dir / SPEC_FILE
    if resume and old_record.is_file():
        before = yaml.safe_load(old_record.read_text())
        if before != json.loads(json.dumps(record)):
            log.warning(
                "%s: resuming with a different sweep than it started with; the Optuna "
                "searcher keeps its original search space",
                old_record,
            )
            old_record.rename(exp_dir / f"sweep.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    atomic_write_text(old_record, yaml.safe_dump(record, sort_keys=False))
    if exp_uri is not None:
        push_sweep(exp_dir, exp_uri)  # the record (and a first study snapshot) up front


def new_tuner(
    spec: SweepSpec,
    trainable: Any,
    searcher: Any,
    storage_path: str,
    callbacks: list[Any],
    verbose: int,
) -> Any:
    """The Tuner of a new sweep: the Optuna searcher, ASHA, short trial folders, no retries."""
    import ray.tune as tune

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=build_scheduler(spec),
            num_samples=spec.tune.num_samples,
            max_concurrent_trials=spec.tune.max_concurrent,
            trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=storage_path,
            callbacks=[*callbacks, SweepTrialTensorBoardOff()],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=verbose,
        ),
    )
