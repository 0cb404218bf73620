"""A run's folder: where it lives (local, or a remote URI staged through a local folder), its
creation or resumption (the resolved config written, a changed config set aside), and the
uploads of a remote run's files. Training writes a run folder per run; sweeps per trial.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from ffc_ray import storage
from ffc_ray.config import CONFIG_FILE, Config, ConfigError, check_name

log = logging.getLogger(__name__)

#: (staging folder, run URI) -> {relative name: (size, mtime_ns)} of the files this process
#: last uploaded there successfully (see :func:`push_run_dir`)
_PUSHED: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}


def remote_storage(cfg: Config) -> str | None:
    """``ray.storage_path`` when it is a URI (``s3://``, ``gs://``, ``file://``...), else None."""
    p = cfg.ray.storage_path
    return p if p and storage.is_uri(p) else None


def storage_root(cfg: Config) -> Path:
    """The local root of run folders: ``ray.storage_path`` or ``train.output_dir``, made
    absolute (local or shared mount). With a URI ``ray.storage_path`` it is the local staging
    root ``train.output_dir``, where run files are written before they are uploaded."""
    if remote_storage(cfg):
        return Path(cfg.train.output_dir).expanduser().resolve()
    return Path(cfg.ray.storage_path or cfg.train.output_dir).expanduser().resolve()


def storage_location(cfg: Config) -> str:
    """What Ray Train gets as ``RunConfig(storage_path=...)``: the URI or the local root."""
    return remote_storage(cfg) or str(storage_root(cfg))


RUN_FILES_FETCHED = ("progress.jsonl",)  # what a resumed run needs back from the remote


def staging_dir(run_dir: str | Path, run_uri: str) -> Path:
    """This node's staging folder of a remote run: ``run_dir`` (the driver's
    ``<train.output_dir>/<name>``), or the node cache when that path cannot be created here."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    except OSError as exc:
        alt = storage.local_cache_dir(run_uri) / "staging"
        log.warning("cannot create the staging folder %s here (%s); using %s", run_dir, exc, alt)
        alt.mkdir(parents=True, exist_ok=True)
        return alt


def pull_progress(run_dir: Path, run_uri: str) -> None:
    """Fetch the remote ``progress.jsonl`` when it holds more than the staging copy (a resume
    on a node that did not run the earlier attempts)."""
    for name in RUN_FILES_FETCHED:
        remote = storage.join(run_uri, name)
        local = run_dir / name
        try:
            size = storage.file_size(remote)
            if size is None or (local.is_file() and local.stat().st_size >= size):
                continue
            storage.download_file(remote, local)
        except storage.StorageError as exc:
            log.warning("could not fetch %s: %s", remote, exc)


def _file_stamps(run_dir: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in run_dir.rglob("*"):
        try:
            if p.is_file():
                st = p.stat()
                out[p.relative_to(run_dir).as_posix()] = (st.st_size, st.st_mtime_ns)
        except OSError:  # removed meanwhile
            pass
    return out


def push_run_dir(run_dir: Path, run_uri: str) -> int:
    """Upload the staging folder (config, progress, TensorBoard, pid files) to ``run_uri``:
    the files that are new or changed (size or modification time) since this process's last
    successful push there, so a checkpoint does not re-send the whole folder. Returns the
    number of files sent. A failure is logged, not raised (the checkpoints are Ray's and
    already persisted), and the next push sends everything changed since the last success."""
    key = (str(run_dir), str(run_uri))
    sent = _PUSHED.get(key, {})
    stamps = _file_stamps(run_dir)
    try:
        n = storage.upload_dir(
            run_dir, run_uri, exclude=lambda rel: rel in stamps and sent.get(rel) == stamps[rel]
        )
    except storage.StorageError as exc:
        log.warning("could not upload the run files to %s: %s", run_uri, exc)
        return 0
    _PUSHED[key] = stamps
    return n


def prepare_local_run(cfg: Config, run_dir: Path, name: str) -> None:
    """Driver side of a local run: the run folder, the config compared and written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / CONFIG_FILE
    if cfg_file.is_file():
        from ffc_ray.config import load_config

        try:
            old = load_config(cfg_file)
            if old != cfg:
                log.warning(
                    "%s: resuming run %r with a different config than before", cfg_file, name
                )
        except ConfigError:
            log.warning("%s: previous config unreadable, overwritten", cfg_file)
    cfg.save(cfg_file)


def prepare_remote_run(cfg: Config, run_dir: Path, run_uri: str, name: str) -> None:
    """Driver side of a remote run: a stale staging folder of another run is moved aside, the
    remote config compared and the new one uploaded."""
    try:
        fresh = storage.is_empty_dir(run_uri)
    except storage.StorageError as exc:
        raise ConfigError(f"config field 'ray.storage_path': {exc}") from exc
    if fresh and run_dir.is_dir() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning(
            "%s: staging folder of an earlier run, but %s is new: moved to %s",
            run_dir,
            run_uri,
            aside,
        )
        run_dir.rename(aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    remote_cfg = storage.join(run_uri, CONFIG_FILE)
    if not fresh and storage.is_file(remote_cfg):
        try:
            old = Config.from_dict(yaml.safe_load(storage.read_text(remote_cfg)))
            if old != cfg:
                log.warning(
                    "%s: resuming run %r with a different config than before", remote_cfg, name
                )
        except (ConfigError, yaml.YAMLError, storage.StorageError):
            log.warning("%s: previous config unreadable, overwritten", remote_cfg)
    cfg.save(run_dir / CONFIG_FILE)
    try:
        storage.upload_file(run_dir / CONFIG_FILE, remote_cfg)
    except storage.StorageError as exc:
        raise ConfigError(f"config field 'ray.storage_path': {exc}") from exc


def check_run_name(name: str) -> str:
    return check_name(name, "run name")


def resolve_paths(cfg: Config) -> Config:
    """Relative data and pairs paths made absolute: workers do not share the driver's cwd."""
    over: dict[str, Any] = {}
    if cfg.data.source != "synthetic" and "://" not in cfg.data.source:
        over["data.source"] = str(Path(cfg.data.source).expanduser().resolve())
    pairs = [
        p if p == "synthetic" or "://" in p else str(Path(p).expanduser().resolve())
        for p in cfg.eval.pairs
    ]
    if pairs != list(cfg.eval.pairs):
        over["eval.pairs"] = pairs
    return cfg.with_overrides(over) if over else cfg
