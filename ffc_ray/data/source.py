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


class WorkerData:
    """This worker's dual-loader batches, from logical data shards.

    The sampler is split into ``shards`` logical shards (default: one per worker); a worker
    holds ``shards / world`` consecutive shards and concatenates their batches. So one worker
    with ``shards=2`` sees exactly the global batch that two workers see together, in the
    same (gather) order: the reference for the data-parallel equivalence test.

    Synthetic data: in-memory arrays, :class:`~ffc_ray.data.sampling.DualSampler` plans, flips
    drawn from (seed, epoch, position, shard). A store: the non-Ray
    :class:`~ffc_ray.data.reader.StoreDualReader` per shard (same rows, seeds and decoding as the
    Ray Data stream). Both are functions of (seed, epoch, shard, position) only, so a resumed
    run reads exactly what the uninterrupted run would have read.
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
        self.cfg = cfg
        self.shard_ids = list(range(rank * per, (rank + 1) * per))
        self.num_shards = shards
        self.arrays: FaceArrays | None = None
        self.readers: list[Any] = []
        self.samplers: list[Any] = []
        if cfg.data.source == "synthetic":
            from ffc_ray.data.sampling import DualSampler

            self.arrays = arrays if arrays is not None else load_train_arrays(cfg)
            self.samplers = [
                DualSampler(
                    self.arrays.labels,
                    cfg.data.instance_batch,
                    cfg.data.identity_batch,
                    seed=cfg.data.seed,
                    world_size=shards,
                    rank=s,
                )
                for s in self.shard_ids
            ]
            self.steps_per_epoch = min(int(s.steps_per_epoch()) for s in self.samplers)
            self._num_classes = self.arrays.num_classes
        else:
            from ffc_ray.data.reader import StoreDualReader

            store = open_train_store(cfg)
            self.readers = [
                StoreDualReader.from_config(cfg, world_size=shards, rank=s) for s in self.shard_ids
            ]
            self.steps_per_epoch = min(r.steps_per_epoch() for r in self.readers)
            self._num_classes = store.num_identities
        if self.steps_per_epoch < 1:
            raise ConfigError(
                "config field 'data.instance_batch': the training set gives no full "
                f"step per epoch on {shards} data shards; lower the batch"
            )
        self._epoch = -1
        self._plans: list[Any] = []

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a 0-based global step: the sampler position."""
        return divmod(int(step), self.steps_per_epoch)

    def _flip(self, epoch: int, pos: int, shard: int, n: int) -> np.ndarray:
        if not self.cfg.data.flip:
            return np.zeros(n, bool)
        rng = np.random.default_rng([self.cfg.data.seed, 7, epoch, pos, shard])
        return rng.random(n) < 0.5

    def batch(self, step: int) -> tuple[Any, np.ndarray, Any, np.ndarray]:
        """(x, x labels, y, y labels) of this worker for 0-based global ``step``: uint8 arrays
        (synthetic) or normalised float tensors (store)."""
        epoch, pos = self.position(step)
        if self.readers:
            parts = [r.batch(epoch, pos) for r in self.readers]
            return (
                torch.cat([b.x for b in parts]),
                np.concatenate([b.lx.numpy() for b in parts]),
                torch.cat([b.y for b in parts]),
                np.concatenate([b.ly.numpy() for b in parts]),
            )
        from ffc_ray.data.transforms import flip_batch

        assert self.arrays is not None
        if epoch != self._epoch:
            self._plans = [s.epoch_plan(epoch) for s in self.samplers]
            self._epoch = epoch
        xs, lxs, ys, lys = [], [], [], []
        for shard, plan in zip(self.shard_ids, self._plans):
            xi, yi = plan.x[pos], plan.y[pos]
            fl = self._flip(epoch, pos, shard, 2 * len(xi))
            xs.append(flip_batch(self.arrays.images[xi], fl[: len(xi)]))
            ys.append(flip_batch(self.arrays.images[yi], fl[len(xi) :]))
            lxs.append(self.arrays.labels[xi])
            lys.append(self.arrays.labels[yi])
        return np.concatenate(xs), np.concatenate(lxs), np.concatenate(ys), np.concatenate(lys)

    def iter_batches(
        self, start: int, stop: int, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[Any, np.ndarray, Any, np.ndarray]]:
        """:meth:`batch` for the global steps ``start .. stop - 1``.

        A store with ``data.loader: ray_data`` (the default) is streamed by Ray Data read /
        decode tasks (:func:`ffc_ray.data.stream.iter_worker_steps`, the same rows and values
        as the in-worker reader); otherwise the batches are made here, step by step.
        """
        if self.readers and self.cfg.data.loader == "ray_data" and stop > start:
            from ffc_ray.data.stream import iter_worker_steps

            yield from iter_worker_steps(
                self.cfg,
                self.shard_ids,
                self.num_shards,
                start,
                stop - start,
                device,
                steps_per_epoch=self.steps_per_epoch,  # known already: no second sampler pass
            )
            return
        for step in range(start, stop):
            yield self.batch(step)

    def labels(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Only the (x, y) labels of ``step`` (no image work; for replays)."""
        epoch, pos = self.position(step)
        if self.readers:
            lx, ly = [], []
            for r in self.readers:
                plan = r.spec.plan(epoch)
                lab = r.store.labels
                lx.append(lab[plan.x[pos]])
                ly.append(lab[plan.y[pos]])
            return np.concatenate(lx), np.concatenate(ly)
        assert self.arrays is not None
        plans = [s.epoch_plan(epoch) for s in self.samplers]
        return (
            np.concatenate([self.arrays.labels[p.x[pos]] for p in plans]),
            np.concatenate([self.arrays.labels[p.y[pos]] for p in plans]),
        )


def replay_pool_index(cfg: Config, steps: int, world: int | None = None) -> Any:
    """A :class:`PoolIndex` replayed over the first ``steps`` steps of all ranks' labels, in
    gather order: what the run's actor must hold after ``steps`` steps (tests, audits)."""
    from ffc_ray.pool.index import PoolIndex, plan_step

    world = int(world or max(1, cfg.ray.num_workers))
    data = WorkerData(cfg, 0, 1, shards=world)  # all shards in one place = gather order
    index = PoolIndex(cfg.pool_capacity(data.num_classes), cfg.pool.policy)
    for step in range(steps):
        lx, ly = data.labels(step)
        if cfg.head.symmetric:
            plan_step(index, ly, lx, lx, ly)
        else:
            plan_step(index, np.empty(0, np.int64), np.empty(0, np.int64), lx, ly)
    return index
