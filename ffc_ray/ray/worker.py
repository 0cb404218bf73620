"""The Ray Train worker: what every training process runs (:func:`train_loop_per_worker`).

Every worker:

1. builds its data deterministically from (seed, epoch, data shard) and a
   :class:`~ffc_ray.engine.trainer.Trainer` whose hooks are distributed: DDP over the P-Net,
   the gallery all-gather and the actor planner (one actor round trip per step from rank 0,
   slots broadcast; :mod:`ffc_ray.ray.dist`);
2. restores the latest checkpoint when there is one (Ray Train hands it over after a worker
   failure or when the same run name is started again): trainer state, RNG states, step, and,
   through rank 0, the actor's index (``load_state``), so pool buffers and index agree again;
3. trains through :func:`ffc_ray.engine.loop.train_loop` with its callbacks: the pool
   actor's prefetch before each step, the step log, and the report callback, which evaluates
   on rank 0 every ``train.eval_interval`` steps and at the end and reports metrics with a
   checkpoint every ``train.checkpoint_interval`` steps, at the end and when a callback stopped
   the loop (``ray.train.report`` from all ranks; rank 0 writes the files).

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
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ffc_ray.config import Config, ConfigError
from ffc_ray.data.batch import StepBatch
from ffc_ray.data.source import WorkerData
from ffc_ray.engine.checkpoint import (
    META_FILE,
    load_checkpoint_state,
    load_head_shard,
    model_checksum,
    pool_checksum,
    rng_state,
    set_rng_state,
    write_checkpoint,
    write_head_shard,
)
from ffc_ray.engine.loop import Callback, LoopState, train_loop
from ffc_ray.engine.trainer import Trainer
from ffc_ray.eval.figures import histogram_image, roc_image
from ffc_ray.eval.sets import SCORE_KEY, evaluate_sets, load_eval_sets
from ffc_ray.pool.actor import index_checksum
from ffc_ray.ray import dist as rdist
from ffc_ray.ray.run_dir import (
    pull_progress,
    push_run_dir,
    staging_dir,
)
from ffc_ray.ray.tb import RunLogger, flat_hparams, process_memory_mb, read_progress

log = logging.getLogger(__name__)

#: score of a checkpoint saved without an evaluation: below any accuracy, and finite (Ray's
#: checkpoint-manager snapshot stores NaN as null, which breaks the ranking on resume)
NOT_EVALUATED = -1.0


# ------------------------------------------------------------------------------------------
# evaluation (rank 0)


def log_eval_figures(logger: RunLogger, step: int, full: dict[str, dict[str, Any]]) -> None:
    """ROC curve and same / different similarity histogram per set, as TensorBoard images."""

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
        return ray.train.torch.get_device()
    if cfg.train.device not in ("auto", "cpu"):
        raise ConfigError(f"config field 'train.device': {cfg.train.device!r} needs ray.use_gpu")
    return torch.device("cpu")


def _ddp_wrap(module: torch.nn.Module) -> torch.nn.Module:

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
    if cfg.has_pool and actor is None:
        raise RuntimeError("train_loop_per_worker: the ffc head needs the pool actor handle")
    ghost = len(data.shard_ids)  # logical shards on this worker (> 1: data-parallel emulation)
    planner = None
    if cfg.has_pool:
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


def _restore(
    trainer: Trainer, planner: Any, data: WorkerData, actor: Any, rank: int
) -> dict[str, Any]:
    """Load Ray Train's latest checkpoint into the trainer (and, rank 0, the actor's index);
    a fresh run resets the actor. Returns what the ``restore`` event records ({} when fresh)."""

    ckpt = ray.train.get_checkpoint()
    info: dict[str, Any] = {}
    if ckpt is None:
        if actor is not None and rank == 0:
            ray.get(actor.reset.remote())
    else:
        with ckpt.as_directory() as d:
            state = load_checkpoint_state(d)
            meta = json.loads((Path(d) / META_FILE).read_text())
            if getattr(trainer.head, "sharded", False):
                state["trainer"].update(load_head_shard(d, rank, dist.get_world_size()))
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
        info = {
            "from_step": int(state["step"]),
            "ckpt_pool_checksum": meta.get("pool_checksum"),
            "ckpt_index_checksum": meta.get("index_checksum"),
            "path": str(ckpt.path),
        }
        if rank == 0:
            info["orphans_removed"] = remove_orphan_checkpoints(Path(ckpt.path), info["from_step"])
        if actor is not None and rank == 0:
            loaded = ray.get(actor.load_state.remote(state["index"], int(state["step"])))
            if meta.get("index_checksum") not in (None, loaded):
                raise RuntimeError(
                    f"{ckpt.path}: the pool actor's index after load_state "
                    "differs from the checkpoint's (checksum mismatch)"
                )
            info["index_checksum"] = loaded
    if planner is not None:
        planner.step = trainer.step
    return info


def remove_orphan_checkpoints(restored: Path, step: int) -> list[str]:
    """Checkpoint folders beside the one Ray Train restored whose step is later: written by a
    driver that died before Ray registered them, never to be restored; removed (local run
    folders only) and returned for the log."""
    if not restored.is_dir():
        return []  # a bucket: Ray Train's own folders there are left as they are
    gone = []
    for d in sorted(restored.parent.glob("checkpoint_*")):
        try:
            later = json.loads((d / META_FILE).read_text())["step"] > step
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours, or unreadable: left alone
        if d != restored and later:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    if gone:
        log.warning("removed checkpoint folders Ray Train never registered: %s", gone)
    return gone


def _start_logger(
    cfg: Config, run_dir: Path, trainer: Trainer, rank: int, world: int, restored: dict
) -> RunLogger:
    """The run's logger (active on rank 0), with the ``restore`` and ``start`` events."""
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
        if restored:
            log.info("restored step %d from %s", start, restored.pop("path"))
            logger.event("restore", **restored, pool_checksums=pool_sums)
        logger.event("start", step=start, world=world, pid=os.getpid())
    rdist.barrier()
    return logger


