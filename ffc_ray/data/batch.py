"""The step-batch contract between the data sources and the train step.

Every source (synthetic identities in memory, the in-process store reader, the Ray Data
stream) yields :class:`StepBatch`: both views as uint8 ``[B, 3, S, S]`` tensors, int64 labels
on the CPU (the pool planner works on them there) and where the batch came from.
:func:`normalize` turns the images into the network's input on the device, after the
transfer, so a step moves a quarter of float32's bytes to the GPU; it is the only
normalisation in the project (training, evaluation, embedding).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ffc_ray.data.transforms import to_chw

#: ``(x - MEAN) / STD`` per channel, as InsightFace's arcface_torch and the official FFC code.
MEAN, STD = 127.5, 128.0


def normalize(
    images: torch.Tensor, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 images ``[B, 3, S, S]`` -> ``(x - 127.5) / 128`` as ``dtype`` on ``device``.

    Moved first, normalised there. Computed as ``x / 128 - 127.5 / 128`` in float32: every term
    is exact and the difference is a multiple of 1/256 below 1, so the result equals
    ``(x - 127.5) / 128`` exactly, on any device. Float images are taken as normalised already
    and only moved and cast.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, S, S], got {tuple(images.shape)}")
    t = images.to(device, non_blocking=True)
    if t.dtype == torch.uint8:
        t = t.to(torch.float32).mul_(1.0 / STD).sub_(MEAN / STD)
    elif not t.is_floating_point():
        raise ValueError(f"images must be uint8 or float, got {t.dtype}")
    return t.to(dtype)


def chw_tensor(images_hwc: np.ndarray, flip: np.ndarray | None = None) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` arrays (images in memory, evaluation sets) -> a uint8
    ``[B, 3, S, S]`` tensor, rows mirrored where ``flip``."""
    images_hwc = np.asarray(images_hwc)
    if images_hwc.dtype != np.uint8 or images_hwc.ndim != 4 or images_hwc.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 [B, S, S, 3], got {images_hwc.dtype} {images_hwc.shape}"
        )
    return torch.from_numpy(to_chw(images_hwc, flip))


@dataclass
class StepBatch:
    """One step's views for one worker: x = I + III, y = II + IV (uint8 ``[B, 3, S, S]``),
    their int64 labels, and where they came from (epoch, step within it, image indices)."""

    x: torch.Tensor
    lx: torch.Tensor
    y: torch.Tensor
    ly: torch.Tensor
    epoch: int
    step: int
    ix: np.ndarray
    iy: np.ndarray

    def __iter__(self) -> Iterator[torch.Tensor]:
        """``x, lx, y, ly``: the arguments of ``Trainer.train_step``."""
        return iter((self.x, self.lx, self.y, self.ly))

    @staticmethod
    def cat(parts: Sequence[StepBatch]) -> StepBatch:
        """Several data shards' batches of one step as one, in shard order."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return StepBatch(
            torch.cat([b.x for b in parts]),
            torch.cat([b.lx for b in parts]),
            torch.cat([b.y for b in parts]),
            torch.cat([b.ly for b in parts]),
            first.epoch,
            first.step,
            np.concatenate([b.ix for b in parts]),
            np.concatenate([b.iy for b in parts]),
        )


class BatchSource(Protocol):
    """What a worker trains from: ``steps_per_epoch`` and the batches of global steps
    ``[start, stop)``, a function of (seed, epoch, shard, position) only, so a resumed run reads
    what the uninterrupted run would have read."""

    steps_per_epoch: int

    def iter_batches(self, start: int, stop: int) -> Iterator[StepBatch]: ...
