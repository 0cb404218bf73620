"""Ray Data stream: exactly the sampler's keys per epoch and rank, under a 2-worker TorchTrainer
on the shared 2-CPU local Ray, and bit-equal to the single-process reader."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ffc_ray.data.importers import ImportOptions, import_arrays
from ffc_ray.data.reader import StoreDualReader, StreamSpec
from ffc_ray.data.sampling import DualSampler
from ffc_ray.data.store import close_cached_envs, open_store
from ffc_ray.data.transforms import Augment

pytestmark = pytest.mark.ray

M, P, W = 4, 2, 2  # instance batch, identity batch, workers


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    """23 identities: 20 with 3 images, 3 with one (instance stream only): 63 images, 16 px."""
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.repeat(np.arange(20), 3), [20, 21, 22]])
    images = rng.integers(0, 256, (len(labels), 16, 16, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("stream") / "store"
    import_arrays(
        images,
        labels,
        path,
        ImportOptions(image_size=16, encoding="png", num_shards=3, progress=False),
    )
    close_cached_envs()
    return path


def _plan_rows(spec: StreamSpec, rank: int, start: int, num: int) -> list[tuple]:
    """(epoch, step, x indices, y indices) the sampler orders for ``rank``, global steps."""
    store = open_store(spec.store)
    s = DualSampler(store.labels, M, P, seed=spec.seed, world_size=W, rank=rank)
    spe = s.steps_per_epoch()
    out = []
    for g in range(start, start + num):
        e, k = divmod(g, spe)
        plan = s.epoch_plan(e)
        out.append((e, k, plan.x[k], plan.y[k]))
    return out


def _train_loop(config: dict) -> None:
    """Runs in each TorchTrainer worker: read this rank's stream, save what arrived."""
    import numpy as np
    import ray.train

    from ffc_ray.data.stream import worker_dual_batches

    rank = ray.train.get_context().get_world_rank()
    rows = {"epoch": [], "step": [], "ix": [], "iy": [], "lx": [], "ly": [], "x0": None}
    for b in worker_dual_batches(config["spec"]):
        rows["epoch"].append(b.epoch)
        rows["step"].append(b.step)
        rows["ix"].append(b.ix)
        rows["iy"].append(b.iy)
        rows["lx"].append(b.lx.numpy())
        rows["ly"].append(b.ly.numpy())
        if rows["x0"] is None:
            rows["x0"], rows["y0"] = b.x.numpy(), b.y.numpy()
        assert b.x.shape == (M // 2 + P, 3, 16, 16) and str(b.x.dtype) == "torch.uint8"
    np.savez(Path(config["out"]) / f"rank{rank}.npz", **{k: np.asarray(v) for k, v in rows.items()})
    ray.train.report({"batches": len(rows["step"])})


def test_trainer_stream_yields_exactly_the_sampler_keys(ray_session, tiny_store, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ffc_ray.data.stream import build_stream_datasets, stream_data_config

    spec = StreamSpec(
        str(tiny_store), M, P, seed=3, world_size=W, augment=Augment(flip=True, color_jitter=0.2)
    )
    spe = spec.steps_per_epoch()
    num_steps = 2 * spe + 1  # two epochs and one step of the third
    datasets = build_stream_datasets(spec, num_steps, read_cpus=0.25)
    assert sorted(datasets) == ["dual_r0", "dual_r1"]
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"spec": spec, "out": str(tmp_path)},
        scaling_config=ScalingConfig(
            num_workers=W, use_gpu=False, resources_per_worker={"CPU": 0.5}
        ),
        datasets=datasets,
        dataset_config=stream_data_config(),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="stream-keys"),
    )
    result = trainer.fit()
    assert result.error is None
    labels = open_store(tiny_store).labels
    for rank in range(W):
        got = np.load(tmp_path / f"rank{rank}.npz")
        want = _plan_rows(spec, rank, 0, num_steps)
        # per epoch and rank: the same multiset of image indices in each view
        for e in range(3):
            sel = got["epoch"] == e
            w = [r for r in want if r[0] == e]
            assert sel.sum() == len(w) == (spe if e < 2 else 1)
            assert Counter(got["ix"][sel].ravel().tolist()) == Counter(
                np.concatenate([r[2] for r in w]).tolist()
            )
            assert Counter(got["iy"][sel].ravel().tolist()) == Counter(
                np.concatenate([r[3] for r in w]).tolist()
            )
        # and in order: batch k is the sampler's step k, labels from the index
        assert list(zip(got["epoch"], got["step"])) == [(r[0], r[1]) for r in want]
        np.testing.assert_array_equal(got["ix"], np.stack([r[2] for r in want]))
        np.testing.assert_array_equal(got["iy"], np.stack([r[3] for r in want]))
        np.testing.assert_array_equal(got["lx"], labels[got["ix"]])
        np.testing.assert_array_equal(got["ly"], labels[got["iy"]])
        # identity part: same identity in x and y, two distinct images
        np.testing.assert_array_equal(got["lx"][:, M // 2 :], got["ly"][:, M // 2 :])
        assert (got["ix"][:, M // 2 :] != got["iy"][:, M // 2 :]).all()
        # pixels (decode + augment) equal the non-Ray reader's
        ref = StoreDualReader(spec.for_rank(rank)).batch(0, 0)
        np.testing.assert_array_equal(got["x0"], ref.x.numpy())
        np.testing.assert_array_equal(got["y0"], ref.y.numpy())
    # the two ranks split every epoch's instance stream without overlap
    a, b = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    for e in range(2):
        both = np.concatenate([_instance_part(a, e), _instance_part(b, e)])
        assert len(np.unique(both)) == len(both) == spe * M * W


def _instance_part(got, epoch: int) -> np.ndarray:
    sel = got["epoch"] == epoch
    return np.concatenate(
        [got["ix"][sel][:, : M // 2].ravel(), got["iy"][sel][:, : M // 2].ravel()]
    )


def test_dual_stream_equals_reader_across_epochs_and_resume(ray_session, tiny_store):
    """The training stream (a row per step, both views decoded in one task), resumed two steps
    before an epoch ends, in blocks of 3 steps and of the default size: float32 normalised in
    the task and uint8 normalised by the consumer both equal the non-Ray reader bit for bit."""
    from ffc_ray.data.stream import build_rank_dataset, iter_step_batches

    spec = StreamSpec(
        str(tiny_store),
        M,
        P,
        seed=7,
        world_size=W,
        rank=1,
        augment=Augment(flip=True, random_resized_crop=True),
    )
    spe = spec.steps_per_epoch()
    start, num = spe - 2, 5
    ref = list(StoreDualReader(spec).iter_steps(start, num))
    for kw in (
        {"steps_per_task": 3},
        {},
        {"steps_per_task": 2},  # three tasks
    ):
        got = list(iter_step_batches(spec, build_rank_dataset(spec, num, start, **kw)))
        assert [(b.epoch, b.step) for b in got] == [(0, spe - 2), (0, spe - 1)] + [
            (1, k) for k in range(3)
        ]
        for g, r in zip(got, ref, strict=True):
            assert (g.epoch, g.step) == (r.epoch, r.step)
            assert g.x.dtype == torch.uint8 and g.x.shape == (M // 2 + P, 3, 16, 16)
            for f in ("x", "lx", "y", "ly"):
                np.testing.assert_array_equal(getattr(g, f).numpy(), getattr(r, f).numpy())
            np.testing.assert_array_equal(g.ix, r.ix)
            np.testing.assert_array_equal(g.iy, r.iy)


def test_object_store_blocks_through_a_split_coordinator_equal_the_reader(ray_session, tiny_store):
    """Blocks big enough for the object store (over Ray's 100 KB inline limit), several tasks
    per worker process, iterated through ``streaming_split(1)`` (the executor in its own actor,
    as training does): every step equals the reader's, in order."""
    from ffc_ray.data.stream import build_rank_dataset, iter_step_batches

    spec = StreamSpec(str(tiny_store), M, P, seed=5, augment=Augment(flip=True))
    num, per_task = 80, 20  # 20 steps x 2 views x 4 images x 768 bytes: 123 KB a block
    (it,) = build_rank_dataset(spec, num, 0, steps_per_task=per_task).streaming_split(1)
    got = list(iter_step_batches(spec, it))
    ref = list(StoreDualReader(spec).iter_steps(0, num))
    assert len(got) == len(ref) == num
    for g, r in zip(got, ref, strict=True):
        assert (g.epoch, g.step) == (r.epoch, r.step)
        assert torch.equal(g.x, r.x) and torch.equal(g.y, r.y)


def test_dual_stream_refuses_steps_out_of_order():
    from ffc_ray.data.stream import iter_step_batches

    def rows(steps, epoch=0):
        n = len(steps)
        img = np.zeros((n, 3, 3, 1, 1), np.uint8)
        lab = np.zeros((n, 3), np.int64)
        return {
            "x": img,
            "y": img,
            "lx": lab,
            "ly": lab,
            "ix": lab,
            "iy": lab,
            "epoch": np.full(n, epoch, np.int64),
            "step": np.asarray(steps, np.int64),
        }

    spec = StreamSpec("unused", 2, 2)
    ok = list(iter_step_batches(spec, _Blocks([rows([4, 5]), rows([0], epoch=1)])))
    assert [(b.epoch, b.step) for b in ok] == [(0, 4), (0, 5), (1, 0)]
    with pytest.raises(RuntimeError, match=r"from \(epoch, step\) \(0, 5\) to \(0, 7\)"):
        list(iter_step_batches(spec, _Blocks([rows([4, 5]), rows([7])])))


def test_instance_only_stream_and_bad_store(ray_session, tiny_store, tmp_path):
    from ffc_ray.data.stream import build_stream_datasets, iter_step_batches

    spec = StreamSpec(str(tiny_store), 6, 0, seed=1, world_size=1)
    ds = build_stream_datasets(spec, num_steps=3)
    assert sorted(ds) == ["dual_r0"]
    got = list(iter_step_batches(spec, ds["dual_r0"]))
    assert len(got) == 3 and got[0].x.shape == (3, 3, 16, 16)
    ref = DualSampler(open_store(tiny_store).labels, 6, 0, seed=1).epoch_plan(0)
    np.testing.assert_array_equal(np.stack([b.ix for b in got]), ref.x[:3])
    from ffc_ray.data.store import StoreError

    with pytest.raises(StoreError, match="does not exist"):
        build_stream_datasets(StreamSpec(str(tmp_path / "none"), 6, 0), num_steps=1)


class _Blocks:
    """A stand-in DataIterator yielding fixed blocks (as Ray does after splitting a block)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, **kw):
        assert kw["batch_size"] is None
        return iter(self.blocks)


def test_read_task_modules_do_not_import_torch():
    """Ray Data read tasks import the stream module in fresh worker processes: it must not
    pull in torch (about 2 CPU-seconds and 150+ MB per process on a 2-core machine)."""
    import subprocess
    import sys

    code = (
        "import sys, ffc_ray.data.stream, ffc_ray.data.reader, ffc_ray.data.transforms; "
        "sys.exit(3 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