def _evaluate(trainer: Trainer, vsets: list, cfg: Config, logger: RunLogger) -> dict[str, float]:
    """Rank 0: evaluate every eval set at the trainer's step, log scalars, figures, event."""
    step = trainer.step
    scores, full = evaluate_sets(trainer, vsets, cfg)
    logger.scalars(step, {k: v for k, v in scores.items() if k != SCORE_KEY}, "eval")
    log_eval_figures(logger, step, full)
    logger.event("eval", step=step, **scores)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if k.endswith(("accuracy", "auc")))
    log.info("eval at step %d: %s", step, shown)
    return scores


def _step_metrics(
    metrics: dict[str, Any], planner: Any, world: int, device: torch.device
) -> dict[str, Any]:
    """A step's metrics for the log: losses averaged over ranks, actor timings, throughput of
    the whole group, memory."""
    metrics = _mean_over_ranks(metrics, ("loss", "loss_pos", "loss_neg", "pos_fraction"))
    if planner is not None:
        metrics["actor_latency_ms"] = planner.last_latency_ms
        metrics["actor_wait_ms"] = planner.last_wait_ms
        metrics["actor_compute_ms"] = planner.last_actor_ms
    metrics["images_per_s"] = metrics.get("images_per_s", 0.0) * world
    metrics["memory_mb"] = process_memory_mb()
    if device.type == "cuda":
        metrics["cuda_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return metrics


def _setup_worker(loop_config: dict[str, Any]) -> tuple:
    """(cfg, run folder, run URI, actor, rank, world, device) of this worker, its RNGs seeded
    per rank."""

    cfg = Config.from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    run_uri: str | None = loop_config.get("run_uri")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if run_uri:  # remote run folder: files are written to this node's staging, then uploaded
        run_dir = staging_dir(run_dir, run_uri)
        if rank == 0:
            pull_progress(run_dir, run_uri)
    seed = cfg.train.seed * 1009 + rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    actor = loop_config.get("actor")
    return cfg, run_dir, run_uri, actor, rank, world, _worker_device(cfg)


@dataclass
class _Worker:
    """What one worker's callbacks and its end share."""

    cfg: Config
    data: WorkerData
    logger: RunLogger
    actor: Any
    run_dir: Path
    run_uri: str | None
    rank: int
    world: int


class _Prefetch(Callback):
    """Start the pool actor's plan of the coming step (rank 0 asks, every rank gets the
    slots): the round trip overlaps the EMA and G-Net forward."""

    def __init__(self, planner: Any) -> None:
        self.planner = planner

    def before_step(self, trainer: Trainer, batch: StepBatch) -> None:
        self.planner.step = trainer.step
        self.planner.prefetch(batch.lx.numpy(), batch.ly.numpy())


class _StepLog(Callback):
    """Every step's metrics to the run's log (rank 0 writes)."""

    def __init__(self, logger: RunLogger, planner: Any, world: int, device: torch.device):
        self.logger, self.planner, self.world, self.device = logger, planner, world, device

    def after_step(self, trainer: Trainer, metrics: dict[str, Any], loop: LoopState) -> None:
        m = _step_metrics(metrics, self.planner, self.world, self.device)
        self.logger.step(loop.step, m, {"cpu_s": time.process_time()})


class _Report(Callback):
    """Evaluate (rank 0) every ``train.eval_interval`` steps and at the end; report to Ray
    Train at each evaluation, with a checkpoint every ``train.checkpoint_interval`` steps, at
    the end and when a callback stopped the loop."""

    def __init__(self, w: _Worker, vsets: list) -> None:
        self.w, self.vsets = w, vsets
        self.last_eval: dict[str, float] = {}

    def after_step(self, trainer: Trainer, metrics: dict[str, Any], loop: LoopState) -> None:
        w, t, done = self.w, self.w.cfg.train, loop.step
        end = loop.final or loop.stop
        want_eval = loop.final or done % t.eval_interval == 0
        want_ckpt = end or done % t.checkpoint_interval == 0
        if not (want_eval or want_ckpt):
            return
        if want_eval and w.rank == 0:
            self.last_eval = _evaluate(trainer, self.vsets, w.cfg, w.logger)
        report = {
            "step": done,
            "epoch": w.data.position(done)[0],
            **{k: metrics[k] for k in ("loss", "loss_pos", "loss_neg", "lr") if k in metrics},
            **(self.last_eval if want_eval else {}),
        }
        report.setdefault(SCORE_KEY, NOT_EVALUATED)
        if want_ckpt:
            _report_with_checkpoint(report, trainer, w)
            if w.run_uri and w.rank == 0:
                push_run_dir(w.run_dir, w.run_uri)
        else:
            ray.train.report(report)
        w.logger.flush()


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entry point; ``loop_config`` holds the resolved config dict, run folder, actor
    and the caller's extra loop callbacks (``callbacks``, run before the worker's own)."""
    cfg, run_dir, run_uri, actor, rank, world, device = _setup_worker(loop_config)
    data = WorkerData(cfg, rank, world, cfg.data.shards)
    trainer, planner = build_worker_trainer(cfg, data, world, actor, device)
    restored = _restore(trainer, planner, data, actor, rank)
    logger = _start_logger(cfg, run_dir, trainer, rank, world, restored)
    w = _Worker(cfg, data, logger, actor, run_dir, run_uri, rank, world)
    vsets = load_eval_sets(cfg) if rank == 0 else []
    if trainer.step == 0 and vsets:  # the untrained baseline, for the curves
        _evaluate(trainer, vsets, cfg, logger)
    start = trainer.step
    report = _Report(w, vsets)
    callbacks = [
        *([_Prefetch(planner)] if planner is not None else []),
        *loop_config.get("callbacks", ()),
        _StepLog(logger, planner, world, device),
        report,
    ]
    batches = data.iter_batches(start, cfg.train.steps)
    loop = train_loop(trainer, batches, cfg.train.steps, callbacks)
    batches.close()  # stopped early: end the Ray Data streams' read-ahead now
    summary: dict[str, Any] = {"start_step": start}
    if loop.stop:
        summary["stopped_at"] = loop.step
    return _finish(w, trainer, report.last_eval, summary)


def _finish(
    w: _Worker, trainer: Trainer, last_eval: dict[str, float], summary: dict[str, Any]
) -> dict[str, Any] | None:
    """The end of training: checksums from every rank, the ``end`` event and hparams, the
    last upload; rank 0 returns the run's summary."""
    cfg, logger = w.cfg, w.logger
    pool_sums = rdist.all_gather_strings(pool_checksum(trainer) or "")
    summary["model_checksums"] = rdist.all_gather_strings(model_checksum(trainer))
    summary.update(
        final_step=trainer.step,
        pool_checksums=pool_sums,
        world=w.world,
        torch_threads=torch.get_num_threads(),
        num_classes=w.data.num_classes,
        head_memory_bytes=int(trainer.head.memory_bytes()),
    )
    if w.rank != 0:
        return None
    logger.event("end", step=trainer.step, pool_checksums=pool_sums)
    if trainer.step == cfg.train.steps:
        logger.hparams(
            flat_hparams(cfg.to_dict()),
            {k: v for k, v in last_eval.items() if "/" in k} or {"loss": 0.0},
        )
    logger.close()
    if w.run_uri:
        push_run_dir(w.run_dir, w.run_uri)
    return summary


