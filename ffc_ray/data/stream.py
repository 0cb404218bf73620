"""Ray Data stream of dual-loader batches from an LMDB store (the only ray import in data/).

Per rank, ONE dataset feeds the worker: ``dual_r<rank>``, a row per step holding both views of
that step as the sampler orders them (``x`` = I + III, ``y`` = II + IV: the instance halves and
the two distinct images of each sampled identity), their labels and image indices. A read task
decodes a few whole steps of both loaders, so the instance and identity streams cannot fall out
of lockstep, and Ray Data runs one execution per rank. (An earlier design read an instance and a
pair dataset per rank in lockstep: measured with benchmarks/data_throughput.py, LFW at 112 px,
the single dataset costs the consuming process about 0.3 CPU-s less per 17664 images; median
images per CPU-second of the whole stream 4654 against 4120.)

:class:`StorePlanDatasource` (Ray Data 2.60 ``Datasource``: ``get_read_tasks(parallelism,
per_task_row_limit=None, data_context=None)`` and ``estimate_inmemory_data_size``) reads the
steps the sampler orders for that rank with the non-Ray reader's functions
(:class:`~ffc_ray.data.reader.StreamSpec` plans and seeds). A read task covers a few steps of
one epoch: it rebuilds the epoch plan from (seed, epoch, rank) in its process (cached there),
fetches the raw records through per-process cached LMDB environments and decodes + augments
them in the same task (the reader's functions from :mod:`ffc_ray.data.transforms`); blocks carry
uint8 images, normalised by the consumer on its device (or float32 normalised in the task,
``normalize=True``). A dataset covers global steps ``[start_step, start_step + num_steps)``
across epochs, so resuming at a step is exact.

Why one dataset per rank, not one dataset split across ranks: a split hands blocks to whichever
rank asks first, so a rank's rows would not be the sampler's rows for that rank. Each rank's
dataset is iterated in sampler order (``preserve_order=True``), without a cross-rank barrier.

Where the executor runs: a worker iterates its dataset through ``streaming_split(1)``, the
public way to run Ray Data's streaming executor in a coordinator actor of its own (one split:
every block, in order, to this worker). Iterated directly, the executor's scheduling thread
runs inside the training process; in Ray 2.60 it turns without waiting while the consumer is
behind and convoys on the GIL with the training thread (LFW FFC at 64 px: 1.3 s per step
against 0.40 s with the in-worker reader). See docs/reference.md 3.4.

CPU: Ray Data tasks ask for ``read_cpus`` (``cfg.data.read_cpus``, 0.25 by default) so that on
a 2-CPU machine two training workers at 0.5 CPU each leave room for four read tasks; with the
default of 1 CPU per task they could wait forever (docs/reference.md 3.3).

Training builds the datasets in the worker (:func:`iter_worker_steps`); with datasets handed to
a TorchTrainer (:func:`build_stream_datasets`): ``for batch in worker_dual_batches(spec):
trainer.train_step(*batch.tensors())``.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from ffc_ray.data.reader import DualBatch, StreamSpec, row_seeds
from ffc_ray.data.store import read_records
from ffc_ray.data.transforms import decode_augment_chw, decode_augment_normalize

if TYPE_CHECKING:  # the consumer functions import torch: a read task's process never loads it
    import torch

log = logging.getLogger(__name__)

#: default images per read task (one block): a few whole steps. Measured with
#: benchmarks/data_throughput.py's setup (LFW, 112 px, one task at a time, 2 cores), images per
#: CPU-second of the whole stream: 8 steps of 64 + 64 images (1024) 4211, 16 steps (2048) 4654.
IMAGES_PER_TASK = 2048


def dataset_name(rank: int) -> str:
    """The TorchTrainer dataset name of a rank's stream."""
    return f"dual_r{int(rank)}"


def _chunks(
    spec: StreamSpec, start_step: int, num_steps: int, steps_per_task: int
) -> list[tuple[int, int, int]]:
    """(epoch, lo, hi) pieces of global steps [start, start + num), never across an epoch."""
    spe = spec.steps_per_epoch()
    if spe < 1:
        raise ValueError(
            f"{spec.store}: the sampler gives no full step per epoch for rank "
            f"{spec.rank} of {spec.world_size}; lower the batch sizes"
        )
    out = []
    g, end = start_step, start_step + num_steps
    while g < end:
        epoch, s = divmod(g, spe)
        hi = min(spe, s + steps_per_task, s + (end - g))
        out.append((epoch, s, hi))
        g += hi - s
    return out


