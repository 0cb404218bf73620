"""Experiment folders: where a sweep lives, remote staging, upload and resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ffc_ray import storage
from ffc_ray.config import ConfigError
from ffc_ray.ray.sweep.results import (
    BEST_CONFIG,
    OPTUNA_FILE,
    PARETO_CONFIGS,
    PARETO_CSV,
    PARETO_MD,
    RESULTS_CSV,
    RESULTS_MD,
    SPEC_FILE,
    TB_DIR,
    TRAIN_DIR,
)
from ffc_ray.ray.sweep.spec import (
    SweepSpec,
)

log = logging.getLogger(__name__)


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


def prepare_remote_sweep(spec: SweepSpec, exp_dir: Path, exp_uri: str, resume: bool) -> None:
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
