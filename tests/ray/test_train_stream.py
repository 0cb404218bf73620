"""`ffc-ray train` on a store streams through Ray Data (data.loader: ray_data, the default):
the same losses as the in-worker reader, and a stopped run resumes mid-stream exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ffc_ray.config import ConfigError
from ffc_ray.data.importers import ImportOptions, import_arrays
from ffc_ray.data.store import close_cached_envs

from .helpers import progress, small_cfg

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def store32(tmp_path_factory) -> Path:
    """64 identities x 4 images of 32 px (PNG: exact pixels), 2 shards."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(64), 4)
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("train_stream") / "store"
    import_arrays(images, labels, path, ImportOptions(image_size=32, encoding="png", num_shards=2))
    close_cached_envs()
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    steps, _ = progress(run_dir)
    return {int(r["step"]): float(r["loss"]) for r in steps}


def test_ray_data_loader_matches_reader_and_resumes(ray_session, store32, tmp_path):
    from ffc_ray.engine.loop import StopAfter
    from ffc_ray.ray.train import run_training

    over = {
        "data__source": str(store32),
        "data__image_size": 32,
        "train__steps": 6,
        "train__checkpoint_interval": 3,
        "train__eval_interval": 6,
        "eval__pairs": [],
    }
    read = run_training(small_cfg(tmp_path, data__loader="reader", **over), name="read")
    cfg = small_cfg(tmp_path, **over)  # data.loader: ray_data (the default)
    first = run_training(cfg, name="streamed", loop_callbacks=[StopAfter(3)])
    assert first.summary["final_step"] == 3
    second = run_training(cfg, name="streamed")  # the same command: streams again from step 3
    assert second.summary["start_step"] == 3 and second.summary["final_step"] == 6
    a, b = _losses(second.run_dir), _losses(read.run_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in a:  # same rows, same pixels, same flips: the same training, before and after resume
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), s
    assert second.summary["pool_checksums"] == read.summary["pool_checksums"]


def test_worker_stream_equals_worker_reader_for_two_shards(ray_session, store32):
    """The data path alone: a worker holding two logical shards, from a mid-epoch step."""
    import torch

    from ffc_ray.data.source import WorkerData
    from ffc_ray.data.stream import StreamSource

    cfg = small_cfg(Path("."), data__source=str(store32), data__image_size=32, eval__pairs=[])
    data = WorkerData(cfg, 0, 1, shards=2)
    assert isinstance(data.source, StreamSource) == (cfg.data.loader == "ray_data")
    spe = data.steps_per_epoch
    start = spe - 1  # across an epoch boundary
    got = list(StreamSource(cfg, data.shard_ids, 2).iter_batches(start, start + 3))
    assert len(got) == 3
    for g, (x, lx, y, ly) in zip(range(start, start + 3), got):
        rx, rlx, ry, rly = data.batch(g)
        assert torch.equal(x, rx) and torch.equal(y, ry)
        np.testing.assert_array_equal(lx, rlx)
        np.testing.assert_array_equal(ly, rly)


def test_ray_data_loader_refuses_a_cluster_without_spare_cpu(ray_session, store32, tmp_path):
    from ffc_ray.ray.train import run_training

    cfg = small_cfg(
        tmp_path,
        data__source=str(store32),
        data__image_size=32,
        ray__num_workers=2,
        ray__cpus_per_worker=1.0,  # the 2-CPU session: nothing left for read tasks
        eval__pairs=[],
    )
    with pytest.raises(ConfigError, match="data.read_cpus.*wait forever"):
        run_training(cfg, name="starved")
