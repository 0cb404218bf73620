"""Hyperparameter sweeps: Ray Tune + Optuna (TPE, seeded) + ASHA over Ray Train (V2) trials.

Why this shape (docs/reference.md 3.1, 3.3):

* Each Tune trial is a small *driver* (a function trainable, ``tune.trial_cpus`` CPU) that builds
  the run's TorchTrainer through :mod:`ffc_ray.ray.train` and calls ``fit()``. Train V2 reports
  reach Tune only through a ``TuneReportCallback`` on the Train controller; ours
  (:class:`SweepReportCallback`) first renames the trainer's metrics to the sweep's names
  (:func:`tune_metrics`) and forwards one Tune result per *evaluation*, so one Tune
  ``training_iteration`` = one evaluation (ASHA's unit).
* OptunaSearch keeps its study in an RDB storage (SQLite file ``optuna.db`` in the experiment
  folder by default, or ``tune.storage``: any SQLAlchemy URL, e.g. PostgreSQL on a cluster), so
  the study outlives the driver and can be read with Optuna's own tools. The paper's defaults are
  enqueued first (``points_to_evaluate``).
* ASHA stops bad trials early on the verification metric. In multi-objective mode (``tune.
  objectives``) it is disabled: it ranks trials on one number and would cut the Pareto front.
* Outputs (experiment folder ``<storage>/<name>``): ``results.csv`` / ``results.md`` (one row per
  trial, rewritten whenever a trial reports or ends, so progress is visible while it runs),
  ``best_config.yaml`` (a ready ``ffc-ray train`` config), ``pareto.csv`` / ``pareto.md`` in
  multi-objective mode, ``tb/`` (one TensorBoard run per trial with curves and an hparams session;
  the experiment summary at ``tb/`` itself), ``optuna.db``, ``train/train-<trial>/`` (the Ray
  Train runs: checkpoints, their own TensorBoard logs, progress files) and Tune's own files.
* ``storage`` may be a bucket URI (``s3://``, ``gs://``, any pyarrow filesystem URI): Tune and
  the trials' Train runs (``ray.storage_path = <exp URI>/train``) write there natively; the
  sweep's own files are staged in ``<train.output_dir>/sweeps/<name>`` and uploaded
  (:func:`push_sweep`) whenever a trial ends and at the end. The SQLite study cannot live in a
  bucket: unless ``tune.storage`` names a database, it stays in the staging folder and a
  consistent copy (SQLite backup API) is uploaded with the rest; ``--resume`` fetches it when
  the staging folder lacks it (:func:`pull_sweep`).
* ``resume=True`` restores the Tuner from the experiment folder: finished trials are kept,
  unfinished and errored ones continue (their Train runs resume from their checkpoints, Train V2
  restores by run name), the Optuna study continues.

A sweep needs ``ray[default]`` (dashboard + State API): without it, the placement groups of
trials that ASHA stops leak and the next trial waits forever (docs/reference.md 3.3, found by
experiment). :func:`run_sweep` starts local Ray with the dashboard on and refuses to start one
when the dashboard's dependencies are missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from ray.train import UserCallback
from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback

from ffc_ray import storage
from ffc_ray.config import Config, ConfigError
from ffc_ray.eval.sets import check_eval_sets
from ffc_ray.ray.run_dir import resolve_paths, storage_root
from ffc_ray.ray.start import start_ray
from ffc_ray.ray.sweep_results import (
    BEST_CONFIG,
    OPTUNA_FILE,
    PARETO_CONFIGS,
    PARETO_CSV,
    PARETO_MD,
    RESULTS_CSV,
    RESULTS_MD,
    SPEC_FILE,
    STATUS_ERROR,
    TB_DIR,
    TRAIN_DIR,
    SweepTensorBoard,
    _fmt,
    _ProgressTail,
    best_row,
    has_session,
    ready_config,
    start_order,
    trial_row,
    tune_metrics,
    write_config,
    write_table,
)
from ffc_ray.ray.sweep_spec import (
    Objective,
    SweepSpec,
    evaluation_steps,
    objectives_of,
    pareto_front,
)

log = logging.getLogger(__name__)


class SweepReportCallback(UserCallback):
    """Train V2 controller callback: rename the trainer's metrics and forward them to Tune.

    Wraps :class:`ray.tune.integration.ray_train.TuneReportCallback` (constructed here, in the
    trial driver, where the Tune session exists); reports without an evaluation are not
    forwarded, so every Tune result carries the objectives (one Tune iteration per evaluation).
    """

    def __init__(
        self, static: Mapping[str, float] | None = None, progress_file: str | None = None
    ) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        self._inner = TuneReportCallback()
        self._static = dict(static or {})
        self._tail = _ProgressTail(progress_file) if progress_file else None

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        speed = self._tail.speed(metrics[0].get("step")) if self._tail is not None else {}
        mapped = tune_metrics(metrics[0], self._static, speed)
        if mapped is None:
            return
        self._inner.after_report(run_context, [mapped], checkpoint)


# ------------------------------------------------------------------------------------------
# one trial


def trial_config(
    spec: SweepSpec,
    values: Mapping[str, Any],
    exp_dir: str | Path,
    trial_id: str,
    staging: str | Path | None = None,
) -> Config:
    """The training config of a trial: its Train run lives in ``<exp>/train/train-<trial>``.

    ``exp_dir`` may be a URI (remote sweep storage): the trial's ``ray.storage_path`` is then
    ``<exp URI>/train`` and its files are staged in ``<staging>/train`` (the sweep's local
    staging folder) before they are uploaded."""
    cfg = spec.trial_config(values)
    over: dict[str, Any] = {
        "train.name": train_run_name(trial_id),
        "ray.storage_path": storage.join(exp_dir, TRAIN_DIR)
        if storage.is_uri(exp_dir)
        else str(Path(exp_dir) / TRAIN_DIR),
        "ray.address": None,
    }
    if storage.is_uri(exp_dir) and staging is not None:
        over["train.output_dir"] = str(Path(staging) / TRAIN_DIR)
    return cfg.with_overrides(over)


def train_run_name(trial_id: str) -> str:
    """Deterministic per trial, so a re-launched trial resumes its own Train run."""
    return f"train-{trial_id}"


def head_memory_mb(cfg: Config, num_classes: int) -> float:
    """Bytes held by the classifier head (pool, or FC weight + momentum), in MiB."""
    import torch

    from ffc_ray.registry import HEADS

    if cfg.head.type == "ffc":
        import ffc_ray.heads.ffc  # noqa: F401 - registers "ffc"
    with torch.random.fork_rng(devices=[]):
        head = HEADS.build(cfg.head.type, cfg, int(num_classes))
    return float(head.memory_bytes()) / 2**20


def fit_training(cfg: Config, name: str, callbacks: Sequence[Any]) -> Any:
    """Run one training through :func:`ffc_ray.ray.train.run_training` with extra Train
    callbacks (``ray.train.UserCallback``, run on the trial's Train controller)."""
    from ffc_ray.ray import train as rt

    return rt.run_training(cfg, name=name, callbacks=list(callbacks))


def trial_driver(
    config: dict[str, Any], spec: SweepSpec, exp_dir: str, staging: str | None = None
) -> None:
    """The Tune function trainable: one Train run for the sampled ``config``."""
    import ray.tune

    from ffc_ray.data.source import num_training_classes

    trial_id = ray.tune.get_context().get_trial_id()
    values = {p.key: config[p.key] for p in spec.params}
    cfg = trial_config(spec, values, exp_dir, trial_id, staging)
    name = train_run_name(trial_id)
    static = {
        "head_memory_mb": head_memory_mb(cfg, num_training_classes(cfg)),
        "started_at": time.time(),
    }
    progress = str(storage_root(cfg) / name / "progress.jsonl")
    log.info("trial %s: %s", trial_id, ", ".join(f"{k}={v}" for k, v in values.items()))
    fit_training(cfg, name, [SweepReportCallback(static, progress)])


# ------------------------------------------------------------------------------------------
# the Tune callback on the sweep driver: live table, TensorBoard, progress lines


class SweepTrialTensorBoardOff(TBXLoggerCallback):
    """Stands in for Tune's default per-trial TBX logger, which would duplicate ``tb/``.

    Tune adds a ``TBXLoggerCallback`` unless one is passed; its events (``ray/tune/*`` in every
    trial folder, hparams at trial end -- checked: they are there) would show each trial twice
    in TensorBoard next to the sweep's own runs under ``tb/``. CSV and JSON loggers stay.
    """

    def __init__(self) -> None:  # no tensorboardX writers
        pass

    def log_trial_start(self, trial: Any) -> None:
        pass

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        pass

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        pass


class SweepProgress(Callback):
    """Tune callback on the sweep driver.

    On every result: a compact log line, TensorBoard scalars, the results table rewritten. On
    every trial end: its hparams session. The table is built from Tune's trial list, which after
    a resume includes the restored trials, so the files always describe the whole sweep.
    """

    def __init__(self, spec: SweepSpec, exp_dir: str, exp_uri: str | None = None) -> None:
        self.spec = spec
        self.exp_dir = Path(exp_dir)
        self.exp_uri = exp_uri  # remote experiment folder: staged files uploaded at trial ends
        self.tb = SweepTensorBoard(spec, self.exp_dir / TB_DIR)
        self._t0 = time.time()
        self._last_write = 0.0

    def _rows(self, trials: Sequence[Any]) -> list[dict[str, Any]]:
        trials = sorted(trials, key=lambda t: start_order(t.last_result))
        return [
            trial_row(
                self.spec,
                t.trial_id,
                t.config,
                t.last_result,
                errored=t.status == "ERROR",
                state=t.status,
            )
            for t in trials
        ]

    def _write(self, trials: Sequence[Any], force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write < 2.0:
            return
        self._last_write = now
        try:
            write_table(
                self._rows(trials),
                self.exp_dir / RESULTS_CSV,
                self.exp_dir / RESULTS_MD,
                f"sweep {self.spec.name} (running)",
            )
        except OSError as exc:  # never let reporting kill the sweep
            log.warning("could not write the results table: %s", exc)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.info(
            "[sweep %s] trial %s started (%d/%d): %s",
            self.spec.name,
            trial.trial_id,
            trials.index(trial) + 1 if trial in trials else len(trials),
            self.spec.tune.num_samples,
            ", ".join(f"{p.key}={_fmt(trial.config.get(p.key))}" for p in self.spec.params),
        )
        self._write(trials, force=True)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self.tb.result(trial.trial_id, result)
        objs = ", ".join(
            f"{o.metric} {_fmt(result.get(o.metric))}" for o in objectives_of(self.spec)
        )
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        log.info(
            "[sweep %s %.0fs] trial %s eval %s step %s: %s | %d/%d trials done",
            self.spec.name,
            time.time() - self._t0,
            trial.trial_id,
            result.get("training_iteration"),
            _fmt(result.get("step")),
            objs,
            done,
            self.spec.tune.num_samples,
        )
        self._write(trials)

    def _end(self, trials: list, trial: Any, errored: bool) -> None:
        row = trial_row(
            self.spec,
            trial.trial_id,
            trial.config,
            trial.last_result,
            errored=errored,
            state="ERROR" if errored else "TERMINATED",
        )
        self.tb.end(trial.trial_id, row)
        log.info(
            "[sweep %s] trial %s %s: %s",
            self.spec.name,
            trial.trial_id,
            row["status"],
            ", ".join(f"{o.metric} {_fmt(row.get(o.metric))}" for o in objectives_of(self.spec)),
        )
        self._write(trials, force=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trials, trial, errored=False)
        self._push()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trials, trial, errored=True)
        self._push()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.tb.close()
        self._push()

    def _push(self) -> None:
        if self.exp_uri:  # (the ended trial's TensorBoard writer is closed, so flushed)
            push_sweep(self.exp_dir, self.exp_uri)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tb"] = SweepTensorBoard(self.spec, self.tb.dir)  # writers are not picklable
        return d


# ------------------------------------------------------------------------------------------
# preflight, searcher, scheduler


def resolve_spec_paths(spec: SweepSpec) -> SweepSpec:
    """Relative data / pairs paths made absolute: trials run in other working directories."""
    return dataclasses.replace(spec, base=resolve_paths(spec.base))


def preflight(spec: SweepSpec) -> None:
    """Checks that need files: eval sets exist, the pool fits at every searched value's ends.

    The pure checks (keys, ranges, metrics the trainer reports) ran when the sweep was parsed.
    """
    from ffc_ray.data.source import num_training_classes  # torch: not at the CLI's start-up

    cfgs = [("base", spec.base)] + [
        (f"search.{p.key}={v!r}", spec.trial_config({p.key: v}))
        for p in spec.params
        for v in p.bounds()
    ]
    num_classes = num_training_classes(spec.base)
    for where, cfg in cfgs:
        try:
            if cfg.data.source != spec.base.data.source:
                num = num_training_classes(cfg)
            else:
                num = num_classes
            cfg.check_pool_fits(num)
            check_eval_sets(cfg)
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
    the paper's defaults enqueued first."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    objs = objectives_of(spec)
    startup = min(10, max(2, spec.tune.num_samples // 2))
    sampler = optuna.samplers.TPESampler(seed=spec.tune.seed, n_startup_trials=startup)
    rdb = optuna.storages.RDBStorage(optuna_storage_url(spec, exp_dir))
    if spec.tune.multi_objective:
        metric: Any = [o.metric for o in objs]
        mode: Any = [o.mode for o in objs]
    else:
        metric, mode = objs[0].metric, objs[0].mode
    return OptunaSearch(
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


def _check_study_is_new(url: str, study_name: str) -> None:
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


# ------------------------------------------------------------------------------------------
# the sweep


@dataclasses.dataclass
class SweepOutcome:
    """What :func:`run_sweep` returns: the rows and the files it wrote."""

    name: str
    exp_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Path | None
    pareto: list[dict[str, Any]]
    tb_dir: Path
    optuna_storage: str
    wall_s: float
    num_errors: int = 0
    spec: SweepSpec | None = None  # the sweep as run (name, resolved paths)
    exp_uri: str | None = None  # remote experiment folder (exp_dir is then its local staging)

    @property
    def results_csv(self) -> Path:
        return self.exp_dir / RESULTS_CSV

    @property
    def results_md(self) -> Path:
        return self.exp_dir / RESULTS_MD


def experiment_dir(
    spec: SweepSpec, storage: str | Path | None = None, name: str | None = None
) -> Path:
    """``<storage>/<name>``; storage defaults to ``<train.output_dir>/sweeps``. With a URI
    storage (:func:`experiment_uri`), the local staging folder
    ``<train.output_dir>/sweeps/<name>`` where the sweep's own files are written first."""
    if storage and storage_is_remote(storage):
        storage = None
    root = Path(storage) if storage else Path(spec.base.train.output_dir) / "sweeps"
    return root.expanduser().resolve() / (name or spec.name)


def storage_is_remote(storage_path: str | Path | None) -> bool:
    return storage_path is not None and storage.is_uri(storage_path)


def experiment_uri(
    spec: SweepSpec, storage_path: str | Path | None = None, name: str | None = None
) -> str | None:
    """``<storage URI>/<name>`` for a URI ``--storage`` (``s3://``, ``gs://``, ...); else None."""
    if not storage_is_remote(storage_path):
        return None
    return storage.join(str(storage_path), name or spec.name)


#: the sweep's own files in a remote experiment (Tune's and the trials' are written by Ray)
STAGED_FILES = (SPEC_FILE, RESULTS_CSV, RESULTS_MD, BEST_CONFIG, PARETO_CSV, PARETO_MD)


def _sqlite_snapshot(db: Path, out: Path) -> None:
    """A consistent copy of a live SQLite file (the backup API, not a byte copy)."""
    import sqlite3

    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(str(out))
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def push_sweep(exp_dir: Path, exp_uri: str) -> None:
    """Upload the sweep's staged files (tables, best config, Pareto configs, ``tb/``, a
    snapshot of ``optuna.db``) to ``exp_uri``; failures are logged, not raised."""
    import tempfile

    def skip(rel: str) -> bool:
        top = rel.split("/", 1)[0]
        return top == TRAIN_DIR or top.startswith(OPTUNA_FILE)  # trials upload their own

    try:
        if exp_dir.is_dir():
            storage.upload_dir(exp_dir, exp_uri, exclude=skip)
        db = exp_dir / OPTUNA_FILE
        if db.is_file():
            with tempfile.TemporaryDirectory(prefix="ffc-optuna-") as tmp:
                snap = Path(tmp) / OPTUNA_FILE
                _sqlite_snapshot(db, snap)
                storage.upload_file(snap, storage.join(exp_uri, OPTUNA_FILE))
    except (storage.StorageError, OSError) as exc:
        log.warning("could not upload the sweep files to %s: %s", exp_uri, exc)


def pull_sweep(exp_dir: Path, exp_uri: str, need_optuna: bool) -> None:
    """For ``--resume`` of a remote sweep: fetch the staged files this node lacks. A local
    ``optuna.db`` (the live study of a driver that ran here) wins over the uploaded copy."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    for name in (*STAGED_FILES, OPTUNA_FILE):
        local = exp_dir / name
        remote = storage.join(exp_uri, name)
        if local.exists() or not storage.is_file(remote):
            continue
        storage.download_file(remote, local)
    for folder in (TB_DIR, PARETO_CONFIGS):
        remote = storage.join(exp_uri, folder)
        if not (exp_dir / folder).exists() and storage.is_dir(remote):
            storage.download_dir(remote, exp_dir / folder)
    if need_optuna and not (exp_dir / OPTUNA_FILE).is_file():
        raise ConfigError(
            f"cannot resume {exp_uri}: its Optuna study copy {OPTUNA_FILE} is missing there "
            f"and in the staging folder {exp_dir} (set tune.storage to the study's database "
            "URL if it was kept elsewhere)"
        )


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
        if not name or "/" in name:
            raise ConfigError(f"sweep name {name!r}: must be non-empty, without '/'")
        spec = dataclasses.replace(spec, name=name)
    spec = resolve_spec_paths(spec)
    preflight(spec)
    exp_dir = experiment_dir(spec, storage)
    exp_uri = experiment_uri(spec, storage)
    url = optuna_storage_url(spec, exp_dir)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # completed trials saved promptly
    if verbose == 0:  # Tune's new console output prints its header (and a TB path) even then
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

    if exp_uri is not None:
        _prepare_remote_sweep(spec, exp_dir, exp_uri, resume)
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
        _check_study_is_new(url, spec.name)
    record = _spec_record(spec)
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
    old_record.write_text(yaml.safe_dump(record, sort_keys=False))
    if exp_uri is not None:
        push_sweep(exp_dir, exp_uri)  # the record (and a first study snapshot) up front

    start_ray(address, num_cpus, log_to_driver, need_dashboard=True)
    from ffc_ray.ray.train import check_data_cpus

    check_data_cpus(spec.base, int(spec.tune.max_concurrent or 1), float(spec.tune.trial_cpus))
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
    if not resume:
        progress.tb.write_experiment()
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=build_searcher(spec, exp_dir, spec.name),
                scheduler=build_scheduler(spec),
                num_samples=spec.tune.num_samples,
                max_concurrent_trials=spec.tune.max_concurrent,
                trial_dirname_creator=trial_dirname,
                trial_name_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str(storage) if exp_uri else str(exp_dir.parent),
                callbacks=[progress, SweepTrialTensorBoardOff()],
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=verbose,
            ),
        )
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
    else:
        log.info("sweep %s: resuming %s", spec.name, exp_uri or exp_dir)
        tuner = tune.Tuner.restore(
            exp_uri or str(exp_dir), trainable, resume_unfinished=True, resume_errored=True
        )
    grid = tuner.fit()
    return write_outputs(spec, exp_dir, grid, url, time.time() - t0, exp_uri)


def _prepare_remote_sweep(spec: SweepSpec, exp_dir: Path, exp_uri: str, resume: bool) -> None:
    """Checks and staging for a sweep stored at a URI (Optuna study: see the README).

    New sweep: the remote folder must be empty; a leftover staging folder of the same name is
    moved aside. ``resume``: Tune must find the experiment at the URI; the staged files are
    fetched where this node lacks them (:func:`pull_sweep`)."""
    import ray.tune as tune

    if spec.tune.storage and spec.tune.storage.startswith("sqlite"):
        log.warning(
            "tune.storage %s is a SQLite file with remote sweep storage %s: only this node "
            "sees it (use a PostgreSQL / MySQL URL to share the study)",
            spec.tune.storage,
            exp_uri,
        )
    try:
        empty = storage.is_empty_dir(exp_uri)
    except storage.StorageError as exc:
        raise ConfigError(f"--storage: {exc}") from exc
    if resume:
        if empty or not tune.Tuner.can_restore(exp_uri):
            raise ConfigError(f"nothing to resume: {exp_uri} holds no Tune experiment")
        pull_sweep(exp_dir, exp_uri, need_optuna=not spec.tune.storage)
        return
    if not empty:
        raise ConfigError(
            f"experiment folder {exp_uri} already exists: continue it with "
            "--resume, or choose another --name / --storage"
        )
    if exp_dir.exists() and any(exp_dir.iterdir()):
        aside = exp_dir.with_name(f"{exp_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning(
            "%s: staging folder of an earlier sweep, but %s is new: moved to %s",
            exp_dir,
            exp_uri,
            aside,
        )
        exp_dir.rename(aside)


def _spec_record(spec: SweepSpec) -> dict[str, Any]:
    """The resolved sweep (base config, search space, settings) for the experiment folder."""
    return {
        "name": spec.name,
        "source": str(spec.path) if spec.path else None,
        "base": spec.base.to_dict(),
        "search": {
            p.key: (
                {"choice": list(p.choices)}
                if p.kind == "choice"
                else {p.kind: [p.low, p.high], **({"step": p.step} if p.step else {})}
            )
            for p in spec.params
        },
        "tune": json.loads(json.dumps(dataclasses.asdict(spec.tune), default=str)),
        "initial_points": spec.initial_points(),
    }


def rows_from_grid(spec: SweepSpec, grid: Any) -> list[dict[str, Any]]:
    """Final rows in trial start order; errored trials carry the first line of their error."""
    keyed = []
    for res in grid:
        metrics = dict(res.metrics or {})
        trial_id = metrics.get("trial_id") or Path(res.path).name
        row = trial_row(
            spec, str(trial_id), res.config or {}, metrics, errored=res.error is not None
        )
        if res.error is not None:
            lines = [ln for ln in str(res.error).strip().splitlines() if ln.strip()]
            row["error"] = (lines[-1] if lines else type(res.error).__name__)[:160]
        keyed.append((start_order(metrics), row))
    keyed.sort(key=lambda kv: kv[0])
    return [row for _, row in keyed]


def write_outputs(
    spec: SweepSpec,
    exp_dir: Path,
    grid: Any,
    url: str,
    wall_s: float,
    exp_uri: str | None = None,
) -> SweepOutcome:
    """Final table, best config (and Pareto front), hparams for trials the callback missed;
    with ``exp_uri`` (remote storage) the staged files are uploaded there at the end."""
    rows = rows_from_grid(spec, grid)
    objs = objectives_of(spec)
    write_table(
        rows,
        exp_dir / RESULTS_CSV,
        exp_dir / RESULTS_MD,
        f"sweep {spec.name}: {len(rows)} trials, "
        + ", ".join(f"{o.metric} ({o.mode})" for o in objs),
    )
    tb = SweepTensorBoard(spec, exp_dir / TB_DIR)
    for r in rows:
        if not any(
            (exp_dir / TB_DIR / r["trial"]).glob("events.out.tfevents.*")
        ) or not has_session(exp_dir / TB_DIR / r["trial"]):
            tb.end(r["trial"], r)
    tb.close()

    best_i = best_row(rows, objs[0])
    best_path = None
    pareto: list[dict[str, Any]] = []
    if spec.tune.multi_objective:
        candidates = [r for r in rows if r["status"] != STATUS_ERROR]
        pareto = [candidates[i] for i in pareto_front(candidates, objs)]
        pareto.sort(
            key=lambda r: -r[objs[0].metric] if objs[0].mode == "max" else r[objs[0].metric]
        )
        write_table(
            pareto,
            exp_dir / PARETO_CSV,
            exp_dir / PARETO_MD,
            f"sweep {spec.name}: Pareto front of "
            + ", ".join(f"{o.metric} ({o.mode})" for o in objs),
        )
        cdir = exp_dir / PARETO_CONFIGS
        cdir.mkdir(exist_ok=True)
        for r in pareto:
            write_config(
                ready_config(spec, r),
                cdir / f"{r['trial']}.yaml",
                _config_header(spec, r, objs, "on the Pareto front of"),
            )
        best_i = rows.index(pareto[0]) if pareto else best_i
    if best_i is not None:
        best_path = exp_dir / BEST_CONFIG
        write_config(
            ready_config(spec, rows[best_i]),
            best_path,
            _config_header(spec, rows[best_i], objs, "best on " + objs[0].metric + " of"),
        )
    num_errors = sum(r["status"] == STATUS_ERROR for r in rows)
    if exp_uri is not None:
        push_sweep(exp_dir, exp_uri)
    log.info(
        "sweep %s finished in %.1f s: %d trials, %d errors, results in %s",
        spec.name,
        wall_s,
        len(rows),
        num_errors,
        exp_uri or exp_dir,
    )
    return SweepOutcome(
        name=spec.name,
        exp_dir=exp_dir,
        rows=rows,
        best=rows[best_i] if best_i is not None else None,
        best_config=best_path,
        pareto=pareto,
        tb_dir=exp_dir / TB_DIR,
        optuna_storage=url,
        wall_s=wall_s,
        num_errors=num_errors,
        spec=spec,
        exp_uri=exp_uri,
    )


def _config_header(
    spec: SweepSpec, row: Mapping[str, Any], objs: Sequence[Objective], what: str
) -> str:
    vals = ", ".join(f"{o.metric}={_fmt(row.get(o.metric))}" for o in objs)
    params = ", ".join(f"{p.key}={_fmt(row.get(p.key))}" for p in spec.params)
    return (
        f"Trial {row['trial']}, {what} sweep {spec.name} ({row.get('status')}): {vals}\n"
        f"{params}\nTrain it: ffc-ray train <this file>   (written by ffc-ray sweep)"
    )
