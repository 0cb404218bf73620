"""PoolIndex against an independent sequential reference (OrderedDict, label by label).

The reference mirrors the official FFC LRU (hash map + linked list, slot values 0, 1, 2 ...,
victim's slot reused) and the paper's FIFO (eq. 7: a hit keeps its place).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict

import numpy as np
import pytest

from ffc_ray.pool import PoolIndex, StepSlots, plan_step


class NaivePool:
    """Sequential reference: OrderedDict label -> slot, front = next to evict."""

    def __init__(self, capacity: int, policy: str) -> None:
        self.capacity = capacity
        self.policy = policy
        self.od: OrderedDict[int, int] = OrderedDict()
        self.saved: OrderedDict[int, int] | None = None

    def assign(self, labels):
        slots, new, ev = [], [], 0
        for x in labels.tolist():
            if x in self.od:
                if self.policy == "lru":
                    self.od.move_to_end(x)
                slots.append(self.od[x])
                new.append(False)
                continue
            if len(self.od) < self.capacity:
                s = len(self.od)
            else:
                _, s = self.od.popitem(last=False)
                ev += 1
            self.od[x] = s
            slots.append(s)
            new.append(True)
        self.evictions = ev
        return np.array(slots, np.int64), np.array(new, bool)

    def try_assign(self, labels):
        self.saved = OrderedDict(self.od)
        return self.assign(labels)

    def rollback(self):
        self.od = self.saved
        self.saved = None

    def commit(self):
        self.saved = None

    def lookup(self, labels):
        return np.array([self.od.get(x, -1) for x in labels.tolist()], np.int64)


def _eq(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Fast exact comparison (assert_array_equal is too slow for thousands of sequences)."""
    assert got.shape == want.shape and np.array_equal(got, want), (
        f"{what}: got {got.tolist()}, want {want.tolist()}"
    )


def _check_same(idx: PoolIndex, ref: NaivePool, universe: np.ndarray) -> None:
    assert len(idx) == len(ref.od) == idx.occupancy
    _eq(idx.lookup(universe), ref.lookup(universe), "lookup")


def _check_order(idx: PoolIndex, ref: NaivePool) -> None:
    st = idx.state_dict()
    labels = st["labels"]
    assert [int(labels[s]) for s in st["order"]] == list(ref.od.keys())
    assert [int(s) for s in st["order"]] == list(ref.od.values())


def _random_batch(rng: np.random.Generator, cap: int, n_labels: int) -> np.ndarray:
    """A batch with at most ``cap`` distinct labels, duplicates and locality."""
    d = int(rng.integers(1, cap + 1))
    d = min(d, n_labels)
    pool = rng.choice(n_labels, size=d, replace=False)
    n = int(rng.integers(0, 3 * d + 1))
    return pool[rng.integers(0, d, size=n)].astype(np.int64)


