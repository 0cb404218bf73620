"""DualSampler: the dual-loader invariants, checked by counting over whole epochs."""

from __future__ import annotations

import numpy as np
import pytest

from ffc_ray.data.sampling import DualSampler, EpochPlan


def _labels(counts, seed=0):
    """Labels with the given images per identity, in shuffled image order."""
    lab = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(lab)


# 60 identities: 10 with one image, 50 with 2..6 -> 10 excluded from the identity stream
COUNTS = [1] * 10 + [2 + (i % 5) for i in range(50)]
LABELS = _labels(COUNTS)  # 10 + 50 * 4 = 210 images


def _instance_cols(plan):
    h = plan.instance_per_view
    return np.concatenate([plan.x[:, :h], plan.y[:, :h]], axis=1)


def test_shapes_and_ratio():
    s = DualSampler(LABELS, instance_batch=8, identity_batch=6, seed=0)
    plan = s.epoch_plan(0)
    assert isinstance(plan, EpochPlan)
    assert s.steps_per_epoch() == 210 // 8 == plan.steps
    assert plan.x.shape == plan.y.shape == (26, 4 + 6)
    assert plan.x.dtype == plan.y.dtype == np.int64
    assert plan.instance_per_view == 4 and s.view_batch == 10
    # identity-only and instance-only samplers
    s_id = DualSampler(LABELS, instance_batch=0, identity_batch=5, seed=0)
    assert s_id.steps_per_epoch() == 50 // 5
    assert s_id.epoch_plan(0).x.shape == (10, 5)
    s_in = DualSampler(LABELS, instance_batch=10, identity_batch=0, seed=0)
    assert s_in.epoch_plan(0).x.shape == (21, 5)


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_image_once_per_epoch_across_ranks(world_size):
    ib = 10  # 210 = 7 * 3 * 10: nothing dropped
    plans = [
        DualSampler(LABELS, ib, 4, seed=1, world_size=world_size, rank=r).epoch_plan(2)
        for r in range(world_size)
    ]
    seen = np.concatenate([_instance_cols(p).ravel() for p in plans])
    assert len(seen) == 210
    np.testing.assert_array_equal(np.sort(seen), np.arange(210))


def test_drop_last_never_repeats():
    s = DualSampler(LABELS, instance_batch=16, identity_batch=4, seed=1, world_size=2, rank=0)
    plans = [
        DualSampler(LABELS, 16, 4, seed=1, world_size=2, rank=r).epoch_plan(0) for r in range(2)
    ]
    seen = np.concatenate([_instance_cols(p).ravel() for p in plans])
    assert len(seen) == s.steps_per_epoch() * 16 * 2 == 6 * 32
    assert len(np.unique(seen)) == len(seen)  # 210 - 192 = 18 dropped, none twice


def test_identity_part_pairs_two_distinct_images_of_one_identity():
    s = DualSampler(LABELS, instance_batch=8, identity_batch=6, seed=3)
    plan = s.epoch_plan(0)
    h = plan.instance_per_view
    iii, iv = plan.x[:, h:], plan.y[:, h:]
    np.testing.assert_array_equal(LABELS[iii], LABELS[iv])  # x and y carry the same identities
    assert (iii != iv).all()  # two distinct images
    counts = np.bincount(LABELS)
    assert (counts[LABELS[iii]] >= 2).all()  # single-image identities never in III / IV
    for row in LABELS[iii]:
        assert len(set(row.tolist())) == len(row)  # no identity twice in one step