def _read_chunk(spec: StreamSpec, epoch: int, lo: int, hi: int, normalize: bool) -> list[Any]:
    """Read task body: steps lo..hi-1 of ``epoch`` for ``spec``'s rank, a row each.

    Columns: ``x`` / ``y`` images [n, V, 3, S, S] (uint8, or float32 normalised when
    ``normalize``; the sampler's ``plan.x`` / ``plan.y`` rows with the reader's seeds),
    ``lx`` / ``ly`` labels and ``ix`` / ``iy`` store indices [n, V], ``epoch`` and ``step``
    [n]. Decoding here, not in a ``map_batches`` after the read, spares a binary column, its
    conversion to Python objects and a second operator.
    """
    store = spec.store_handle()
    plan, size = spec.plan(epoch), store.image_size
    seeds = row_seeds(spec, epoch, lo, hi)
    n, v = hi - lo, plan.view_batch
    batch: dict[str, np.ndarray] = {}
    for view, rows, sd in (("x", plan.x[lo:hi], seeds[:, 0]), ("y", plan.y[lo:hi], seeds[:, 1])):
        idx = rows.reshape(-1).astype(np.int64)
        keys = store.keys[idx]
        blobs = read_records(store.path, keys, store.shards[idx])
        images = _prepare(blobs, sd.reshape(-1), keys, spec, size, normalize)
        batch[view] = images.reshape(n, v, *images.shape[1:])
        batch["l" + view] = store.labels[idx].astype(np.int64).reshape(n, v)
        batch["i" + view] = idx.reshape(n, v)
    batch["epoch"] = np.full(n, epoch, dtype=np.int64)
    batch["step"] = np.arange(lo, hi, dtype=np.int64)
    return [BlockAccessor.batch_to_block(batch)]


