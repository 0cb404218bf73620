"""The step-batch contract: one normalisation, the uint8 CHW layout, shard concatenation, and
the synthetic source (WorkerData on arrays in memory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffc_ray.config import Config
from ffc_ray.data.batch import StepBatch, chw_tensor, normalize
from ffc_ray.data.sampling import DualSampler
from ffc_ray.data.source import WorkerData
from ffc_ray.data.types import FaceArrays


def test_normalize_is_exactly_x_minus_127_5_over_128():
    """Every uint8 value, against the float64 formula: exact (each result is k/256, |k| <= 255)."""
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    got = normalize(x)
    want = (x.double() - 127.5) / 128.0
    assert got.dtype == torch.float32 and torch.equal(got.double(), want)
    assert normalize(x, dtype=torch.float64).dtype == torch.float64
    assert normalize(x, dtype=torch.float64).equal(want)
    floats = torch.randn(2, 3, 4, 4)
    assert torch.equal(normalize(floats), floats)  # already normalised: moved and cast only
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        normalize(torch.zeros(2, 4, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 or float"):
        normalize(torch.zeros(2, 3, 4, 4, dtype=torch.int32))


def test_chw_tensor_layout_and_flip():
    hwc = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    t = chw_tensor(hwc, np.array([False, True, False]))
    assert t.dtype == torch.uint8 and t.shape == (3, 3, 4, 5)
    for i, mirrored in enumerate((False, True, False)):
        want = hwc[i][:, ::-1] if mirrored else hwc[i]
        np.testing.assert_array_equal(t[i].numpy(), want.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="uint8"):
        chw_tensor(hwc.astype(np.float32))


def _batch(seed: int, b: int) -> StepBatch:
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randint(0, 256, (b, 3, 4, 4), generator=g, dtype=torch.uint8)  # noqa: E731
    lab = lambda: torch.randint(0, 9, (b,), generator=g)  # noqa: E731
    return StepBatch(img(), lab(), img(), lab(), 1, 2, np.arange(b), np.arange(b) + 10)


def test_step_batch_unpacks_and_concatenates_in_shard_order():
    a, b = _batch(0, 2), _batch(1, 3)
    x, lx, y, ly = a
    assert x is a.x and ly is a.ly
    c = StepBatch.cat([a, b])
    assert torch.equal(c.x, torch.cat([a.x, b.x])) and torch.equal(c.ly, torch.cat([a.ly, b.ly]))
    assert (c.epoch, c.step) == (1, 2) and c.ix.tolist() == [0, 1, 0, 1, 2]
    assert StepBatch.cat([a]) is a


def test_synthetic_source_yields_uint8_views_of_the_plan_with_seeded_flips():
    labels = np.repeat(np.arange(12), 4)
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 16, 16, 3), dtype=np.uint8)
    over = {
        "data.instance_batch": 4,
        "data.identity_batch": 3,
        "data.num_identities": 12,
        "data.image_size": 16,
        "data.seed": 5,
    }
    cfg = Config().with_overrides(over)
    data = WorkerData(cfg, 0, 1, arrays=FaceArrays(images, labels))
    plan = DualSampler(labels, 4, 3, seed=5).epoch_plan(0)
    mirrored = 0
    for step, b in enumerate(data.iter_batches(0, plan.steps)):
        assert b.x.dtype == torch.uint8 and b.x.shape == (5, 3, 16, 16)
        np.testing.assert_array_equal(b.ix, plan.x[step])
        np.testing.assert_array_equal(b.ly.numpy(), labels[plan.y[step]])
        for view, idx in ((b.x, b.ix), (b.y, b.iy)):
            for img, i in zip(view.numpy().transpose(0, 2, 3, 1), idx):
                same, mirror = (
                    np.array_equal(img, images[i]),
                    np.array_equal(img, images[i][:, ::-1]),
                )
                assert same or mirror
                mirrored += int(mirror and not same)
    total = plan.steps * 10
    assert 0.25 * total < mirrored < 0.75 * total  # data.flip: each image mirrored w.p. 1/2
    again = WorkerData(cfg, 0, 1, arrays=FaceArrays(images, labels)).batch(3)  # resumable
    assert torch.equal(again.x, data.batch(3).x) and torch.equal(again.y, data.batch(3).y)
    plain = WorkerData(cfg.with_overrides({"data.flip": False}), 0, 1, arrays=data.local.arrays)
    np.testing.assert_array_equal(plain.batch(0).x.numpy(), images[plan.x[0]].transpose(0, 3, 1, 2))
