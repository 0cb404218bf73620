"""Distributed training on Ray Train (V2): the worker loop, the TorchTrainer, and the driver.

The driver (:func:`run_training`) validates the config, creates the run's pool-index actor
(:mod:`ffc_ray.pool.actor`), writes the resolved config to the run folder and runs a
``TorchTrainer``. Every worker (:func:`train_loop_per_worker`):

1. builds its data deterministically from (seed, epoch, data shard) and a
   :class:`~ffc_ray.engine.trainer.Trainer` whose hooks are distributed: DDP over the P-Net,
   the gallery all-gather and the actor planner (one actor round trip per step from rank 0,
   slots broadcast; :mod:`ffc_ray.ray.dist`);
2. restores the latest checkpoint when there is one (Ray Train hands it over after a worker
   failure or when the same run name is started again): trainer state, RNG states, step, and,
   through rank 0, the actor's index (``load_state``), so pool buffers and index agree again;
3. trains, evaluates on rank 0 every ``train.eval_interval`` steps and at the end, and reports
   metrics with a checkpoint every ``train.checkpoint_interval`` steps and at the end
   (``ray.train.report`` from all ranks; rank 0 writes the files).

A pool actor that restarts (and so lost its index) or that cannot be reached makes every rank
raise :class:`~ffc_ray.ray.dist.PoolActorLost`; Ray Train (``FailureConfig``) then restarts the
group from the last checkpoint, which reloads the actor. Nothing reported as checkpointed is
lost, and the continued run matches an uninterrupted one because the data order depends only on
(seed, epoch, shard) and the position, which the step determines.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ffc_ray import storage
from ffc_ray.config import Config, ConfigError
from ffc_ray.data.source import WorkerData, num_training_classes
from ffc_ray.engine.checkpoint import (
    META_FILE,
    load_checkpoint_state,
    model_checksum,
    pool_checksum,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from ffc_ray.engine.trainer import Trainer
from ffc_ray.eval.sets import SCORE_KEY, check_eval_sets, evaluate_sets, load_eval_sets
from ffc_ray.ray import dist as rdist
from ffc_ray.ray.run_dir import (
    check_run_name,
    prepare_local_run,
    prepare_remote_run,
    pull_progress,
    push_run_dir,
    remote_storage,
    resolve_paths,
    staging_dir,
    storage_location,
    storage_root,
)
from ffc_ray.ray.start import start_ray
from ffc_ray.ray.tb import RunLogger, flat_hparams, process_memory_mb

log = logging.getLogger(__name__)

#: score of a checkpoint saved without an evaluation: below any accuracy, and finite (Ray's
#: checkpoint-manager snapshot stores NaN as null, which breaks the ranking on resume)
NOT_EVALUATED = -1.0


# ------------------------------------------------------------------------------------------
# evaluation (rank 0)


def log_eval_figures(logger: RunLogger, step: int, full: dict[str, dict[str, Any]]) -> None:
    """ROC curve and same / different similarity histogram per set, as TensorBoard images."""
    from ffc_ray.eval.figures import histogram_image, roc_image

    for name, res in full.items():
        logger.image(step, f"eval/{name}/roc", roc_image(res))
        logger.image(step, f"eval/{name}/histogram", histogram_image(res))


# ------------------------------------------------------------------------------------------
# checkpoint files


def _gather_objects(obj: Any) -> list[Any]:
    _, size = rdist.world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------
# the worker


def _worker_device(cfg: Config) -> torch.device:
    if cfg.ray.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    if cfg.train.device not in ("auto", "cpu"):
        raise ConfigError(f"config field 'train.device': {cfg.train.device!r} needs ray.use_gpu")
    return torch.device("cpu")


def _ddp_wrap(module: torch.nn.Module) -> torch.nn.Module:
    import ray.train.torch

    return ray.train.torch.prepare_model(module, move_to_device=False)


class ShardedForward(torch.nn.Module):
    """Forward a batch made of ``n`` equal logical-shard blocks one block at a time.

    Data-parallel emulation: BatchNorm then normalises each block with its own statistics,
    exactly as ``n`` separate workers (per-GPU BN, no SyncBN) would. Used only when one worker
    holds several logical data shards (tests and equivalence checks); parameters are shared with
    the wrapped module, its ``state_dict`` is untouched.
    """

    def __init__(self, module: torch.nn.Module, n: int) -> None:
        super().__init__()
        self.module = module
        self.n = int(n)

    def chunked(self, fn: Any) -> Any:
        n = self.n

        def forward(x: torch.Tensor) -> torch.Tensor:
            if len(x) % n:
                raise ValueError(f"ShardedForward: batch {len(x)} is not {n} equal shards")
            return torch.cat([fn(c) for c in x.chunk(n)])

        return forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chunked(self.module)(x)


def _mean_over_ranks(values: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """Average the per-rank loss terms (each rank's loss is a mean over its own probes)."""
    _, size = rdist.world()
    present = [k for k in keys if k in values]
    if size == 1 or not present:
        return values
    t = torch.tensor([float(values[k]) for k in present], dtype=torch.float64)
    t = t.to(rdist.comm_device())  # nccl reduces CUDA tensors only
    dist.all_reduce(t)
    out = dict(values)
    for k, v in zip(present, (t / size).cpu().tolist()):
        out[k] = v
    return out


def build_worker_trainer(
    cfg: Config, data: WorkerData, world: int, actor: Any, device: torch.device
) -> tuple[Trainer, rdist.ActorPlanner | None]:
    """This worker's :class:`Trainer` with its distributed hooks: DDP over the P-Net, the
    gallery all-gather and the pool actor's planner (ffc). The Trainer averages replicated
    head gradients itself (one all-reduce per head parameter and step). A worker holding
    several logical data shards forwards each shard's block alone (BatchNorm per block, as
    separate workers): the data-parallel emulation of the equivalence tests (ffc only)."""
    is_ffc = cfg.head.type == "ffc"
    if is_ffc and actor is None:
        raise RuntimeError("train_loop_per_worker: the ffc head needs the pool actor handle")
    if world > 1 and cfg.head.type == "partial_fc":
        raise ConfigError(
            "config field 'head.type': partial_fc keeps per-worker sampled rows "
            "that diverge across workers; run it with ray.num_workers: 1"
        )
    ghost = len(data.shard_ids)  # logical shards on this worker (> 1: data-parallel emulation)
    if ghost > 1 and not is_ffc:
        raise ConfigError("data shards > workers (data-parallel emulation) is for the ffc head")
    planner = None
    if is_ffc:
        planner = rdist.ActorPlanner(actor, symmetric=cfg.head.symmetric)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if ghost > 1:
            module = ShardedForward(module, ghost)
        return _ddp_wrap(module) if world > 1 else module

    trainer = Trainer(
        cfg,
        data.num_classes,
        device,
        gather=rdist.gather_gallery if world > 1 else None,
        plan=planner,
        ddp_wrap=wrap if (world > 1 or ghost > 1) else None,
    )
    if ghost > 1 and trainer.gnet is not None:
        trainer.gnet.forward = ShardedForward(trainer.gnet, ghost).chunked(trainer.gnet.forward)
    return trainer, planner


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entry point; ``loop_config`` holds the resolved config dict, run folder, actor."""
    import ray.train

    from ffc_ray.ray.tb import read_progress

    cfg = Config.from_dict(loop_config["config"])
    extra: dict[str, Any] = dict(loop_config.get("extra") or {})
    run_dir = Path(loop_config["run_dir"])
    run_uri: str | None = loop_config.get("run_uri")
    actor = loop_config.get("actor")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if run_uri:  # remote run folder: files are written to this node's staging, then uploaded
        run_dir = staging_dir(run_dir, run_uri)
        if rank == 0:
            pull_progress(run_dir, run_uri)
    device = _worker_device(cfg)
    torch.manual_seed(cfg.train.seed * 1009 + rank)
    np.random.seed((cfg.train.seed * 1009 + rank) % 2**32)
    random.seed(cfg.train.seed * 1009 + rank)
    if rank == 0 or extra.get("pid_files"):
        (run_dir / "workers").mkdir(parents=True, exist_ok=True)
        (run_dir / "workers" / f"rank{rank}.pid").write_text(str(os.getpid()))

    data = WorkerData(cfg, rank, world, extra.get("data_shards"))
    is_ffc = cfg.head.type == "ffc"
    trainer, planner = build_worker_trainer(cfg, data, world, actor, device)

    # ---- restore --------------------------------------------------------------------------
    ckpt = ray.train.get_checkpoint()
    restore_info: dict[str, Any] = {}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint_state(d)
            meta = json.loads((Path(d) / META_FILE).read_text())
        trainer.load_state_dict(state["trainer"])
        rngs = state.get("rng") or []
        if rank < len(rngs) and rngs[rank] is not None:
            set_rng_state(rngs[rank])
        if state.get("num_shards") not in (None, data.num_shards):
            log.warning(
                "resuming with %d data shards, checkpoint had %s: the data order changes",
                data.num_shards,
                state.get("num_shards"),
            )
        restore_info = {
            "from_step": int(state["step"]),
            "ckpt_pool_checksum": meta.get("pool_checksum"),
            "ckpt_index_checksum": meta.get("index_checksum"),
        }
        if is_ffc and rank == 0:
            loaded = ray.get(actor.load_state.remote(state["index"], int(state["step"])))
            if meta.get("index_checksum") not in (None, loaded):
                raise RuntimeError(
                    f"{ckpt.path}: the pool actor's index after load_state "
                    "differs from the checkpoint's (checksum mismatch)"
                )
            restore_info["index_checksum"] = loaded
        del state
    elif is_ffc and rank == 0:
        ray.get(actor.reset.remote())
    if planner is not None:
        planner.step = trainer.step
    start = trainer.step
    pool_sums = rdist.all_gather_strings(pool_checksum(trainer) or "")
    attempt = sum(e["event"] == "start" for e in read_progress(run_dir)[1]) if rank == 0 else 0
    logger = RunLogger(
        run_dir,
        start_step=start,
        enabled=rank == 0,
        log_interval=cfg.train.log_interval,
        attempt=attempt,
    )
    if rank == 0:
        if restore_info:
            restore_info["pool_checksums"] = pool_sums
            log.info("restored step %d from %s", start, ckpt.path if ckpt else "")
            logger.event("restore", **restore_info)
        logger.event("start", step=start, world=world, pid=os.getpid())
    rdist.barrier()

    vsets = load_eval_sets(cfg) if rank == 0 else []
    if start == 0 and rank == 0 and vsets:  # the untrained baseline, for the curves
        base, full = evaluate_sets(trainer, vsets, cfg)
        logger.scalars(0, {k: v for k, v in base.items() if k != SCORE_KEY}, "eval")
        log_eval_figures(logger, 0, full)
        logger.event("eval", step=0, **base)
    steps = cfg.train.steps
    last_eval: dict[str, float] = {}
    step_sleep = float(extra.get("step_sleep_s", 0.0))
    stop_after = extra.get("stop_after_step")
    summary: dict[str, Any] = {"start_step": start}

    batches = data.iter_batches(start, steps, device)
    for x, lx, y, ly in batches:
        if planner is not None:
            planner.step = trainer.step
            planner.prefetch(lx, ly)  # the round trip overlaps the EMA and G-Net forward
        metrics = trainer.train_step(x, lx, y, ly)
        done = trainer.step
        metrics = _mean_over_ranks(metrics, ("loss", "loss_pos", "loss_neg", "pos_fraction"))
        if planner is not None:
            metrics["actor_latency_ms"] = planner.last_latency_ms
            metrics["actor_wait_ms"] = planner.last_wait_ms
            metrics["actor_compute_ms"] = planner.last_actor_ms
        metrics["images_per_s"] = metrics.get("images_per_s", 0.0) * world
        metrics["memory_mb"] = process_memory_mb()
        if device.type == "cuda":
            metrics["cuda_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        logger.step(done, metrics, {"cpu_s": time.process_time()})
        if step_sleep:
            time.sleep(step_sleep)

        final = done == steps
        want_eval = final or done % cfg.train.eval_interval == 0
        want_ckpt = final or done % cfg.train.checkpoint_interval == 0
        stop_now = stop_after is not None and done >= int(stop_after)
        want_ckpt = want_ckpt or stop_now
        if not (want_eval or want_ckpt):
            continue
        report: dict[str, Any] = {
            "step": done,
            "epoch": data.position(done)[0],
            **{k: metrics[k] for k in ("loss", "loss_pos", "loss_neg", "lr") if k in metrics},
        }
        if want_eval and rank == 0:
            last_eval, full = evaluate_sets(trainer, vsets, cfg)
            logger.scalars(done, {k: v for k, v in last_eval.items() if k != SCORE_KEY}, "eval")
            log_eval_figures(logger, done, full)
            logger.event("eval", step=done, **last_eval)
            log.info(
                "eval at step %d: %s",
                done,
                ", ".join(
                    f"{k}={v:.4f}" for k, v in last_eval.items() if k.endswith(("accuracy", "auc"))
                ),
            )
        if want_eval:
            report.update(last_eval)
        report.setdefault(SCORE_KEY, NOT_EVALUATED)
        if want_ckpt:
            _report_with_checkpoint(report, trainer, cfg, actor, data, rank, logger)
        else:
            ray.train.report(report)
        logger.flush()
        if want_ckpt and run_uri and rank == 0:
            push_run_dir(run_dir, run_uri)
        if stop_now and not final:
            log.info("stopping after step %d (stop_after_step)", done)
            summary["stopped_at"] = done
            break

    batches.close()  # a stop_after_step break: end the Ray Data streams' read-ahead now
    # ---- end --------------------------------------------------------------------------------
    pool_sums = rdist.all_gather_strings(pool_checksum(trainer) or "")
    summary["model_checksums"] = rdist.all_gather_strings(model_checksum(trainer))
    summary.update(
        final_step=trainer.step,
        pool_checksums=pool_sums,
        world=world,
        torch_threads=torch.get_num_threads(),
        num_classes=data.num_classes,
        head_memory_bytes=int(trainer.head.memory_bytes()),
    )
    if rank == 0:
        logger.event("end", step=trainer.step, pool_checksums=pool_sums)
        if trainer.step == steps:
            logger.hparams(
                flat_hparams(cfg.to_dict()),
                {k: v for k, v in last_eval.items() if "/" in k} or {"loss": 0.0},
            )
        logger.close()
        if run_uri:
            push_run_dir(run_dir, run_uri)
    return summary if rank == 0 else None


def _report_with_checkpoint(
    report: dict[str, Any],
    trainer: Any,
    cfg: Config,
    actor: Any,
    data: WorkerData,
    rank: int,
    logger: RunLogger,
) -> None:
    """All ranks call ``ray.train.report``; rank 0 attaches the checkpoint folder."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    rngs = _gather_objects(rng_state())
    epoch, position = data.position(trainer.step)
    with tempfile.TemporaryDirectory(prefix="ffc-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            index_state, index_sum = None, None
            if trainer.is_ffc:
                index_state, actor_step = ray.get(actor.get_state.remote())
                if actor_step != trainer.step:
                    raise rdist.PoolActorLost(
                        f"pool actor is at step {actor_step} while saving step {trainer.step}"
                    )
                from ffc_ray.pool.actor import index_checksum

                index_sum = index_checksum(index_state)
            meta = write_checkpoint(
                Path(tmp),
                trainer=trainer,
                cfg=cfg,
                index_state=index_state,
                index_sum=index_sum,
                rng=rngs,
                epoch=epoch,
                position=position,
                metrics=report,
                num_shards=data.num_shards,
            )
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=checkpoint)
        if rank == 0:  # persisted now (Ray registers it with the run right after)
            logger.event(
                "checkpoint",
                step=trainer.step,
                pool_checksum=meta["pool_checksum"],
                index_checksum=index_sum,
            )


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


def check_data_cpus(cfg: Config, concurrent_runs: int = 1, per_run_extra_cpus: float = 0.0) -> None:
    """Raise if Ray Data's read / decode tasks could never get a CPU next to the workers.

    With ``data.loader: ray_data`` each worker streams its store through tasks of
    ``data.read_cpus`` CPU; if the training workers (times the runs that share the cluster,
    e.g. concurrent sweep trials, plus their drivers) hold every CPU, those tasks wait forever
    and the run hangs (docs/reference.md 3.3). Checked against ``ray.cluster_resources()``
    before start.
    """
    import ray

    d, r = cfg.data, cfg.ray
    if d.source == "synthetic" or d.loader != "ray_data":
        return
    total = float(ray.cluster_resources().get("CPU", 0.0))
    held = concurrent_runs * (r.num_workers * r.cpus_per_worker + per_run_extra_cpus)
    if held + d.read_cpus > total + 1e-9:
        raise ConfigError(
            f"config field 'data.read_cpus': Ray Data read tasks need {d.read_cpus} CPU next to "
            f"{held:g} CPU held by training ({concurrent_runs} run(s) x ({r.num_workers} "
            f"worker(s) x ray.cpus_per_worker {r.cpus_per_worker:g} + {per_run_extra_cpus:g})) "
            f"on a cluster of {total:g} CPUs: they would wait forever. Lower "
            "ray.cpus_per_worker or data.read_cpus, or set data.loader: reader"
        )


def build_torch_trainer(
    cfg: Config, name: str, loop_config: dict[str, Any], callbacks: list[Any] | None = None
) -> Any:
    """The TorchTrainer: scaling, failures, checkpoint ranking and storage from ``cfg``;
    ``callbacks``: ``ray.train.UserCallback`` instances (e.g. Tune's report callback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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
    extra: dict[str, Any] | None = None,
    keep_actor: bool = False,
    callbacks: list[Any] | None = None,
) -> TrainRun:
    """Train ``cfg`` on Ray Train; the same ``name`` again resumes from the latest checkpoint.

    ``extra`` carries test and benchmark knobs that are not part of the config:
    ``data_shards`` (logical data shards, see :class:`WorkerData`), ``step_sleep_s``,
    ``stop_after_step`` (stop cleanly after that step, with a checkpoint: a stopped driver),
    ``pid_files`` (every rank writes ``workers/rank<r>.pid``). ``keep_actor`` leaves the pool
    actor alive and returns its handle (for inspection); otherwise it is ended after the run.
    ``callbacks`` go to the ``RunConfig`` (``ray.train.UserCallback``, run on the controller).
    """
    name = check_run_name(name or default_run_name(cfg, config_path))
    if cfg.head.type == "partial_fc" and cfg.ray.num_workers > 1:
        raise ConfigError(
            "config field 'ray.num_workers': partial_fc runs on one worker (its "
            "per-worker sampled rows would diverge); set ray.num_workers: 1"
        )
    cfg = resolve_paths(cfg)
    num_classes = num_training_classes(cfg)
    capacity = cfg.check_pool_fits(num_classes)
    check_eval_sets(cfg)
    start_ray(address or cfg.ray.address)
    check_data_cpus(cfg)

    root = storage_root(cfg)
    run_dir = root / name
    remote = remote_storage(cfg)
    run_uri = storage.join(remote, name) if remote else None
    if run_uri:
        prepare_remote_run(cfg, run_dir, run_uri, name)
    else:
        prepare_local_run(cfg, run_dir, name)

    actor = None
    if cfg.head.type == "ffc":
        from ffc_ray.pool.actor import create_pool_actor

        actor = create_pool_actor(name, capacity, cfg.pool.policy)
    loop_config = {
        "config": cfg.to_dict(),
        "run_dir": str(run_dir),
        "run_uri": run_uri,
        "actor": actor,
        "extra": dict(extra or {}),
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
            from ffc_ray.pool.actor import kill_pool_actor

            kill_pool_actor(actor)
    return TrainRun(
        result=result,
        name=name,
        storage_path=root,
        run_dir=run_dir,
        actor=actor if keep_actor else None,
        run_uri=run_uri,
    )
