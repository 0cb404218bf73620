"""Single-process reader of a store, and the pieces it shares with the Ray Data stream.

Both loaders turn the sampler's plan (:class:`ffc_ray.data.sampling.DualSampler`) into the
views of each step, ``x = I + III`` and ``y = II + IV`` (:class:`EpochPlan` rows,
``[S, instance_batch / 2 + identity_batch]``: the instance halves, then column ``j`` of the
identity part holds two distinct images of one identity), with the seeds of :func:`row_seeds`,
and decode them with the functions of :mod:`ffc_ray.data.transforms`; the only difference is
who runs them (this process, or Ray Data tasks). So a single-process run and a Ray run see the
same images, labels and augmentations, bit for bit.

Augmentation randomness is counter-based: the image in view ``v`` (0 = x, 1 = y), column ``c``
of step ``s`` of ``epoch`` on ``rank`` gets the seed ``row_seeds(...)[s, v, c]`` whichever
process decodes it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ffc_ray.data.store import FaceStore, open_store, read_records
from ffc_ray.data.transforms import Augment, decode_augment_chw, mix_seed, splitmix64
from ffc_ray.data.types import FaceArrays

if TYPE_CHECKING:  # torch is imported where tensors are made: Ray Data read tasks never load it
    from ffc_ray.data.batch import StepBatch

log = logging.getLogger(__name__)

_AUG_STREAM = 0xA06  # separates augmentation seeds from any other use of (seed, epoch, rank)


def store_num_classes(path: str | Path) -> int:
    """Identities (labels 0..C-1) in a store."""
    return open_store(path).num_identities


def read_face_arrays(path: str | Path, image_size: int | None = None) -> FaceArrays:
    """A whole store decoded in memory (small stores: LFW, tests, CPU runs).

    ``image_size`` other than the stored size resizes (bilinear), with a log line: stores are
    meant to be imported at the network size.
    """
    store = open_store(path)
    arrays = store.to_arrays()
    if image_size is not None and image_size != store.image_size:
        from ffc_ray.data.pairs import resize_images

        log.info(
            "%s: resizing %d images from %d to %d px (import at the network size to avoid this)",
            store.path,
            len(arrays),
            store.image_size,
            image_size,
        )
        arrays = FaceArrays(resize_images(arrays.images, image_size), arrays.labels, arrays.names)
    return arrays


# ------------------------------------------------------------------------------------------
# plan -> rows (shared with stream.py)


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes one rank's rows: small, hashable and picklable (it travels with
    every Ray read task; the sampler and plans are rebuilt and cached in each process)."""

    store: str
    instance_batch: int
    identity_batch: int
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    augment: Augment = field(default_factory=Augment)

    @classmethod
    def from_config(
        cls, cfg: Any, world_size: int = 1, rank: int = 0, store: str | None = None
    ) -> StreamSpec:
        """From a :class:`ffc_ray.config.Config` (``data.source`` is the store path)."""
        d = cfg.data
        src = str(store or d.source)
        return cls(
            store=src if "://" in src else str(Path(src).absolute()),  # URIs: see store_handle
            instance_batch=int(d.instance_batch),
            identity_batch=int(d.identity_batch),
            seed=int(d.seed),
            world_size=int(world_size),
            rank=int(rank),
            augment=Augment.from_data_config(d),
        )

    def for_rank(self, rank: int) -> StreamSpec:
        return replace(self, rank=rank)

    @property
    def half(self) -> int:
        return self.instance_batch // 2

    @property
    def view_batch(self) -> int:
        return self.half + self.identity_batch

    def store_handle(self) -> FaceStore:
        """The opened store; a URI (``s3://...``) is synced to this node's cache first, once per
        node (:func:`ffc_ray.storage.cached_store`), so read tasks on any node can open it."""
        return open_store(self.store)

    def sampler(self):
        key = (
            self.store,
            self.instance_batch,
            self.identity_batch,
            self.seed,
            self.world_size,
            self.rank,
        )
        s = _SAMPLERS.get(key)
        if s is None:
            from ffc_ray.data.sampling import DualSampler

            s = DualSampler(
                self.store_handle().labels,
                self.instance_batch,
                self.identity_batch,
                seed=self.seed,
                world_size=self.world_size,
                rank=self.rank,
            )
            _SAMPLERS[key] = s
        return s

    def steps_per_epoch(self) -> int:
        return int(self.sampler().steps_per_epoch())

    def plan(self, epoch: int):
        """The sampler's :class:`EpochPlan` for ``epoch`` (a few cached per process)."""
        key = (
            self.store,
            self.instance_batch,
            self.identity_batch,
            self.seed,
            self.world_size,
            self.rank,
            int(epoch),
        )
        p = _PLANS.get(key)
        if p is None:
            p = self.sampler().epoch_plan(int(epoch))
            _PLANS[key] = p
            while len(_PLANS) > 4:
                _PLANS.popitem(last=False)
        return p

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a 0-based global step."""
        return divmod(int(global_step), self.steps_per_epoch())


_SAMPLERS: dict[tuple, Any] = {}
_PLANS: OrderedDict[tuple, Any] = OrderedDict()


def row_seeds(spec: StreamSpec, epoch: int, lo: int, hi: int) -> np.ndarray:
    """Augmentation seeds uint64 [hi - lo, 2, view_batch] for steps lo..hi-1 of ``epoch``."""
    base = np.uint64(mix_seed(spec.seed, _AUG_STREAM, epoch, spec.rank))
    v = spec.view_batch
    steps = np.arange(lo, hi, dtype=np.uint64)[:, None, None]
    views = np.arange(2, dtype=np.uint64)[None, :, None]
    cols = np.arange(v, dtype=np.uint64)[None, None, :]
    counter = (steps * np.uint64(2) + views) * np.uint64(v) + cols
    return splitmix64(splitmix64(counter) ^ base)


def decode_rows(
    store: FaceStore, indices: np.ndarray, seeds: np.ndarray, aug: Augment
) -> np.ndarray:
    """Read, decode and augment image rows: uint8 [B, 3, S, S] (the shared decode path)."""
    keys = store.keys[indices]
    blobs = read_records(store.path, keys, store.shards[indices])
    return decode_augment_chw(
        blobs, seeds, store.image_size, aug, lambda i: store.describe_key(keys[i])
    )


# ------------------------------------------------------------------------------------------
# the single-process reader


class StoreDualReader:
    """Dual-loader batches of one rank from a store, in this process (no Ray).

    Uses the same sampler plan, row layout, seeds and decode function as
    :mod:`ffc_ray.data.stream`, so its batches equal the Ray stream's.
    """

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.store = spec.store_handle()

    @classmethod
    def from_config(cls, cfg: Any, world_size: int = 1, rank: int = 0) -> StoreDualReader:
        return cls(StreamSpec.from_config(cfg, world_size, rank))

    def steps_per_epoch(self) -> int:
        return self.spec.steps_per_epoch()

    def batch(self, epoch: int, step: int) -> StepBatch:
        """The batch of ``step`` (0-based, within ``epoch``)."""
        import torch

        from ffc_ray.data.batch import StepBatch

        spec = self.spec
        plan = spec.plan(epoch)
        seeds = row_seeds(spec, epoch, step, step + 1)[0]
        ix, iy = plan.x[step].astype(np.int64), plan.y[step].astype(np.int64)
        x = decode_rows(self.store, ix, seeds[0], spec.augment)
        y = decode_rows(self.store, iy, seeds[1], spec.augment)
        lab = self.store.labels
        return StepBatch(
            torch.from_numpy(x),
            torch.from_numpy(lab[ix]),
            torch.from_numpy(y),
            torch.from_numpy(lab[iy]),
            int(epoch),
            int(step),
            ix,
            iy,
        )

    def epoch(self, epoch: int) -> Iterator[StepBatch]:
        for s in range(self.steps_per_epoch()):
            yield self.batch(epoch, s)

    def iter_steps(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[StepBatch]:
        """Global steps ``start_step, start_step + 1, ...`` across epochs (resume-friendly)."""
        g = int(start_step)
        while num_steps is None or g < start_step + num_steps:
            e, s = self.spec.position(g)
            yield self.batch(e, s)
            g += 1
