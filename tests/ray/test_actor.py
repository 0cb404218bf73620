"""The pool-index actor against a PoolIndex replayed on the same labels; its restart protocol."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ffc_ray.pool.actor import (
    STATUS_LOST,
    STATUS_OK,
    STATUS_OUT_OF_SYNC,
    PoolIndexActor,
    actor_name,
    index_checksum,
    pack_slots,
    unpack_slots,
)
from ffc_ray.pool.index import PoolIndex
from ffc_ray.pool.plan import StepSlots, plan_step


def _steps(n_steps: int, n: int, num_ids: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, num_ids, n) for _ in range(4)) for _ in range(n_steps)]


def _assert_slots_equal(a: StepSlots, b: StepSlots) -> None:
    for f in (
        "trial_gallery",
        "trial_new",
        "trial_probe",
        "commit_gallery",
        "commit_new",
        "commit_probe",
    ):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert (a.evictions, a.occupancy) == (b.evictions, b.occupancy)


def _assert_state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


# ---- no Ray: packing and the protocol on the plain class -----------------------------------


def test_pack_unpack_roundtrip_keeps_every_field() -> None:
    idx = PoolIndex(8)
    tg, tp, cg, cp = (np.array(v) for v in ([1, 2, 3], [3, 9], [4, 4, 1, 5], [5, 7, 1]))
    slots = plan_step(idx, tg, tp, cg, cp)
    buf = pack_slots(slots, STATUS_OK, step=41, plan_us=123)
    assert buf.dtype == np.int32 and len(buf) == 9 + 3 + 2 + 4 + 3 + 1 + 1  # flags as bits
    status, step, plan_us, back = unpack_slots(buf)
    assert (status, step, plan_us) == (STATUS_OK, 41, 123)
    _assert_slots_equal(back, slots)
    assert back.trial_new.dtype == bool and back.commit_new.dtype == bool
    assert back.trial_gallery.dtype == np.int64 and back.commit_probe.dtype == np.int64
    with pytest.raises(ValueError, match="header lengths"):
        unpack_slots(buf[:-1])


def test_flags_survive_bit_packing_at_every_length() -> None:
    rng = np.random.default_rng(0)
    for n in (0, 1, 31, 32, 33, 4096):
        new = rng.random(n) < 0.5
        slots = StepSlots(
            np.arange(n),
            new,
            np.zeros(2, np.int64),
            np.arange(n)[::-1].copy(),
            ~new,
            np.full(3, -1),
            evictions=n,
            occupancy=7,
        )
        _, _, _, back = unpack_slots(pack_slots(slots))
        _assert_slots_equal(back, slots)


def test_labels_travel_in_one_array_int32_when_they_fit() -> None:
    from ffc_ray.pool.actor import pack_labels, unpack_labels

    parts = (np.array([5, 2**31 - 1]), np.array([], np.int64), np.array([0]), np.array([9, 9]))
    buf = pack_labels(*parts)
    assert buf.dtype == np.int32 and len(buf) == 4 + 5
    for a, b in zip(unpack_labels(buf), parts):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.int64
    big = (np.array([2**40]), np.array([1]), np.array([2]), np.array([3]))
    buf = pack_labels(*big)
    assert buf.dtype == np.int64
    assert unpack_labels(buf)[0][0] == 2**40


def test_actor_body_is_idempotent_per_step_and_refuses_unknown_steps() -> None:
    a = PoolIndexActor(6, "lru")
    steps = _steps(5, 4, 10, seed=1)
    assert unpack_slots(a.plan(0, *steps[0]))[0] == STATUS_LOST  # no state until reset/load
    a.reset()
    ref = PoolIndex(6, "lru")
    for k, labels in enumerate(steps):
        first = a.plan(k, *labels)
        again = a.plan(k, *labels)  # a retried call: same answer, the index advanced once
        np.testing.assert_array_equal(first, again)
        _assert_slots_equal(unpack_slots(first)[3], plan_step(ref, *labels))
    status, actor_step, _, _ = unpack_slots(a.plan(2, *steps[0]))  # stale step
    assert (status, actor_step) == (STATUS_OUT_OF_SYNC, 5)
    status, _, _, _ = unpack_slots(a.plan(7, *steps[0]))  # a skipped step
    assert status == STATUS_OUT_OF_SYNC
    state, step = a.get_state()
    assert step == 5
    _assert_state_equal(state, ref.state_dict())


def test_index_checksum_changes_with_any_slot() -> None:
    idx = PoolIndex(5)
    idx.assign(np.array([3, 1, 4]))
    s1 = idx.state_dict()
    idx.assign(np.array([1]))  # LRU: reorders only
    s2 = idx.state_dict()
    assert index_checksum(s1) == index_checksum(
        {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s1.items()}
    )
    assert index_checksum(s1) != index_checksum(s2)


def test_actor_name_is_per_run() -> None:
    assert actor_name("a") != actor_name("b")
    with pytest.raises(ValueError):
        actor_name("")


def _wait_restarted(ray, h) -> dict:
    """ray.kill is asynchronous: wait for the restarted instance; its info()."""
    deadline = time.time() + 60
    while True:
        try:
            info = ray.get(h.info.remote(), timeout=30)
            if info["restarted"]:
                return info
        except ray.exceptions.RayActorError:
            pass
        assert time.time() < deadline, "the actor did not restart"
        time.sleep(0.2)


@pytest.mark.ray
def test_actor_equals_replayed_pool_index(ray_session) -> None:
    from ffc_ray.pool.actor import create_pool_actor, kill_pool_actor

    ray = ray_session
    h = create_pool_actor("t-replay", 40, "lru")
    try:
        ray.get(h.reset.remote())
        ref = PoolIndex(40, "lru")
        for k, labels in enumerate(_steps(30, 12, 100, seed=2)):
            status, step, _, slots = unpack_slots(ray.get(h.plan.remote(k, *labels)))
            assert status == STATUS_OK and step == k
            _assert_slots_equal(slots, plan_step(ref, *labels))
        state, step = ray.get(h.get_state.remote())
        assert step == 30
        _assert_state_equal(state, ref.state_dict())
        info = ray.get(h.info.remote())
        assert info["plans"] == 30 and info["size"] == len(ref) == 40
    finally:
        kill_pool_actor(h)


@pytest.mark.ray
def test_restarted_actor_reports_lost_state_until_reloaded(ray_session) -> None:
    from ffc_ray.pool.actor import create_pool_actor, kill_pool_actor

    ray = ray_session
    h = create_pool_actor("t-restart", 16, "fifo")
    try:
        ray.get(h.reset.remote())
        steps = _steps(12, 6, 40, seed=3)
        ref = PoolIndex(16, "fifo")
        for k in range(6):
            ray.get(h.plan.remote(k, *steps[k]))
            plan_step(ref, *steps[k])
        saved, saved_step = ray.get(h.get_state.remote())  # "the checkpoint"
        ray.get(h.plan.remote(6, *steps[6]))  # a step after the checkpoint, then the crash
        ray.kill(h, no_restart=False)
        info = _wait_restarted(ray, h)
        assert info["step"] is None and info["size"] == 0  # the index is gone
        assert unpack_slots(ray.get(h.plan.remote(7, *steps[7])))[0] == STATUS_LOST
        assert ray.get(h.get_state.remote()) == (None, None)
        # reload from the checkpoint and redo from step 6: identical to the uninterrupted replay
        assert ray.get(h.load_state.remote(saved, saved_step)) == index_checksum(ref.state_dict())
        for k in range(6, 12):
            _, _, _, slots = unpack_slots(ray.get(h.plan.remote(k, *steps[k])))
            _assert_slots_equal(slots, plan_step(ref, *steps[k]))
        _assert_state_equal(ray.get(h.get_state.remote())[0], ref.state_dict())
    finally:
        kill_pool_actor(h)


@pytest.mark.ray
def test_runs_with_two_names_get_separate_actors(ray_session) -> None:
    from ffc_ray.pool.actor import create_pool_actor, kill_pool_actor

    ray = ray_session
    a = create_pool_actor("t-run-a", 10)
    b = create_pool_actor("t-run-b", 10)
    try:
        ray.get([a.reset.remote(), b.reset.remote()])
        ray.get(a.plan.remote(0, np.array([1, 2]), np.array([1]), np.array([3, 4]), np.array([3])))
        assert ray.get(a.info.remote())["size"] == 2
        assert ray.get(b.info.remote())["size"] == 0  # untouched by run a
        again = create_pool_actor("t-run-a", 10)  # the same run joins its actor
        assert ray.get(again.info.remote())["size"] == 2
        with pytest.raises(ValueError, match="already exists"):
            create_pool_actor("t-run-a", 11)
        assert (
            ray.get_actor(actor_name("t-run-a"))._actor_id
            != ray.get_actor(actor_name("t-run-b"))._actor_id
        )
    finally:
        kill_pool_actor(a)
        kill_pool_actor(b)


@pytest.mark.ray
def test_actor_planner_single_rank(ray_session) -> None:
    from ffc_ray.pool.actor import create_pool_actor, kill_pool_actor
    from ffc_ray.ray.dist import ActorPlanner, PoolActorLost

    ray = ray_session
    h = create_pool_actor("t-planner", 20)
    try:
        ray.get(h.reset.remote())
        planner = ActorPlanner(h)
        ref = PoolIndex(20)
        for labels in _steps(5, 8, 50, seed=4):
            _assert_slots_equal(planner(*labels), plan_step(ref, *labels))
        assert planner.step == 5 and planner.last_latency_ms > 0
        assert ray.get(h.info.remote())["plans"] == 5
        # pipelined: labels sent before the step, the hook only collects the answer
        rng = np.random.default_rng(6)
        for _ in range(3):
            lx, ly = rng.integers(0, 50, 8), rng.integers(0, 50, 8)
            planner.prefetch(lx, ly)
            _assert_slots_equal(planner(ly, lx, lx, ly), plan_step(ref, ly, lx, lx, ly))
        planner.prefetch(lx, ly)
        with pytest.raises(RuntimeError, match="prefetched labels differ"):
            planner(ly, lx, lx, ly[::-1].copy())
        ray.get(h.load_state.remote(ref.state_dict(), 8))  # the failed call consumed step 8
        planner.step = 8
        planner.step = 3  # out of step with the actor -> every rank raises
        with pytest.raises(PoolActorLost, match="at step 8"):
            planner(*_steps(1, 8, 50, seed=5)[0])
    finally:
        kill_pool_actor(h)


@pytest.mark.ray
def test_actor_planner_raises_pool_actor_lost_after_a_restart(ray_session) -> None:
    """The actor killed and restarted between two steps: the next call reports the lost
    index, so every rank raises PoolActorLost instead of hanging or using stale slots."""
    from ffc_ray.pool.actor import create_pool_actor, kill_pool_actor
    from ffc_ray.ray.dist import ActorPlanner, PoolActorLost

    ray = ray_session
    h = create_pool_actor("t-restart", 20)
    try:
        ray.get(h.reset.remote())
        planner, ref = ActorPlanner(h), PoolIndex(20)
        for labels in _steps(2, 8, 50, seed=9):
            _assert_slots_equal(planner(*labels), plan_step(ref, *labels))
        ray.kill(h, no_restart=False)
        _wait_restarted(ray, h)
        with pytest.raises(PoolActorLost, match="restarted"):
            planner(*_steps(1, 8, 50, seed=10)[0])
    finally:
        kill_pool_actor(h)