def _run_random_sequence(seed: int, policy: str) -> None:
    rng = np.random.default_rng(seed)
    cap = int(rng.integers(1, 51))
    n_labels = int(rng.integers(cap, 3 * cap + 3))
    offset = [0, 0, 0, 10**9, 2**60][int(rng.integers(0, 5))]  # sparse (dict) labels, huge ones
    universe = np.arange(n_labels + 2, dtype=np.int64) + offset
    idx = PoolIndex(cap, policy)
    ref = NaivePool(cap, policy)
    for _ in range(int(rng.integers(4, 16))):
        op = rng.random()
        batch = _random_batch(rng, cap, n_labels) + offset
        if op < 0.55:
            s, nw = idx.assign(batch, return_new=True)
            rs, rn = ref.assign(batch)
            _eq(s, rs, f"slots of {batch.tolist()}")
            _eq(nw, rn, f"new of {batch.tolist()}")
            assert s.dtype == np.int64 and nw.dtype == bool
            assert idx.evictions_last == ref.evictions
        elif op < 0.85:
            s, nw = idx.try_assign(batch, return_new=True)
            rs, rn = ref.try_assign(batch)
            _eq(s, rs, f"trial slots of {batch.tolist()}")
            _eq(nw, rn, f"trial new of {batch.tolist()}")
            assert idx.evictions_last == ref.evictions
            _check_same(idx, ref, universe)
            if rng.random() < 0.6:
                idx.rollback()
                ref.rollback()
            else:
                idx.commit()
                ref.commit()
        elif op < 0.93:
            st = idx.state_dict()
            idx = PoolIndex(cap, policy)
            idx.load_state_dict(st)
        else:
            idx = pickle.loads(pickle.dumps(idx))
        _check_same(idx, ref, universe)
    _check_order(idx, ref)


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_random_sequences_match_reference(policy: str) -> None:
    for seed in range(800):
        _run_random_sequence(seed, policy)


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_heavy_eviction_and_cascades(policy: str) -> None:
    """Full pool, batches of nearly `cap` distinct labels: many cascades per call."""
    cascades = 0
    for seed in range(60):
        rng = np.random.default_rng(10_000 + seed)
        cap = int(rng.integers(20, 200))
        idx, ref = PoolIndex(cap, policy), NaivePool(cap, policy)
        universe = np.arange(3 * cap)
        for _ in range(6):
            d = int(rng.integers(cap // 2, cap + 1))
            pool = rng.choice(2 * cap, size=d, replace=False)
            batch = pool[rng.integers(0, d, size=2 * d)]
            s, nw = idx.assign(batch, return_new=True)
            rs, rn = ref.assign(batch)
            np.testing.assert_array_equal(s, rs)
            np.testing.assert_array_equal(nw, rn)
            assert idx.evictions_last == ref.evictions
            cascades += idx.cascades_last
        _check_same(idx, ref, universe)
        _check_order(idx, ref)
    assert cascades > 100  # the sequences really exercised the cascade path


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_members_at_the_eviction_head(policy: str) -> None:
    """Batches whose members are the next candidates for eviction (many skips / cascades in
    the window of candidates): exercises the retry with the provably sufficient window."""
    rng = np.random.default_rng(5)
    cap = 2000
    idx, ref = PoolIndex(cap, policy), NaivePool(cap, policy)
    fill = rng.permutation(10 * cap)[:cap]
    idx.assign(fill)
    ref.assign(fill)
    fresh = iter(range(10 * cap, 10**6))
    for _ in range(12):
        oldest = np.array(list(ref.od.keys())[: int(rng.integers(100, 400))])
        new = np.array([next(fresh) for _ in range(int(rng.integers(50, 300)))])
        parts = [oldest, new] if rng.random() < 0.5 else [new, oldest]
        batch = np.concatenate(parts + [rng.permutation(oldest)[:50]])
        s, nw = idx.assign(batch, return_new=True)
        rs, rn = ref.assign(batch)
        _eq(s, rs, "slots")
        _eq(nw, rn, "new")
        assert idx.evictions_last == ref.evictions
    _check_order(idx, ref)


def test_cascade_example_lru() -> None:
    """Pool full [A (least recent), B]; batch [C, A]: C evicts A, then A misses and evicts B."""
    a, b, c = 7, 8, 9
    idx = PoolIndex(2, "lru")
    np.testing.assert_array_equal(idx.assign(np.array([a, b])), [0, 1])
    slots, new = idx.assign(np.array([c, a]), return_new=True)
    np.testing.assert_array_equal(slots, [0, 1])  # C takes A's slot 0, A takes B's slot 1
    np.testing.assert_array_equal(new, [True, True])
    assert idx.evictions_last == 2 and idx.cascades_last == 1
    np.testing.assert_array_equal(idx.lookup(np.array([a, b, c])), [1, -1, 0])


def test_lru_hit_protects_fifo_does_not() -> None:
    """[A, B] full; batch [A, C]: LRU evicts B (A was just used), FIFO evicts A (oldest)."""
    a, b, c = 1, 2, 3
    lru = PoolIndex(2, "lru")
    lru.assign(np.array([a, b]))
    np.testing.assert_array_equal(lru.assign(np.array([a, c])), [0, 1])
    np.testing.assert_array_equal(lru.lookup(np.array([a, b, c])), [0, -1, 1])
    fifo = PoolIndex(2, "fifo")
    fifo.assign(np.array([a, b]))
    np.testing.assert_array_equal(fifo.assign(np.array([a, c])), [0, 0])
    np.testing.assert_array_equal(fifo.lookup(np.array([a, b, c])), [-1, 1, 0])


def test_fifo_hit_then_evicted_then_miss() -> None:
    """FIFO [A, B] full; batch [A, C, A]: A hits (slot 0), C evicts A, A misses into B's slot."""
    a, b, c = 5, 6, 7
    idx = PoolIndex(2, "fifo")
    idx.assign(np.array([a, b]))
    slots, new = idx.assign(np.array([a, c, a]), return_new=True)
    np.testing.assert_array_equal(slots, [0, 0, 1])
    np.testing.assert_array_equal(new, [False, True, True])
    assert idx.evictions_last == 2 and idx.cascades_last == 1
    np.testing.assert_array_equal(idx.lookup(np.array([a, b, c])), [1, -1, 0])


def test_free_slots_in_order_then_eviction() -> None:
    idx = PoolIndex(3, "lru")
    slots, new = idx.assign(np.array([10, 11, 10, 12]), return_new=True)
    np.testing.assert_array_equal(slots, [0, 1, 0, 2])
    np.testing.assert_array_equal(new, [True, True, False, True])
    assert idx.evictions_last == 0 and len(idx) == 3
    # recency now 11 < 10 < 12; 13 evicts 11 (slot 1)
    np.testing.assert_array_equal(idx.assign(np.array([13])), [1])
    assert idx.evictions_last == 1


def test_too_many_distinct_labels() -> None:
    idx = PoolIndex(3, "lru")
    idx.assign(np.array([1, 2]))
    with pytest.raises(ValueError, match=r"4 distinct identities.*capacity 3"):
        idx.assign(np.array([5, 6, 7, 8, 5]))
    np.testing.assert_array_equal(idx.lookup(np.array([1, 2, 5])), [0, 1, -1])  # untouched
    assert len(idx) == 2


def test_bad_labels() -> None:
    idx = PoolIndex(4)
    with pytest.raises(ValueError, match=r"labels\[2\] = -3"):
        idx.assign(np.array([1, 2, -3, -4]))
    with pytest.raises(ValueError, match=r"labels\[1\] = -1"):
        idx.lookup(np.array([0, -1]))
    with pytest.raises(ValueError, match="integer dtype"):
        idx.assign(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        idx.assign(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="policy"):
        PoolIndex(4, "lfu")
    with pytest.raises(ValueError, match="capacity"):
        PoolIndex(0)
    assert len(idx) == 0


def test_scratch_generation_wraps() -> None:
    """The int32 per-slot scratch is reset before its generation counter could overflow."""
    rng = np.random.default_rng(7)
    for policy in ("lru", "fifo"):
        idx, ref = PoolIndex(8, policy), NaivePool(8, policy)
        idx._scratch_gen = (1 << 30) - 20
        for _ in range(60):
            batch = rng.integers(0, 20, size=int(rng.integers(1, 12)))
            if np.unique(batch).size > 8:
                continue
            _eq(idx.assign(batch), ref.assign(batch)[0], f"slots of {batch.tolist()}")
        assert idx._scratch_gen < 1 << 20  # it wrapped
        _check_same(idx, ref, np.arange(21))


def test_output_dtypes() -> None:
    idx = PoolIndex(4)
    s, nw = idx.assign(np.array([3, 1, 3], np.int32), return_new=True)
    assert s.dtype == np.int64 and nw.dtype == bool
    assert idx.lookup([1, 2]).dtype == np.int64
    np.testing.assert_array_equal(idx.lookup([1, 2, 3]), [1, -1, 0])
    np.testing.assert_array_equal(idx.assign(np.array([5], np.uint64)), [2])


def test_large_sparse_labels_and_empty_batches() -> None:
    idx = PoolIndex(2, "lru")
    big = np.array([10**9, 3, 10**9 + 7], np.int64)
    s, new = idx.assign(np.array([10**9, 3]), return_new=True)
    np.testing.assert_array_equal(s, [0, 1])
    assert idx._map.size < 10**7  # no dense array up to the largest label
    np.testing.assert_array_equal(idx.assign(big[2:]), [0])  # evicts 10**9
    np.testing.assert_array_equal(idx.lookup(big), [-1, 1, 0])
    e, en = idx.assign(np.array([], np.int64), return_new=True)
    assert e.shape == (0,) and en.shape == (0,) and idx.evictions_last == 0
    np.testing.assert_array_equal(idx.lookup(np.array([], np.int64)), np.empty(0, np.int64))


def test_transaction_rules() -> None:
    idx = PoolIndex(2, "lru")
    idx.assign(np.array([1, 2]))
    before = idx.state_dict()
    idx.try_assign(np.array([3, 4]))
    np.testing.assert_array_equal(idx.lookup(np.array([1, 2, 3, 4])), [-1, -1, 0, 1])
    with pytest.raises(RuntimeError, match="pending"):
        idx.assign(np.array([1]))
    with pytest.raises(RuntimeError, match="pending"):
        idx.try_assign(np.array([1]))
    with pytest.raises(RuntimeError, match="pending"):
        idx.state_dict()
    idx.rollback()
    with pytest.raises(RuntimeError, match="no pending"):
        idx.rollback()
    idx.commit()  # no-op without a pending try
    after = idx.state_dict()
    for key in ("labels", "order"):
        np.testing.assert_array_equal(before[key], after[key])


def test_state_dict_validation() -> None:
    idx = PoolIndex(3, "lru")
    idx.assign(np.array([4, 5, 6]))
    st = idx.state_dict()
    with pytest.raises(ValueError, match="capacity"):
        PoolIndex(4, "lru").load_state_dict(st)
    with pytest.raises(ValueError, match="policy"):
        PoolIndex(3, "fifo").load_state_dict(st)
    with pytest.raises(ValueError, match="order"):
        PoolIndex(3, "lru").load_state_dict({**st, "order": np.array([0, 0, 1])})
    with pytest.raises(ValueError, match="duplicate"):
        PoolIndex(3, "lru").load_state_dict({**st, "labels": np.array([4, 4, 6])})


def test_plan_step_hand_checked() -> None:
    """C = 3, pool [10, 11, 12] (10 least recent). Trial gallery [13, 11] is rolled back; the
    commit gallery [14, 10, 14] then sees the original pool.

    trial: 13 evicts 10 -> slot 0 (new), 11 hit -> slot 1; trial probes [10, 13, 12] -> -1, 0, 2.
    commit: 14 evicts 10 -> slot 0 (new); 10 (evicted) misses, evicts 11 -> slot 1 (new);
    14 hit -> slot 0; commit probes [11, 12, 10, 14] -> -1, 2, 1, 0; 2 evictions, 3 held.
    """
    idx = PoolIndex(3, "lru")
    idx.assign(np.array([10, 11, 12]))
    out = plan_step(
        idx,
        np.array([13, 11]),
        np.array([10, 13, 12]),
        np.array([14, 10, 14]),
        np.array([11, 12, 10, 14]),
    )
    assert isinstance(out, StepSlots)
    np.testing.assert_array_equal(out.trial_gallery, [0, 1])
    np.testing.assert_array_equal(out.trial_new, [True, False])
    np.testing.assert_array_equal(out.trial_probe, [-1, 0, 2])
    np.testing.assert_array_equal(out.commit_gallery, [0, 1, 0])
    np.testing.assert_array_equal(out.commit_new, [True, True, False])
    np.testing.assert_array_equal(out.commit_probe, [-1, 2, 1, 0])
    assert out.evictions == 2 and out.occupancy == 3
    assert not idx.pending
    # empty trial: no try, trial probes looked up in the current state
    out2 = plan_step(
        idx, np.array([], np.int64), np.array([10, 12]), np.array([12]), np.array([12])
    )
    assert out2.trial_gallery.size == 0 and out2.trial_new.size == 0
    np.testing.assert_array_equal(out2.trial_probe, [1, 2])
    np.testing.assert_array_equal(out2.commit_gallery, [2])
    # a bad commit batch leaves the index unchanged (trial already rolled back)
    before = idx.state_dict()
    with pytest.raises(ValueError, match="distinct"):
        plan_step(idx, np.array([20]), np.array([20]), np.array([1, 2, 3, 4]), np.array([1]))
    after = idx.state_dict()
    np.testing.assert_array_equal(before["order"], after["order"])
    np.testing.assert_array_equal(before["labels"], after["labels"])


def test_log_compaction_keeps_order() -> None:
    """Many small batches force several log compactions; order must stay the reference's."""
    rng = np.random.default_rng(3)
    for policy in ("lru", "fifo"):
        idx, ref = PoolIndex(5, policy), NaivePool(5, policy)
        appended = 0
        for _ in range(1500):
            batch = rng.integers(0, 9, size=int(rng.integers(1, 4)))
            _eq(idx.assign(batch), ref.assign(batch)[0], f"slots of {batch.tolist()}")
            appended += batch.size
        assert idx._log_slot.size < appended / 2  # the log was compacted, not just grown
        _check_order(idx, ref)
        for _ in range(800):  # hits only: no evictions, the head never moves -> stale drop
            batch = rng.integers(0, 5, size=3) if len(ref.od) == 5 else rng.integers(0, 9, 3)
            batch = np.array([x for x in batch if x in ref.od] or [next(iter(ref.od))])
            _eq(idx.assign(batch), ref.assign(batch)[0], f"slots of {batch.tolist()}")
        assert idx._log_slot.size < 2000
        _check_order(idx, ref)


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_an_index_sized_for_the_label_count_matches_the_reference(policy: str) -> None:
    """Labels far past 4 C + 2**20 (N = 10 C with C large): the index sized for N keeps them
    in its dense map, the unsized one in its dict; both follow the naive reference."""
    rng = np.random.default_rng(7)
    cap = 300_000
    n = 10 * cap  # > 4 * cap + 2**20
    sized, unsized = PoolIndex(cap, policy, num_labels=n), PoolIndex(cap, policy)
    ref = NaivePool(cap, policy)
    for _ in range(4):
        batch = rng.integers(0, n, size=2048)
        batch[:8] = n - 1 - np.arange(8)  # the very top of the label space
        want, want_new = ref.assign(batch)
        for idx in (sized, unsized):
            got, new = idx.assign(batch, return_new=True)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(new, want_new)
    probe = rng.integers(0, n, size=5000)
    np.testing.assert_array_equal(sized.lookup(probe), unsized.lookup(probe))
    back = PoolIndex(cap, policy, num_labels=n)
    back.load_state_dict(unsized.state_dict())
    np.testing.assert_array_equal(back.lookup(probe), sized.lookup(probe))
