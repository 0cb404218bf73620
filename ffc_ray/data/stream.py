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
uint8 images (normalised by the train step, on its device). A dataset covers global steps
``[start_step, start_step + num_steps)`` across epochs, so resuming at a step is exact.

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

Training builds the datasets in the worker (:class:`StreamSource`); with datasets handed to
a TorchTrainer (:func:`build_stream_datasets`): ``for batch in worker_dual_batches(spec):
trainer.train_step(*batch)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from ffc_ray.data.reader import StreamSpec, row_seeds
from ffc_ray.data.store import read_records
from ffc_ray.data.transforms import decode_augment_chw

if TYPE_CHECKING:  # the consumer functions import torch: a read task's process never loads it
    from ffc_ray.data.batch import StepBatch

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


def _read_chunk(spec: StreamSpec, epoch: int, lo: int, hi: int) -> list[Any]:
    """Read task body: steps lo..hi-1 of ``epoch`` for ``spec``'s rank, a row each.

    Columns: ``x`` / ``y`` uint8 images [n, V, 3, S, S] (the sampler's ``plan.x`` / ``plan.y``
    rows with the reader's seeds),
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
        images = _prepare(blobs, sd.reshape(-1), keys, spec, size)
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
    ) -> None:
        super().__init__()
        self.spec = spec
        self.start_step = int(start_step)
        self.num_steps = int(num_steps)
        self.steps_per_task = max(1, int(steps_per_task))
        self._bytes_per_step: int | None = None

    def get_name(self) -> str:
        return "StoreSteps"

    def _step_bytes(self) -> int:
        """Bytes of one step's decoded images in a block (what the object store holds)."""
        if self._bytes_per_step is None:
            size = self.spec.store_handle().image_size
            self._bytes_per_step = 2 * self.spec.view_batch * 3 * size * size
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
            spec = self.spec
            tasks.append(
                ReadTask(
                    lambda spec=spec, epoch=epoch, lo=lo, hi=hi: _read_chunk(spec, epoch, lo, hi),
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
) -> np.ndarray:
    def source(i: int) -> str:  # built only for a record that fails to decode
        return f"{spec.store} key {bytes(keys[i]).decode('ascii', 'replace')}"

    return decode_augment_chw(blobs, seeds, size, spec.augment, source)


def build_rank_dataset(
    spec: StreamSpec,
    num_steps: int,
    start_step: int = 0,
    read_cpus: float = 0.25,
    steps_per_task: int | None = None,
    concurrency: int | None = None,
) -> ray.data.Dataset:
    """One rank's dataset of global steps ``[start_step, start_step + num_steps)``: read tasks
    that read, decode and augment both views of a few steps.

    Each task asks for ``read_cpus`` and makes one block of ``steps_per_task`` steps (default:
    about ``IMAGES_PER_TASK`` images). The blocks carry uint8 [V, 3, S, S] views (4x fewer
    bytes through the object store and to the GPU than float32); the train step normalises
    them on its device.
    """
    if steps_per_task is None:
        steps_per_task = max(1, IMAGES_PER_TASK // max(1, 2 * spec.view_batch))
    spec.store_handle()  # a missing or broken store fails here, in the caller
    src = StorePlanDatasource(spec, start_step, num_steps, steps_per_task)
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


def iter_step_batches(spec: StreamSpec, it: Any, prefetch_batches: int = 2) -> Iterator[StepBatch]:
    """Read a rank's stream (:func:`build_rank_dataset`: a row per step) into :class:`StepBatch`.

    ``it``: a Ray ``DataIterator`` or ``Dataset``; ``prefetch_batches`` counts blocks. Each
    step's views are contiguous in their block: a view is one copy into a fresh uint8 tensor
    (blocks are read-only). Steps must follow each other (the next step, or step 0 of the next
    epoch): anything else raises (is ``preserve_order`` off?).
    """
    import torch

    from ffc_ray.data.batch import StepBatch

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
            yield StepBatch(
                torch.from_numpy(np.array(x[i])),
                torch.from_numpy(np.array(lx[i])),
                torch.from_numpy(np.array(y[i])),
                torch.from_numpy(np.array(ly[i])),
                e,
                s,
                np.array(ix[i]),
                np.array(iy[i]),
            )


def worker_dual_batches(spec: StreamSpec, prefetch_batches: int = 2) -> Iterator[StepBatch]:
    """Inside ``train_loop_per_worker``: this rank's batches from the trainer's datasets
    (:func:`build_stream_datasets`)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    ds = ray.train.get_dataset_shard(dataset_name(rank))
    return iter_step_batches(spec.for_rank(rank), ds, prefetch_batches)


class StreamSource:
    """A worker's batches streamed by Ray Data from the store of ``cfg.data.source`` (a
    :class:`~ffc_ray.data.batch.BatchSource`).

    The worker owns the logical data shards ``shard_ids`` of ``num_shards`` (one per worker
    normally; several for the data-parallel emulation); each gets its dual dataset and their
    batches are concatenated in shard order, as the in-worker reader does. The datasets are
    built when iteration starts, in the worker, from the step it starts at, so a worker
    restarted from a checkpoint streams from exactly that step (no replay of what came
    before).
    """

    def __init__(
        self,
        cfg: Any,
        shard_ids: list[int],
        num_shards: int,
        steps_per_epoch: int | None = None,
        prefetch_batches: int = 2,
    ) -> None:
        self.cfg = cfg
        self.specs = [StreamSpec.from_config(cfg, world_size=num_shards, rank=s) for s in shard_ids]
        self.steps_per_epoch = steps_per_epoch or min(sp.steps_per_epoch() for sp in self.specs)
        self.prefetch_batches = prefetch_batches

    def iter_batches(self, start: int, stop: int) -> Iterator[StepBatch]:
        """The batches of global steps ``[start, stop)``."""
        from ffc_ray.data.batch import StepBatch

        if stop <= start:
            return
        read_cpus = float(self.cfg.data.read_cpus)
        streams = []
        for sp in self.specs:
            ds = build_rank_dataset(sp, stop - start, start, read_cpus=read_cpus)
            (it,) = ds.streaming_split(1)  # the executor in its own actor, not in this process
            streams.append(iter_step_batches(sp, it, self.prefetch_batches))
        for g in range(int(start), int(stop)):
            want = divmod(g, self.steps_per_epoch)
            parts = []
            for sp, it in zip(self.specs, streams):
                b = next(it, None)
                if b is None:
                    raise RuntimeError(
                        f"{sp.store}: the Ray Data stream of shard {sp.rank} ended before step {g}"
                    )
                if (b.epoch, b.step) != want:
                    raise RuntimeError(
                        f"{sp.store}: shard {sp.rank} streamed (epoch, step) "
                        f"{(b.epoch, b.step)} where global step {g} is {want}"
                    )
                parts.append(b)
            yield StepBatch.cat(parts)
