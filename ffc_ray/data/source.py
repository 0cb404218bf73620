"""A training worker's data: its logical shards' dual-loader batches, from synthetic
identities or a store (in-process reader, or the Ray Data stream), and the run's identity count.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffc_ray import storage
from ffc_ray.config import Config, ConfigError
from ffc_ray.data.batch import BatchSource, StepBatch, chw_tensor
from ffc_ray.data.types import FaceArrays


def load_train_arrays(cfg: Config) -> FaceArrays:
    """The training images in memory: synthetic identities, or a store read without Ray."""
    if cfg.data.source == "synthetic":
        from ffc_ray.data.synthetic import synthetic_split

        return synthetic_split(cfg.data)[0]
    return open_train_store(cfg).to_arrays()


def open_train_store(cfg: Config) -> Any:
    """The training store; a URI source is synced to this node's cache first."""
    from ffc_ray.data.store import StoreError, open_store

    if storage.is_uri(cfg.data.source):
        try:
            store = open_store(cfg.data.source)
        except StoreError as exc:
            raise ConfigError(f"config field 'data.source': {exc}") from exc
    else:
        if not Path(cfg.data.source).exists():
            raise ConfigError(
                f"config field 'data.source': store {cfg.data.source} does not exist "
                "(write one with `ffc-ray data import`)"
            )
        store = open_store(cfg.data.source)
    if store.image_size != cfg.data.image_size:
        raise ConfigError(
            f"config field 'data.image_size': {cfg.data.image_size} but the store "
            f"{cfg.data.source} holds {store.image_size}px images"
        )
    return store


def num_training_classes(cfg: Config) -> int:
    """Identities in the training set (the pool size is a fraction of it)."""
    if cfg.data.source == "synthetic":
        return cfg.data.num_identities
    return open_train_store(cfg).num_identities