class StorePlanDatasource(Datasource):
    """Steps [start, start + num) of one rank's dual stream, a row per step.

    Each read task is a few steps of one epoch (``steps_per_task``), small to pickle: the
    plan is recomputed from the spec in the task's process and cached there.
    """

    def __init__(
        self,
        spec: StreamSpec,
        start_step: int,
        num_steps: int,
        steps_per_task: int = 4,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.start_step = int(start_step)
        self.num_steps = int(num_steps)
        self.steps_per_task = max(1, int(steps_per_task))
        self.normalize = bool(normalize)
        self._bytes_per_step: int | None = None

    def get_name(self) -> str:
        return "StoreSteps"

    def _step_bytes(self) -> int:
        """Bytes of one step's decoded images in a block (what the object store holds)."""
        if self._bytes_per_step is None:
            size = self.spec.store_handle().image_size
            per_image = 3 * size * size * (4 if self.normalize else 1)
            self._bytes_per_step = 2 * self.spec.view_batch * per_image
        return self._bytes_per_step

    def estimate_inmemory_data_size(self) -> int | None:
        return int(self.num_steps * self._step_bytes())

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: Any | None = None,
    ) -> list[ReadTask]:
        # Task boundaries follow steps, not ``parallelism``: each task is a few whole steps,
        # which keeps blocks in step order and task payloads tiny.
        tasks = []
        for epoch, lo, hi in _chunks(
            self.spec, self.start_step, self.num_steps, self.steps_per_task
        ):
            meta = BlockMetadata(
                num_rows=hi - lo,
                size_bytes=int((hi - lo) * self._step_bytes()),
                exec_stats=None,
                input_files=None,
            )
            spec, norm = self.spec, self.normalize
            tasks.append(
                ReadTask(
                    lambda spec=spec, epoch=epoch, lo=lo, hi=hi, norm=norm: _read_chunk(
                        spec, epoch, lo, hi, norm
                    ),
                    meta,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


def _prepare(
    blobs: list,
    seeds: np.ndarray,
    keys: np.ndarray,
    spec: StreamSpec,
    size: int,
    normalize: bool,
) -> np.ndarray:
    def source(i: int) -> str:  # built only for a record that fails to decode
        return f"{spec.store} key {bytes(keys[i]).decode('ascii', 'replace')}"

    if normalize:
        return decode_augment_normalize(blobs, seeds, size, spec.augment, source)
    # uint8 [B, 3, S, S]: the same steps, the normalisation left to the consumer
    return decode_augment_chw(blobs, seeds, size, spec.augment, source)


def build_rank_dataset(
    spec: StreamSpec,
    num_steps: int,
    start_step: int = 0,
    read_cpus: float = 0.25,
    steps_per_task: int | None = None,
    concurrency: int | None = None,
    normalize: bool = False,
) -> ray.data.Dataset:
    """One rank's dataset of global steps ``[start_step, start_step + num_steps)``: read tasks
    that read, decode and augment both views of a few steps.

    Each task asks for ``read_cpus`` and makes one block of ``steps_per_task`` steps (default:
    about ``IMAGES_PER_TASK`` images). By default (``normalize=False``) the blocks carry uint8
    [V, 3, S, S] views (4x fewer bytes through the object store and to the GPU than float32)
    and :func:`iter_step_batches` normalises on the consumer's device, to the same values;
    ``normalize=True`` ships float32 normalised in the task.
    """
    if steps_per_task is None:
        steps_per_task = max(1, IMAGES_PER_TASK // max(1, 2 * spec.view_batch))
    spec.store_handle()  # a missing or broken store fails here, in the caller
    src = StorePlanDatasource(spec, start_step, num_steps, steps_per_task, normalize)
    # override_num_blocks = our task count: Ray Data would otherwise split small reads into
    # more blocks than there are steps' worth of tasks
    n_tasks = len(_chunks(spec, int(start_step), int(num_steps), src.steps_per_task))
    ds = ray.data.read_datasource(
        src, num_cpus=read_cpus, concurrency=concurrency, override_num_blocks=max(1, n_tasks)
    )
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return ds


def build_stream_datasets(
    spec: StreamSpec,
    num_steps: int,
    start_step: int = 0,
    read_cpus: float = 0.25,
    steps_per_task: int | None = None,
    concurrency: int | None = None,
    normalize: bool = False,
) -> dict[str, ray.data.Dataset]:
    """The datasets for ``TorchTrainer(datasets=...)``: ``dual_r<r>`` for every rank
    ``r < spec.world_size`` (read in the worker by :func:`worker_dual_batches`).

    Pass :func:`stream_data_config` as ``dataset_config`` so Ray Train leaves them unsplit and
    in order.
    """
    return {
        dataset_name(r): build_rank_dataset(
            spec.for_rank(r),
            num_steps,
            start_step,
            read_cpus,
            steps_per_task,
            concurrency,
            normalize,
        )
        for r in range(spec.world_size)
    }


def build_stream_from_config(
    cfg: Any, world_size: int, num_steps: int | None = None, start_step: int = 0
) -> tuple[StreamSpec, dict[str, Any]]:
    """(spec, datasets) for a :class:`ffc_ray.config.Config` whose ``data.source`` is a store;
    ``num_steps`` defaults to ``train.steps - start_step``."""
    spec = StreamSpec.from_config(cfg, world_size=world_size, rank=0)
    steps = int(cfg.train.steps) - start_step if num_steps is None else int(num_steps)
    return spec, build_stream_datasets(spec, steps, start_step, read_cpus=cfg.data.read_cpus)


def stream_data_config():
    """``ray.train.DataConfig`` for these datasets: unsplit (one per rank), order kept."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))


def _images_to_tensor(images: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A view's images from a (read-only) block into a fresh tensor on ``dev``, normalising
    uint8 blocks.

    On the CPU, uint8 images are converted straight into the float output and normalised with
    one fused ``-127.5/128 + x/128`` (x/128 is exact for 0..255, so the result is bit-equal to
    numpy's ``x / 128 - 127.5 / 128``): two passes over the floats instead of four.
    """
    import torch

    if dev.type != "cpu" or images.dtype != np.uint8:
        t = torch.from_numpy(images.copy()).to(dev, non_blocking=True)  # blocks are read-only
        if t.dtype == torch.uint8:  # (x - 127.5) / 128 on the device, exactly as numpy
            t = t.to(torch.float32).mul_(1.0 / 128.0).sub_(127.5 / 128.0)
        return t
    out = torch.empty(images.shape, dtype=torch.float32)
    with warnings.catch_warnings():  # a read-only block view, only read here
        warnings.simplefilter("ignore", UserWarning)
        out.copy_(torch.from_numpy(images))
    return torch.add(_shift(), out, alpha=1.0 / 128.0, out=out)


@functools.cache
def _shift() -> torch.Tensor:
    """The constant -127.5/128 as a float32 tensor (made once, on first use)."""
    import torch

    return torch.tensor(-127.5 / 128.0, dtype=torch.float32)


def iter_step_batches(
    spec: StreamSpec,
    it: Any,
    device: torch.device | str = "cpu",
    prefetch_batches: int = 2,
    labels_on_cpu: bool = False,
) -> Iterator[DualBatch]:
    """Read a rank's stream (:func:`build_rank_dataset`: a row per step) into :class:`DualBatch`.

    ``it``: a Ray ``DataIterator`` or ``Dataset``; ``prefetch_batches`` counts blocks. Each
    step's views are contiguous in their block, so a view is one conversion into a fresh tensor
    on ``device`` (uint8 blocks normalised there), with no concatenation. Steps must follow each
    other (the next step, or step 0 of the next epoch): anything else raises (is
    ``preserve_order`` off?). ``labels_on_cpu`` keeps the labels on the host (the pool planner
    needs them there: no device-to-host sync per step).
    """
    import torch

    dev = torch.device(device)
    label_dev = torch.device("cpu") if labels_on_cpu else dev
    prev: tuple[int, int] | None = None
    for blk in it.iter_batches(
        batch_size=None, batch_format="numpy", drop_last=False, prefetch_batches=prefetch_batches
    ):
        x, y, lx, ly, ix, iy = (blk[k] for k in ("x", "y", "lx", "ly", "ix", "iy"))
        for i, (e, s) in enumerate(zip(blk["epoch"].tolist(), blk["step"].tolist())):
            if prev is not None and (e, s) not in ((prev[0], prev[1] + 1), (prev[0] + 1, 0)):
                raise RuntimeError(
                    f"rank {spec.rank}: the stream went from (epoch, step) {prev} to {(e, s)}: "
                    "steps out of order (is preserve_order off?)"
                )
            prev = (e, s)
            yield DualBatch(
                _images_to_tensor(x[i], dev),  # a copy: blocks are read-only
                torch.from_numpy(np.array(lx[i])).to(label_dev),
                _images_to_tensor(y[i], dev),
                torch.from_numpy(np.array(ly[i])).to(label_dev),
                e,
                s,
                np.array(ix[i]),
                np.array(iy[i]),
            )


def worker_dual_batches(
    spec: StreamSpec, device: torch.device | str = "cpu", prefetch_batches: int = 2
) -> Iterator[DualBatch]:
    """Inside ``train_loop_per_worker``: this rank's batches from the trainer's datasets
    (:func:`build_stream_datasets`)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    ds = ray.train.get_dataset_shard(dataset_name(rank))
    return iter_step_batches(spec.for_rank(rank), ds, device, prefetch_batches)


def iter_worker_steps(
    cfg: Any,
    shard_ids: list[int],
    num_shards: int,
    start_step: int,
    num_steps: int,
    device: torch.device | str = "cpu",
    prefetch_batches: int = 2,
    steps_per_epoch: int | None = None,
) -> Iterator[tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]]:
    """``(x, x labels, y, y labels)`` of a Ray Train worker for global steps ``[start_step,
    start_step + num_steps)``, streamed by Ray Data from the store of ``cfg.data.source``.

    The worker owns the logical data shards ``shard_ids`` of ``num_shards`` (one per worker
    normally; several for the data-parallel emulation); each gets its dual dataset (uint8
    through the object store, normalised on ``device``) and their batches are
    concatenated in shard order, as the in-worker reader does. The datasets are built here, in
    the worker, from the step it starts at, so a worker restarted from a checkpoint streams
    from exactly that step (no replay of what came before). ``steps_per_epoch``: the caller's
    epoch length when it has one (otherwise taken from the shards' samplers).
    """
    import torch

    specs = [StreamSpec.from_config(cfg, world_size=num_shards, rank=s) for s in shard_ids]
    spe = steps_per_epoch or min(sp.steps_per_epoch() for sp in specs)
    streams = []
    for sp in specs:
        ds = build_rank_dataset(sp, num_steps, start_step, read_cpus=float(cfg.data.read_cpus))
        (it,) = ds.streaming_split(1)  # the executor in its own actor, not in this process
        streams.append(iter_step_batches(sp, it, device, prefetch_batches, labels_on_cpu=True))
    for g in range(int(start_step), int(start_step) + int(num_steps)):
        want = divmod(g, spe)
        parts = []
        for sp, it in zip(specs, streams):
            b = next(it, None)
            if b is None:
                raise RuntimeError(
                    f"{sp.store}: the Ray Data stream of shard {sp.rank} ended before step {g}"
                )
            if (b.epoch, b.step) != want:
                raise RuntimeError(
                    f"{sp.store}: shard {sp.rank} streamed (epoch, step) {(b.epoch, b.step)} "
                    f"where global step {g} is {want}"
                )
            parts.append(b)
        if len(parts) == 1:
            b = parts[0]
            yield b.x, b.lx.numpy(), b.y, b.ly.numpy()
        else:
            yield (
                torch.cat([b.x for b in parts]),
                np.concatenate([b.lx.numpy() for b in parts]),
                torch.cat([b.y for b in parts]),
                np.concatenate([b.ly.numpy() for b in parts]),
            )
