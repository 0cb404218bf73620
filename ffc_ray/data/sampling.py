"""Dual-loader sampling plan (pure numpy): instance stream + identity-pair stream.

Why (paper sec. 3.3, official ``main.py``): the DCP only yields positives for probes whose
identity is in the pool, so every step carries an *identity batch* — identities with two
distinct images, one per view — next to the ordinary *instance batch*. Per step and rank:

* instance batch of ``instance_batch`` images, split into halves I and II;
* identity batch of ``identity_batch`` identities, image 1 of each in III, image 2 in IV;
* views ``x = I + III`` and ``y = II + IV`` (the instance : identity ratio is the paper's
  table 5).

Instance stream: every image once per epoch, shuffled with a per-epoch seed, split into
disjoint per-rank shares, ``drop_last``. Identity stream: identities with >= 2 images, each once
per *identity epoch* (without replacement), two distinct random images each, reshuffled every
identity epoch; it runs as long as the instance stream needs and continues into the next
identity epoch when exhausted (the official loader restarts its identity loader with the same
order every time; here each restart is reshuffled). Incomplete global identity batches at the
end of an identity epoch are dropped, so no identity appears twice in one step.

Everything is a pure function of ``(seed, epoch, rank)``: the identity stream position of an
instance epoch is ``epoch * steps_per_epoch``, so a resumed run reproduces the plan exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_INSTANCE, _IDENTITY = 0, 1  # generator streams


@dataclass(frozen=True)
class EpochPlan:
    """Image indices of one epoch for one rank.

    ``x`` / ``y``: int64 [S, V]; columns ``[:instance_per_view]`` are the instance halves (I in
    ``x``, II in ``y``), the rest the identity part (III in ``x``, IV in ``y``: column ``j`` of
    both holds two distinct images of the same identity).
    """

    x: np.ndarray
    y: np.ndarray
    epoch: int = 0
    instance_per_view: int = 0

    @property
    def steps(self) -> int:
        return int(self.x.shape[0])

    @property
    def view_batch(self) -> int:
        return int(self.x.shape[1])


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"DualSampler: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class DualSampler:
    """Per-epoch dual-loader plans for one rank (see the module docstring)."""

    def __init__(
        self,
        labels: np.ndarray,
        instance_batch: int,
        identity_batch: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(
                f"DualSampler: labels must be a 1-D integer array, got "
                f"{labels.dtype} {labels.shape}"
            )
        if labels.size == 0:
            raise ValueError("DualSampler: labels is empty")
        if labels.min() < 0:
            raise ValueError(f"DualSampler: labels must be >= 0, found {int(labels.min())}")
        self.instance_batch = _check_count("instance_batch", instance_batch, 0)
        self.identity_batch = _check_count("identity_batch", identity_batch, 0)
        self.seed = _check_count("seed", seed, 0)
        self.world_size = _check_count("world_size", world_size, 1)
        self.rank = _check_count("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"DualSampler: rank {rank} is not below world_size {world_size}")
        if self.instance_batch % 2:
            raise ValueError(
                f"DualSampler: instance_batch must be even (halves I and II), got {instance_batch}"
            )
        if self.instance_batch + self.identity_batch == 0:
            raise ValueError("DualSampler: instance_batch and identity_batch are both 0")

        self.labels = labels.astype(np.int64, copy=False)
        self.num_images = len(labels)
        # images grouped by identity: order[start[i] : start[i] + count[i]] are identity i's
        self._order = np.argsort(self.labels, kind="stable")
        ids, self._start, self._count = np.unique(
            self.labels[self._order], return_index=True, return_counts=True
        )
        self.identities = ids
        self._pair_ids = np.flatnonzero(self._count >= 2)  # positions in `ids`
        self.num_identities = len(ids)
        self.num_pair_identities = len(self._pair_ids)
        self.num_excluded_identities = self.num_identities - self.num_pair_identities

        n_inst = self.instance_batch * self.world_size
        if n_inst > self.num_images:
            raise ValueError(
                f"DualSampler: instance_batch {instance_batch} x world_size {world_size} = "
                f"{n_inst} exceeds the {self.num_images} images"
            )
        n_id = self.identity_batch * self.world_size
        if n_id > self.num_pair_identities:
            raise ValueError(
                f"DualSampler: identity_batch {identity_batch} x world_size {world_size} = {n_id} "
                f"exceeds the {self.num_pair_identities} identities with >= 2 images "
                f"({self.num_excluded_identities} single-image identities excluded)"
            )
        if self.num_excluded_identities:
            log.info(
                "identity stream: %d of %d identities have a single image and are excluded "
                "(they stay in the instance stream)",
                self.num_excluded_identities,
                self.num_identities,
            )

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def view_batch(self) -> int:
        """Images per view per step: I + III."""
        return self.instance_batch // 2 + self.identity_batch

    def identity_steps_per_epoch(self) -> int:
        """Full global identity batches in one identity epoch (0 without an identity part)."""
        if self.identity_batch == 0:
            return 0
        return self.num_pair_identities // (self.identity_batch * self.world_size)

    def steps_per_epoch(self) -> int:
        """Steps of an (instance) epoch; an identity-only sampler uses identity epochs."""
        if self.instance_batch == 0:
            return self.identity_steps_per_epoch()
        return self.num_images // (self.instance_batch * self.world_size)

    # ---- plans -----------------------------------------------------------------------------
    def _rng(self, stream: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, int(epoch)])

    def _instance_part(self, epoch: int, steps: int) -> np.ndarray:
        """[S, instance_batch] image indices of this rank (all ranks share one permutation)."""
        perm = self._rng(_INSTANCE, epoch).permutation(self.num_images)
        per_step = self.instance_batch * self.world_size
        grid = perm[: steps * per_step].reshape(steps, self.world_size, self.instance_batch)
        return grid[:, self.rank]

    def identity_epoch(self, id_epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Identity epoch ``id_epoch`` for all ranks: images 1 and 2, each
        [B, world_size, identity_batch] (B full global batches), from one permutation of the
        identities with >= 2 images."""
        rng = self._rng(_IDENTITY, id_epoch)
        ids = self._pair_ids[rng.permutation(self.num_pair_identities)]
        cnt, st = self._count[ids], self._start[ids]
        a = (rng.random(len(ids)) * cnt).astype(np.int64)
        b = (rng.random(len(ids)) * (cnt - 1)).astype(np.int64)
        b += b >= a  # a second image, distinct from the first
        img1, img2 = self._order[st + a], self._order[st + b]
        n_b = self.identity_steps_per_epoch()
        shape = (n_b, self.world_size, self.identity_batch)
        used = n_b * self.world_size * self.identity_batch
        return img1[:used].reshape(shape), img2[:used].reshape(shape)

    def _identity_part(self, epoch: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """[S, identity_batch] images 1 and 2 of this rank, continuing the identity stream."""
        if self.identity_batch == 0:
            empty = np.zeros((steps, 0), np.int64)
            return empty, empty.copy()
        per_id_epoch = self.identity_steps_per_epoch()
        g = epoch * steps + np.arange(steps, dtype=np.int64)  # global identity-step counter
        e_of, pos = g // per_id_epoch, g % per_id_epoch
        out1 = np.empty((steps, self.identity_batch), np.int64)
        out2 = np.empty_like(out1)
        for e in np.unique(e_of):
            sel = np.flatnonzero(e_of == e)
            i1, i2 = self.identity_epoch(int(e))
            out1[sel] = i1[pos[sel], self.rank]
            out2[sel] = i2[pos[sel], self.rank]
        return out1, out2

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """This rank's plan of instance epoch ``epoch``: x = I + III, y = II + IV."""
        epoch = _check_count("epoch", epoch, 0)
        steps = self.steps_per_epoch()
        half = self.instance_batch // 2
        if self.instance_batch:
            inst = self._instance_part(epoch, steps)
        else:
            inst = np.zeros((steps, 0), np.int64)
        id1, id2 = self._identity_part(epoch, steps)
        x = np.concatenate([inst[:, :half], id1], axis=1).astype(np.int64, copy=False)
        y = np.concatenate([inst[:, half:], id2], axis=1).astype(np.int64, copy=False)
        return EpochPlan(x=x, y=y, epoch=epoch, instance_per_view=half)