class SyntheticSource:
    """Synthetic identities in memory, for a worker's logical data shards: one
    :class:`~ffc_ray.data.sampling.DualSampler` plan per shard, flips drawn from (seed, epoch,
    position, shard)."""

    def __init__(
        self, cfg: Config, arrays: FaceArrays, shard_ids: list[int], num_shards: int
    ) -> None:
        from ffc_ray.data.sampling import DualSampler

        d = cfg.data
        self.arrays, self.shard_ids, self.flip, self.seed = arrays, shard_ids, d.flip, d.seed
        self.samplers = [
            DualSampler(
                arrays.labels,
                d.instance_batch,
                d.identity_batch,
                seed=d.seed,
                world_size=num_shards,
                rank=s,
            )
            for s in shard_ids
        ]
        self.steps_per_epoch = min(int(s.steps_per_epoch()) for s in self.samplers)
        self._epoch, self._plans = -1, []

    def _plans_of(self, epoch: int) -> list[Any]:
        if epoch != self._epoch:
            self._plans = [s.epoch_plan(epoch) for s in self.samplers]
            self._epoch = epoch
        return self._plans

    def _flips(self, epoch: int, pos: int, shard: int, n: int) -> np.ndarray:
        if not self.flip:
            return np.zeros(n, bool)
        return np.random.default_rng([self.seed, 7, epoch, pos, shard]).random(n) < 0.5

    def batch(self, step: int) -> StepBatch:
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        parts = []
        for shard, plan in zip(self.shard_ids, self._plans_of(epoch)):
            xi, yi = plan.x[pos], plan.y[pos]
            fl = self._flips(epoch, pos, shard, 2 * len(xi))
            x = chw_tensor(self.arrays.images[xi], fl[: len(xi)])
            y = chw_tensor(self.arrays.images[yi], fl[len(xi) :])
            lx, ly = (torch.from_numpy(self.arrays.labels[i]) for i in (xi, yi))
            parts.append(StepBatch(x, lx, y, ly, epoch, pos, xi, yi))
        return StepBatch.cat(parts)

    def labels(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        plans = self._plans_of(epoch)  # cached: a replay asks for every step of an epoch
        lab = self.arrays.labels
        return np.concatenate([lab[p.x[pos]] for p in plans]), np.concatenate(
            [lab[p.y[pos]] for p in plans]
        )

    def iter_batches(self, start: int, stop: int) -> Iterator[StepBatch]:
        return (self.batch(step) for step in range(start, stop))


class ReaderSource:
    """A store read in this process, for a worker's logical data shards: one
    :class:`~ffc_ray.data.reader.StoreDualReader` per shard (the Ray Data stream's rows, seeds
    and decoding)."""

    def __init__(self, cfg: Config, shard_ids: list[int], num_shards: int) -> None:
        from ffc_ray.data.reader import StoreDualReader

        self.readers = [
            StoreDualReader.from_config(cfg, world_size=num_shards, rank=s) for s in shard_ids
        ]
        self.steps_per_epoch = min(r.steps_per_epoch() for r in self.readers)

    def batch(self, step: int) -> StepBatch:
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        return StepBatch.cat([r.batch(epoch, pos) for r in self.readers])

    def labels(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        lx, ly = [], []
        for r in self.readers:
            plan, lab = r.spec.plan(epoch), r.store.labels
            lx.append(lab[plan.x[pos]])
            ly.append(lab[plan.y[pos]])
        return np.concatenate(lx), np.concatenate(ly)

    def iter_batches(self, start: int, stop: int) -> Iterator[StepBatch]:
        return (self.batch(step) for step in range(start, stop))


class WorkerData:
    """This worker's dual-loader batches, from logical data shards.

    The sampler is split into ``shards`` logical shards (default: one per worker); a worker
    holds ``shards / world`` consecutive shards and concatenates their batches. So one worker
    with ``shards=2`` sees exactly the global batch that two workers see together, in the
    same (gather) order: the reference for the data-parallel equivalence test.

    The batches come from one :class:`~ffc_ray.data.batch.BatchSource`: synthetic identities
    (:class:`SyntheticSource`), or a store read in this process (:class:`ReaderSource`,
    ``data.loader: reader``) or streamed by Ray Data
    (:class:`~ffc_ray.data.stream.StreamSource`, ``data.loader: ray_data``, the default; the
    same rows and values). All are functions of (seed, epoch, shard, position) only, so a
    resumed run reads exactly what the uninterrupted run would have read. :meth:`batch` and
    :meth:`labels` give any step directly (tests, replays), from the in-process source.
    """

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world: int,
        shards: int | None = None,
        arrays: FaceArrays | None = None,
    ) -> None:
        shards = int(shards or world)
        if shards % world:
            raise ValueError(f"data shards ({shards}) must be a multiple of the workers ({world})")
        per = shards // world
        self.shard_ids = list(range(rank * per, (rank + 1) * per))
        self.num_shards = shards
        self.local: SyntheticSource | ReaderSource
        if cfg.data.source == "synthetic":
            arrays = arrays if arrays is not None else load_train_arrays(cfg)
            self.local = SyntheticSource(cfg, arrays, self.shard_ids, shards)
            self.num_classes = arrays.num_classes
        else:
            self.num_classes = open_train_store(cfg).num_identities
            self.local = ReaderSource(cfg, self.shard_ids, shards)
        self.steps_per_epoch = self.local.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                "config field 'data.instance_batch': the training set gives no full "
                f"step per epoch on {shards} data shards; lower the batch"
            )
        self.source: BatchSource = self.local
        if cfg.data.source != "synthetic" and cfg.data.loader == "ray_data":
            from ffc_ray.data.stream import StreamSource

            self.source = StreamSource(cfg, self.shard_ids, shards, self.steps_per_epoch)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a 0-based global step: the sampler position."""
        return divmod(int(step), self.steps_per_epoch)

    def batch(self, step: int) -> StepBatch:
        """This worker's batch of 0-based global ``step`` (its shards' batches in shard order)."""
        return self.local.batch(step)

    def labels(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Only the (x, y) labels of ``step`` (no image work; for replays)."""
        return self.local.labels(step)

    def iter_batches(self, start: int, stop: int) -> Iterator[StepBatch]:
        """The batches of global steps ``start .. stop - 1``, from the run's source."""
        return self.source.iter_batches(start, stop)


def replay_pool_index(cfg: Config, steps: int, world: int | None = None) -> Any:
    """A :class:`PoolIndex` replayed over the first ``steps`` steps of all ranks' labels, in
    gather order: what the run's actor must hold after ``steps`` steps (tests, audits)."""
    from ffc_ray.pool.index import PoolIndex
    from ffc_ray.pool.plan import plan_step

    world = int(world or max(1, cfg.ray.num_workers))
    data = WorkerData(cfg, 0, 1, shards=world)  # all shards in one place = gather order
    index = PoolIndex(cfg.pool_capacity(data.num_classes), cfg.pool.policy, data.num_classes)
    for step in range(steps):
        lx, ly = data.labels(step)
        if cfg.head.symmetric:
            plan_step(index, ly, lx, lx, ly)
        else:
            plan_step(index, np.empty(0, np.int64), np.empty(0, np.int64), lx, ly)
    return index