@pytest.mark.parametrize("world_size", [1, 2])
def test_no_identity_twice_per_identity_epoch(world_size):
    # identity-only: one instance epoch == one identity epoch
    ib = 5
    plans = [
        DualSampler(LABELS, 0, ib, seed=4, world_size=world_size, rank=r).epoch_plan(1)
        for r in range(world_size)
    ]
    ids = np.concatenate([LABELS[p.x].ravel() for p in plans])
    assert len(ids) == (50 // (ib * world_size)) * ib * world_size
    assert len(np.unique(ids)) == len(ids)
    # and directly on the identity-epoch tables, spanning all ranks
    s = DualSampler(LABELS, 8, 6, seed=4, world_size=world_size)
    for e in range(3):
        i1, i2 = s.identity_epoch(e)
        lab = LABELS[i1].ravel()
        assert len(np.unique(lab)) == len(lab) == (50 // (6 * world_size)) * 6 * world_size
        np.testing.assert_array_equal(LABELS[i2].ravel(), lab)


def test_identity_stream_continues_across_identity_epochs():
    # 26 steps x 6 ids = 156 > 48 ids per identity epoch: the stream runs through ~3.25 epochs
    s = DualSampler(LABELS, instance_batch=8, identity_batch=6, seed=5)
    plan = s.epoch_plan(0)
    h = plan.instance_per_view
    per = s.identity_steps_per_epoch()
    assert per == 50 // 6 == 8
    ids = LABELS[plan.x[:, h:]]
    for e in range(plan.steps // per):
        block = ids[e * per : (e + 1) * per].ravel()
        assert len(np.unique(block)) == len(block)  # one identity epoch: no repeats
        np.testing.assert_array_equal(block, LABELS[s.identity_epoch(e)[0]].ravel())
    # consecutive identity epochs are reshuffled
    assert not np.array_equal(ids[:per], ids[per : 2 * per])
    # the next instance epoch continues where this one stopped (global identity-step counter)
    nxt = s.epoch_plan(1)
    g = plan.steps  # first identity step of epoch 1
    np.testing.assert_array_equal(nxt.x[0, h:], s.identity_epoch(g // per)[0][g % per, 0])


def test_rank_disjoint_identity_batches():
    plans = [
        DualSampler(LABELS, 8, 5, seed=6, world_size=2, rank=r).epoch_plan(0) for r in range(2)
    ]
    for step in range(plans[0].steps):
        a = set(LABELS[plans[0].x[step, 4:]].tolist())
        b = set(LABELS[plans[1].x[step, 4:]].tolist())
        assert not a & b


def test_determinism_and_epochs_differ():
    a = DualSampler(LABELS, 8, 6, seed=7, world_size=2, rank=1)
    b = DualSampler(LABELS.copy(), 8, 6, seed=7, world_size=2, rank=1)
    p1, p2 = a.epoch_plan(3), b.epoch_plan(3)
    np.testing.assert_array_equal(p1.x, p2.x)
    np.testing.assert_array_equal(p1.y, p2.y)
    np.testing.assert_array_equal(a.epoch_plan(3).x, p1.x)  # repeated calls identical
    assert not np.array_equal(a.epoch_plan(4).x, p1.x)
    assert not np.array_equal(
        DualSampler(LABELS, 8, 6, seed=8, world_size=2, rank=1).epoch_plan(3).x, p1.x
    )
    # the instance order differs between epochs as a set of batches, not only by rotation
    assert not np.array_equal(np.sort(a.epoch_plan(4).x[0, :4]), np.sort(p1.x[0, :4]))


def test_excluded_single_image_identities_counted_and_in_instance_stream():
    s = DualSampler(LABELS, instance_batch=10, identity_batch=4, seed=9)
    assert s.num_excluded_identities == 10
    assert s.num_pair_identities == 50 and s.num_identities == 60
    seen = _instance_cols(s.epoch_plan(0)).ravel()
    singles = np.flatnonzero(np.isin(LABELS, np.arange(10)))
    assert np.isin(singles, seen).all()


def test_non_contiguous_labels():
    lab = np.array([5, 5, 9, 9, 9, 100, 100, 7])
    s = DualSampler(lab, 2, 2, seed=0)
    assert s.num_excluded_identities == 1
    p = s.epoch_plan(0)
    np.testing.assert_array_equal(lab[p.x[:, 1:]], lab[p.y[:, 1:]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(instance_batch=7, identity_batch=2), "instance_batch must be even"),
        (dict(instance_batch=212, identity_batch=2), "instance_batch 212"),
        (dict(instance_batch=8, identity_batch=51), "identity_batch 51"),
        (dict(instance_batch=8, identity_batch=26, world_size=2), "identity_batch 26"),
        (dict(instance_batch=0, identity_batch=0), "both 0"),
        (dict(instance_batch=8, identity_batch=2, world_size=2, rank=2), "rank 2"),
        (dict(instance_batch=-2, identity_batch=2), "instance_batch must be an integer"),
        (dict(instance_batch=8, identity_batch=2, seed=-1), "seed"),
    ],
)
def test_validation_names_the_argument(kwargs, match):
    kwargs.setdefault("seed", 0)
    with pytest.raises(ValueError, match=match):
        DualSampler(LABELS, **kwargs)


def test_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        DualSampler(np.array([0.5, 1.5]), 2, 0, seed=0)
    with pytest.raises(ValueError, match="labels"):
        DualSampler(np.array([-1, 0, 0]), 2, 0, seed=0)