def _report_with_checkpoint(report: dict[str, Any], trainer: Any, w: _Worker) -> None:
    """All ranks call ``ray.train.report``; rank 0 attaches the checkpoint folder, and with a
    sharded head every rank adds its head file to it (Ray Train merges the folders)."""

    rngs = _gather_objects(rng_state())
    epoch, position = w.data.position(trainer.step)
    with tempfile.TemporaryDirectory(prefix="ffc-ckpt-") as tmp:
        checkpoint = None
        if w.rank == 0:
            index_state, index_sum = None, None
            if w.actor is not None:
                index_state, actor_step = ray.get(w.actor.get_state.remote())
                if actor_step != trainer.step:
                    raise rdist.PoolActorLost(
                        f"pool actor is at step {actor_step} while saving step {trainer.step}"
                    )

                index_sum = index_checksum(index_state)
            meta = write_checkpoint(
                Path(tmp),
                trainer=trainer,
                cfg=w.cfg,
                index_state=index_state,
                index_sum=index_sum,
                rng=rngs,
                epoch=epoch,
                position=position,
                metrics=report,
                num_shards=w.data.num_shards,
            )
        sharded = getattr(trainer.head, "sharded", False)
        if sharded:  # every rank adds its rows
            write_head_shard(Path(tmp), trainer, w.rank, w.world)
        if w.rank == 0 or sharded:
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=checkpoint)
        if w.rank == 0:  # persisted now (Ray registers it with the run right after)
            w.logger.event(
                "checkpoint",
                step=trainer.step,
                pool_checksum=meta["pool_checksum"],
                index_checksum=index_sum,
            )
