"""Distributed training on Ray Train (V2): the driver (:func:`run_training`).

The driver validates the config, creates the run's pool-index actor (:mod:`ffc_ray.pool.actor`),
writes the resolved config to the run folder and runs a ``TorchTrainer`` whose workers run
:func:`ffc_ray.ray.worker.train_loop_per_worker` (what each worker does, and how a
failed worker or pool actor is recovered from the last checkpoint, is described there).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ffc_ray import storage
from ffc_ray.config import Config
from ffc_ray.data.source import num_training_classes
from ffc_ray.engine.loop import Callback
from ffc_ray.eval.sets import SCORE_KEY
from ffc_ray.pool.actor import create_pool_actor, kill_pool_actor
from ffc_ray.preflight import check_data_cpus, check_run
from ffc_ray.ray.run_dir import (
    check_run_name,
    prepare_local_run,
    prepare_remote_run,
    remote_storage,
    resolve_paths,
    storage_location,
    storage_root,
)
from ffc_ray.ray.start import cluster_cpus, start_ray
from ffc_ray.ray.worker import train_loop_per_worker

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# the driver


@dataclass
class TrainRun:
    """What :func:`run_training` returns: the Ray ``Result``, names and folders.

    ``run_dir`` is local: the run folder itself, or with a URI ``ray.storage_path`` the
    driver's staging copy (``<train.output_dir>/<name>``); ``run_uri`` is then the remote run
    folder (checkpoints, and the uploaded config, progress and TensorBoard files)."""

    result: Any
    name: str
    storage_path: Path
    run_dir: Path
    actor: Any | None = None
    run_uri: str | None = None

    @property
    def location(self) -> str:
        """Where the run lives: the URI, or the local run folder."""
        return self.run_uri or str(self.run_dir)

    @property
    def summary(self) -> dict[str, Any] | None:
        """The rank-0 return value of the worker loop (final step, pool checksums per rank)."""
        return getattr(self.result, "return_value", None)


def default_run_name(cfg: Config, config_path: str | Path | None = None) -> str:
    """Deterministic, so running the same command again resumes the same run."""
    if cfg.train.name:
        return cfg.train.name
    if config_path is not None:
        return Path(config_path).stem
    return f"ffc_ray-{cfg.head.type}"


def build_torch_trainer(
    cfg: Config, name: str, loop_config: dict[str, Any], callbacks: list[Any] | None = None
) -> Any:
    """The TorchTrainer: scaling, failures, checkpoint ranking and storage from ``cfg``;
    ``callbacks``: ``ray.train.UserCallback`` instances (e.g. Tune's report callback)."""

    r = cfg.ray
    resources: dict[str, float] = {"CPU": float(r.cpus_per_worker)}
    if r.use_gpu:
        resources["GPU"] = 1.0
    scaling = ScalingConfig(
        num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources
    )
    run_config = RunConfig(
        name=name,
        storage_path=storage_location(cfg),
        callbacks=list(callbacks or []),
        failure_config=FailureConfig(max_failures=r.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.train.keep_checkpoints,
            checkpoint_score_attribute=SCORE_KEY,
            checkpoint_score_order="max",
        ),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
    )


def run_training(
    cfg: Config,
    *,
    name: str | None = None,
    address: str | None = None,
    config_path: str | Path | None = None,
    loop_callbacks: Sequence[Callback] = (),
    keep_actor: bool = False,
    callbacks: list[Any] | None = None,
) -> TrainRun:
    """Train ``cfg`` on Ray Train; the same ``name`` again resumes from the latest checkpoint.

    ``loop_callbacks`` (:class:`ffc_ray.engine.loop.Callback`, e.g. ``StopAfter(6)``: stop
    with a checkpoint after step 6, as a stopped driver would) run in every worker's loop
    before the worker's own callbacks; they travel pickled. ``keep_actor`` leaves the pool
    actor alive and returns its handle (for inspection); otherwise it is ended after the run.
    ``callbacks`` go to the ``RunConfig`` (``ray.train.UserCallback``, run on the controller).
    """
    name = check_run_name(name or default_run_name(cfg, config_path))
    cfg = resolve_paths(cfg)
    num_classes = num_training_classes(cfg)
    capacity = check_run(cfg, num_classes)
    start_ray(address or cfg.ray.address)
    check_data_cpus(cfg, cluster_cpus())

    root = storage_root(cfg)
    run_dir = root / name
    remote = remote_storage(cfg)
    run_uri = storage.join(remote, name) if remote else None
    if run_uri:
        prepare_remote_run(cfg, run_dir, run_uri, name)
    else:
        prepare_local_run(cfg, run_dir, name)

    actor = None
    if cfg.has_pool:
        actor = create_pool_actor(name, capacity, cfg.pool.policy, num_labels=num_classes)
    loop_config = {
        "config": cfg.to_dict(),
        "run_dir": str(run_dir),
        "run_uri": run_uri,
        "actor": actor,
        "callbacks": list(loop_callbacks),
    }
    trainer = build_torch_trainer(cfg, name, loop_config, callbacks)
    log.info(
        "run %s: %d worker(s), head %s, pool %s, storage %s",
        name,
        cfg.ray.num_workers,
        cfg.head.type,
        capacity if actor is not None else "-",
        run_uri or root,
    )
    try:
        result = trainer.fit()
    finally:
        if actor is not None and not keep_actor:
            kill_pool_actor(actor)
    return TrainRun(
        result=result,
        name=name,
        storage_path=root,
        run_dir=run_dir,
        actor=actor if keep_actor else None,
        run_uri=run_uri,
    )
