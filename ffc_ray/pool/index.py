"""Dynamic Class Pool index: identity label -> pool slot, LRU or FIFO (F2C, CVPR 2022).

The official FFC code keeps the pool's identities in a hash map + doubly linked list
(``lru_python_impl.py`` / ``lru_c``): a label is processed one at a time; a hit moves the identity
to most-recent (LRU), a miss takes the next free slot ``0, 1, 2 ...`` or evicts the least-recent
identity and reuses its slot. The paper's eq. 7 describes the FIFO variant (a hit does not change
the order). :class:`PoolIndex` reproduces these sequential semantics exactly, but processes a
whole batch of labels with numpy array operations so that a training step's labels go in and out
as one array.

Batch algorithm (exact; see :meth:`PoolIndex._apply`):

* Group the batch by label (one ``np.sort`` of ``label << bits | time``): first and last
  occurrence time of every distinct label, membership from the label -> slot map.
* The eviction order is kept as per-slot stamps plus an append-only log of ``(slot, stamp)``
  uses; the order is the log order skipping stale entries (``stamp != stamp[slot]``). The log is
  compacted when it fills, so the amortised cost per label is O(1).
* With at most ``capacity`` distinct labels per call, a victim is always an identity that was in
  the pool before the call and (LRU) has not been touched earlier in the call: victims come from
  the head of the eviction order, in order. Under LRU a candidate whose first occurrence precedes
  the eviction time is skipped (it was moved to most-recent); under FIFO nothing is skipped.
* A victim that occurs again after its eviction misses there ("cascade"): under LRU that is its
  first occurrence, under FIFO the first occurrence after the eviction time (a FIFO member can be
  hit and later still be evicted). A cascade is one more miss, hence one more eviction later on.
  Only the pool members that occur in the batch *and* sit in the window of candidates need this
  case analysis; they are walked in a short Python loop (a handful per batch in practice), all
  other work is vectorised.

Labels are non-negative integers of any size. Those below the dense bound live in an int32
numpy map (grown on demand, 4 bytes a label): the bound is the run's identity count when the
index is given it (``num_labels``: training passes N, so every training label takes this path;
40 MB at N = 10M) and at least ``4 * capacity + 2**20``. Larger labels live in a Python dict, so
sparse label spaces (e.g. hashed ids up to 1e9) work, at dict speed for those labels only
(benchmarks/pool_index.py: at C = 1M and N = 10 C, 6.5M labels/s sized, 1.3M through the dict).

Not thread-safe (one owner: a trainer or the pool actor).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["POLICIES", "PoolIndex", "as_labels"]

POLICIES = ("lru", "fifo")
_STATE_VERSION = 1
_DENSE_EXTRA = 1 << 20  # dense label map bound: 4 * capacity + this
_MIN_MAP = 1024
_MIN_LOG = 1024
_INT64_MAX = np.iinfo(np.int64).max
_ARANGE = np.arange(0, dtype=np.int64)  # grown on demand, read-only (see _arange)


def _arange(n: int) -> np.ndarray:
    """Read-only ``np.arange(n)`` (int64) from a shared cache: allocation-free in the hot path."""
    global _ARANGE
    if _ARANGE.size < n:
        _ARANGE = np.arange(max(n, 2 * _ARANGE.size, 4096), dtype=np.int64)
        _ARANGE.flags.writeable = False
    return _ARANGE[:n]


def _filled(n: int, value: int) -> np.ndarray:
    """``np.full(n, value, int64)``, faster for small n (np.full goes through copyto)."""
    a = np.empty(n, np.int64)
    a.fill(value)
    return a


def as_labels(labels: Any, what: str = "labels") -> np.ndarray:
    """Validate ``labels`` (1-D, integer dtype, non-negative) and return them as int64."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array of identity labels, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, np.int64)
    kind = arr.dtype.kind
    if kind not in "iu":
        bad = ""
        if kind == "f":
            nonint = np.flatnonzero(~np.isfinite(arr) | (arr != np.floor(arr)))
            if nonint.size:
                i = int(nonint[0])
                bad = f"; first non-integer value {what}[{i}] = {arr[i]!r}"
        raise ValueError(
            f"{what}: identity labels must have an integer dtype, got {arr.dtype}{bad}"
        )
    if kind == "u" and arr.dtype.itemsize == 8:
        too_big = np.flatnonzero(arr > np.uint64(_INT64_MAX))
        if too_big.size:
            i = int(too_big[0])
            raise ValueError(f"{what}[{i}] = {int(arr[i])} does not fit in int64")
    lab = arr.astype(np.int64, copy=False)
    if kind == "i" and lab.min() < 0:
        i = int(np.flatnonzero(lab < 0)[0])
        raise ValueError(
            f"{what}[{i}] = {int(lab[i])}: identity labels must be non-negative integers"
        )
    return lab


class _MissWalk:
    """Walk the time-sorted miss sequence ``base ∪ cascades`` by rank.

    ``at(j)`` returns the time of the j-th miss (0-based); successive queries must use
    non-decreasing ``j`` and cascades may only be added with a time later than the last answer,
    which is what the victim loops need (eviction k happens at miss ``free + k``).
    """

    __slots__ = ("base", "nb", "ib", "cur", "heap")

    def __init__(self, base_times: np.ndarray) -> None:
        self.base = base_times
        self.nb = int(base_times.size)
        self.ib = 0  # base times consumed
        self.cur = 0  # merged elements consumed (base + cascades)
        self.heap: list[int] = []

    def add(self, t: int) -> None:
        heapq.heappush(self.heap, t)

    def at(self, j: int) -> int:
        while True:
            need = j - self.cur
            bi = self.ib + need
            bcand = int(self.base[bi]) if bi < self.nb else _INT64_MAX
            if self.heap and self.heap[0] < bcand:
                h = self.heap[0]
                nless = int(np.searchsorted(self.base, h)) - self.ib
                if nless == need:
                    return h
                self.ib += nless
                heapq.heappop(self.heap)
                self.cur += nless + 1
            else:
                if bcand == _INT64_MAX:  # pragma: no cover - guarded by the callers
                    raise AssertionError(f"PoolIndex: miss rank {j} out of range")
                self.ib = bi
                self.cur = j
                return bcand


@dataclass
class _Undo:
    """What one ``try_assign`` changed (O(batch)): scalars, the slots that got a new label
    (with their old labels), the slots that got a new stamp (with their old stamps), and the
    label -> slot entries that changed (with their old values; -1 = absent)."""

    size: int
    clock: int
    head: int
    tail: int
    label_slots: np.ndarray
    old_labels: np.ndarray
    stamp_slots: np.ndarray
    old_stamps: np.ndarray
    map_keys: np.ndarray
    map_vals: np.ndarray


class PoolIndex:
    """Identity label -> pool slot with LRU or FIFO replacement, batched and exact.

    ``assign`` gives exactly the result of processing the labels one by one with the official
    LRU (hash map + linked list; ``policy="lru"``) or the paper's FIFO queue (eq. 7,
    ``policy="fifo"``): slots are handed out 0, 1, 2 ... while the pool is not full, then the
    least-recent / oldest identity is evicted and its slot reused.

    Transactions: ``try_assign`` records an O(batch) undo log, ``rollback`` restores the exact
    previous state, ``commit`` drops the log. While a try is pending, ``assign``/``try_assign``
    /``state_dict`` raise ``RuntimeError``; ``lookup`` sees the trial state. ``rollback`` without a
    pending try raises ``RuntimeError``; ``commit`` without one is a no-op.

    Attributes ``evictions_last`` / ``cascades_last``: evictions and cascade misses (a pool member
    evicted earlier in the same call and then seen again) of the last ``(try_)assign``.
    Picklable (through :meth:`state_dict`).
    """

    def __init__(self, capacity: int, policy: str = "lru", num_labels: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
            raise ValueError(f"PoolIndex capacity must be an int, got {capacity!r}")
        if not 1 <= int(capacity) < 2**31:
            raise ValueError(f"PoolIndex capacity must be in [1, 2**31), got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"PoolIndex policy must be one of {POLICIES}, got {policy!r}")
        self.capacity = int(capacity)
        self.policy = policy
        self.evictions_last = 0
        self.cascades_last = 0
        # labels below this live in the dense map: the run's label count when given (the map
        # grows to it on demand, 4 bytes a label), else a bound for unknown label spaces
        self._dense_limit = max(4 * self.capacity + _DENSE_EXTRA, int(num_labels))
        self._reset()

    # ------------------------------------------------------------------ internal state
    def _reset(self) -> None:
        c = self.capacity
        self._slot_label = np.full(c, -1, np.int64)  # label held by each slot (-1 free)
        self._stamp = np.full(c, -1, np.int64)  # recency (lru) / insertion (fifo) stamp per slot
        # int32 where values are slots: a smaller cache footprint for the random accesses
        self._scratch = np.full(c, -1, np.int32)  # per-slot temporary, see _apply
        self._scratch_gen = 0  # never rolled back: older scratch values stay below it
        self._map = np.full(min(_MIN_MAP, self._dense_limit), -1, np.int32)  # label -> slot
        self._sparse: dict[int, int] = {}  # labels >= _dense_limit -> slot
        self._size = 0  # slots 0.._size-1 are occupied (slots are never freed)
        self._clock = 0
        cap = min(2 * c + _MIN_LOG, 4 * _MIN_LOG)
        self._log_slot = np.empty(cap, np.int64)
        self._log_stamp = np.empty(cap, np.int64)
        self._head = 0  # log entries before head are stale
        self._tail = 0
        self._undo: _Undo | None = None

    def _grow_map(self, max_label: int) -> None:
        """Make the dense map cover ``max_label`` (< dense limit), doubling its size."""
        old = self._map
        if max_label < old.size:
            return
        new_size = min(self._dense_limit, max(2 * old.size, max_label + 1))
        new = np.full(new_size, -1, np.int32)
        new[: old.size] = old
        self._map = new

    def _lookup_raw(self, lab: np.ndarray, top: int | None = None) -> np.ndarray:
        m = self._map
        if lab.size == 0:
            return np.empty(0, np.int64)
        if (int(lab.max()) if top is None else top) < m.size:
            return m[lab]
        out = _filled(lab.size, -1)
        inside = lab < m.size
        out[inside] = m[lab[inside]]
        if self._sparse:
            big = np.flatnonzero(lab >= self._dense_limit)
            if big.size:
                get = self._sparse.get
                out[big] = [get(x, -1) for x in lab[big].tolist()]
        return out

    def _map_set(self, keys: np.ndarray, vals: np.ndarray) -> None:
        if keys.size == 0:
            return
        lim = self._dense_limit
        if int(keys.max()) < lim:
            self._map[keys] = vals
            return
        dense = keys < lim
        self._map[keys[dense]] = vals[dense]
        for k, v in zip(keys[~dense].tolist(), vals[~dense].tolist()):
            if v < 0:
                self._sparse.pop(k, None)
            else:
                self._sparse[k] = v

    def _valid_order(self) -> np.ndarray:
        """Occupied slots in eviction order (least-recent / oldest first)."""
        ls = self._log_slot[self._head : self._tail]
        valid = self._stamp[ls] == self._log_stamp[self._head : self._tail]
        return ls[valid]

    def _reserve_log(self, extra: int) -> None:
        """Room for ``extra`` appended entries; never changes the eviction order.

        Entries before the head are dead, stale entries (identities used again later) sit in
        between. When the log is full: if the live part ``[head, tail)`` is at most 3/4 of the
        log, slide it to the front (a sequential copy); otherwise drop the stale entries (one
        gather per entry, amortised O(1) per appended entry).
        """
        cap = self._log_slot.size
        if self._tail + extra <= cap:
            return
        h, t = self._head, self._tail
        if (t - h) + extra <= (3 * cap) // 4:
            k = t - h
            self._log_slot[:k] = self._log_slot[h:t]
            self._log_stamp[:k] = self._log_stamp[h:t]
        else:
            order = self._valid_order()
            k = order.size
            need = 2 * (k + extra) + _MIN_LOG
            if need > cap:
                need += need >> 2  # slack: later compactions of similar size do not regrow
                logger.debug("PoolIndex: eviction log grows to %d entries", need)
                self._log_slot = np.zeros(need, np.int64)  # zeros + fill: touch the pages now
                self._log_slot.fill(0)
                self._log_stamp = np.zeros(need, np.int64)
                self._log_stamp.fill(0)
            self._log_slot[:k] = order
            self._log_stamp[:k] = self._stamp[order]
        self._head = 0
        self._tail = k

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Log positions and slots of the first ``w`` valid log entries (eviction order).

        Scans forward from the head in growing chunks, never reading an entry twice.
        """
        t = self._tail
        pos_parts, slot_parts = [], []
        got = 0
        pos = self._head
        chunk = w + (w >> 2) + 64
        while got < w and pos < t:
            e = min(t, pos + chunk)
            ls = self._log_slot[pos:e]
            valid = (self._stamp[ls] == self._log_stamp[pos:e]).nonzero()[0]
            # next chunk from the valid fraction seen so far, with 25 % slack
            ratio = max(valid.size, 1) / (e - pos)
            valid = valid[: w - got]
            slot_parts.append(ls[valid])
            valid += pos
            pos_parts.append(valid)
            got += valid.size
            pos = e
            chunk = int((w - got) / ratio * 1.25) + 64
        if got != w:  # pragma: no cover - invariant
            raise AssertionError("PoolIndex: eviction log lost entries")
        if len(pos_parts) == 1:
            return pos_parts[0], slot_parts[0]
        return np.concatenate(pos_parts), np.concatenate(slot_parts)

    # ------------------------------------------------------------------ batch algorithm
    @staticmethod
    def _group(lab: np.ndarray) -> tuple[np.ndarray, ...]:
        """Group a batch by label with one sort of ``label << bits | time``.

        Returns the distinct labels (sorted) ``ulab``, their first / last occurrence times, the
        labels and occurrence times in grouped order (``sl``, ``times``: times increase within a
        group) and the group index of every grouped position (``gid``).
        """
        n = lab.size
        bits = max(1, (n - 1).bit_length())
        if int(lab.max()) < (1 << (62 - bits)):
            key = np.left_shift(lab, bits)
            key |= _arange(n)
            key.sort()
            times = key & ((1 << bits) - 1)
            key >>= bits
            sl = key
        else:  # huge labels: a stable argsort gives the same grouping
            times = np.argsort(lab, kind="stable")
            sl = lab[times]
        edge = np.empty(n + 1, bool)  # edge[i]: a group starts at i / the one before ends
        np.not_equal(sl[1:], sl[:-1], out=edge[1:n])
        edge[n] = True
        edge[0] = False
        gid = np.cumsum(edge[:n], dtype=np.int64)
        edge[0] = True
        is_start = edge[:n]
        return sl[is_start], times[is_start], times[edge[1:]], sl, times, gid

    @staticmethod
    def _by_time(times: np.ndarray, owners: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Sort (time, owner) pairs by time in O(n); times are distinct in [0, n)."""
        at = _filled(n, -1)
        at[times] = owners
        t = (at >= 0).nonzero()[0]
        return at[t], t

    def _apply(self, labels: Any, record: bool) -> tuple[np.ndarray, np.ndarray]:
        if self._undo is not None:
            raise RuntimeError(
                "PoolIndex: a try_assign is pending; call rollback() or commit() first"
            )
        lab = as_labels(labels)
        n = lab.size
        cap = self.capacity
        if n == 0:
            self.evictions_last = 0
            self.cascades_last = 0
            if record:
                self._undo = _Undo(
                    self._size, self._clock, self._head, self._tail, *(np.empty(0, np.int64),) * 6
                )
            return np.empty(0, np.int64), np.empty(0, bool)
        ulab, first, last, sl, times, gid = self._group(lab)
        d = ulab.size
        if d > cap:
            raise ValueError(
                f"labels: {d} distinct identities in one call exceed the pool capacity {cap}"
            )
        lim = self._dense_limit
        top = int(ulab[-1])
        if top >= self._map.size:
            below = top if top < lim else int(ulab[max(0, np.searchsorted(ulab, lim) - 1)])
            if below < lim:
                self._grow_map(below)
        self._reserve_log(d)  # before anything is recorded: compaction keeps the order

        old = self._lookup_raw(ulab, top)
        member = old >= 0
        size = self._size
        free = cap - size
        # base misses: first sight of a non-member, in time order
        nonmem = ~member
        b_u, b_t = self._by_time(first[nonmem], nonmem.nonzero()[0], n)
        e_base = max(0, b_u.size - free)
        casc_u: list[int] = []
        casc_t: list[int] = []
        victims, new_head = np.empty(0, np.int64), self._head
        if e_base > 0:
            victims, new_head = self._evict(
                old, member, ulab, first, sl, times, b_t, free, e_base, casc_u, casc_t
            )
        n_casc = len(casc_u)
        if n_casc:
            miss_u, miss_t = self._by_time(
                np.concatenate((b_t, np.asarray(casc_t, np.int64))),
                np.concatenate((b_u, np.asarray(casc_u, np.int64))),
                n,
            )
        else:
            miss_u, miss_t = b_u, b_t
        n_miss = miss_u.size
        n_free = min(free, n_miss)
        if victims.size != n_miss - n_free:  # pragma: no cover - invariant
            raise AssertionError("PoolIndex: victim count does not match misses")
        miss_slot = np.empty(n_miss, np.int64)
        miss_slot[:n_free] = _arange(n_free) + size
        miss_slot[n_free:] = victims
        new_slot = old.copy()
        new_slot[miss_u] = miss_slot

        # per occurrence, built in the grouped (sorted) order then scattered to time order
        slots = np.empty(n, np.int64)
        if n_casc and self.policy == "fifo":
            # occurrences of a cascaded member before its eviction still hit its old slot
            ctime = np.zeros(d, np.int64)
            ctime[casc_u] = casc_t
            slots[times] = np.where(times < ctime[gid], old[gid], new_slot[gid])
        else:
            slots[times] = new_slot[gid]
        new = np.zeros(n, bool)
        new[miss_t] = True
        if self.policy == "lru":
            o, s_t = self._by_time(last, _arange(d), n)  # touched, by last occurrence
            s_slot = new_slot[o]
        else:
            s_slot, s_t = miss_slot, miss_t
        self._write(ulab[miss_u], miss_slot, old[miss_u], victims, n_free, s_slot, s_t, n, record)
        self._head = new_head
        self.cascades_last = n_casc
        return slots, new

    def _evict(
        self,
        old: np.ndarray,
        member: np.ndarray,
        ulab: np.ndarray,
        first: np.ndarray,
        sl: np.ndarray,
        times: np.ndarray,
        b_t: np.ndarray,
        free: int,
        e_base: int,
        casc_u: list[int],
        casc_t: list[int],
    ) -> tuple[np.ndarray, int]:
        """(victim slots, the new head of the eviction order) for ``e_base`` base misses on a
        full pool; members of this call evicted on the way (cascades) go to ``casc_u`` /
        ``casc_t``.

        Candidates come from the head of the eviction order; a small window first (members of
        the batch rarely sit there), the provably sufficient one if that is not enough.
        """
        d, size = ulab.size, self._size
        mem_u = member.nonzero()[0]
        gen = self._scratch_gen
        if gen + d >= 1 << 30:  # keep int32 scratch arithmetic far from overflow
            self._scratch.fill(-1)
            gen = 0
        self._scratch_gen = gen + d
        self._scratch[old[mem_u]] = mem_u + gen
        w_max = min(size, e_base + mem_u.size)
        # expected batch members among the first e_base candidates, with a wide margin
        expect = (mem_u.size * e_base) // max(size, 1)
        w = min(w_max, e_base + 4 * expect + (e_base >> 6) + 32)
        while True:
            win_pos, win_slot = self._window(w)
            # candidate's index in the batch (< 0: absent): the per-slot scratch holds
            # gen + index for this call's members, older calls' values are below gen
            win_u = self._scratch[win_slot] - gen
            spec = (win_u >= 0).nonzero()[0]
            del casc_u[:], casc_t[:]
            if spec.size == 0 or spec[0] >= e_base:
                vpos = _arange(e_base)
            elif self.policy == "lru":
                vpos = self._victims_lru(spec, win_u, first, b_t, free, e_base, w, casc_u, casc_t)
            else:
                vpos = self._victims_fifo(
                    spec, win_u, ulab, sl, times, b_t, free, e_base, w, casc_u, casc_t
                )
            if vpos is not None or w == w_max:
                break
            w = w_max
        if vpos is None:  # pragma: no cover - invariant
            raise AssertionError("PoolIndex: eviction window too small")
        # every valid entry up to the last victim is now stale (victim or touched)
        return win_slot[vpos], int(win_pos[vpos[-1]]) + 1

    def _write(
        self,
        miss_lab: np.ndarray,
        miss_slot: np.ndarray,
        miss_old: np.ndarray,
        victims: np.ndarray,
        n_free: int,
        s_slot: np.ndarray,
        s_t: np.ndarray,
        n: int,
        record: bool,
    ) -> None:
        """The state update of one call (nothing before it changed the pool's contents):
        misses take their slots (free ones first, then the victims'), the touched slots
        ``s_slot`` get stamps at call times ``s_t``, and with ``record`` the undo record."""
        ev_lab = self._slot_label[victims]
        size, clock = self._size, self._clock
        s_stamp = s_t + clock
        if record:
            old_labels = np.empty(miss_slot.size, np.int64)
            old_labels[:n_free] = -1
            old_labels[n_free:] = ev_lab
            self._undo = _Undo(
                size=size,
                clock=clock,
                head=self._head,
                tail=self._tail,
                label_slots=miss_slot,
                old_labels=old_labels,
                stamp_slots=s_slot,
                old_stamps=self._stamp[s_slot],
                map_keys=np.concatenate((miss_lab, ev_lab)),
                map_vals=np.concatenate((miss_old, victims)),
            )
        if ev_lab.size:
            self._map_set(ev_lab, _filled(ev_lab.size, -1))
        self._map_set(miss_lab, miss_slot)
        self._slot_label[miss_slot] = miss_lab
        self._size = size + n_free
        self._stamp[s_slot] = s_stamp
        t = self._tail
        k = s_slot.size
        self._log_slot[t : t + k] = s_slot
        self._log_stamp[t : t + k] = s_stamp
        self._tail = t + k
        self._clock = clock + n
        self.evictions_last = int(victims.size)

    @staticmethod
    def _victims_lru(
        spec: np.ndarray,
        win_u: np.ndarray,
        first: np.ndarray,
        b_t: np.ndarray,
        free: int,
        e: int,
        w: int,
        casc_u: list[int],
        casc_t: list[int],
    ) -> np.ndarray | None:
        """Greedy LRU victim choice over the window of candidates (eviction order).

        Eviction k happens at miss ``free + k`` and takes the next candidate not touched before
        that time. Candidates absent from the batch are always taken; only the batch members in
        the window (``spec``) are decided here. A taken member misses at its first occurrence.
        Returns the victims' window positions, or None when the window is too short.
        """
        walk = _MissWalk(b_t)
        skipped: list[int] = []
        k = 0
        prev = 0
        for p, u in zip(spec.tolist(), win_u[spec].tolist()):
            k += p - prev
            if k >= e:
                break
            t = walk.at(free + k)
            g = int(first[u])
            if g < t:
                skipped.append(p)  # hit before this eviction: now most-recent, safe
            else:
                casc_u.append(u)
                casc_t.append(g)
                walk.add(g)
                e += 1
                k += 1
            prev = p + 1
        keep = np.ones(w, bool)
        keep[skipped] = False
        vpos = keep.nonzero()[0][:e]
        return vpos if vpos.size == e else None

    @staticmethod
    def _victims_fifo(
        spec: np.ndarray,
        win_u: np.ndarray,
        ulab: np.ndarray,
        sl: np.ndarray,
        times: np.ndarray,
        b_t: np.ndarray,
        free: int,
        e: int,
        w: int,
        casc_u: list[int],
        casc_t: list[int],
    ) -> np.ndarray | None:
        """FIFO: eviction k takes candidate k; a taken member misses at its next occurrence
        after the eviction, if any. Returns None when the window is too short."""
        walk = _MissWalk(b_t)
        for p, u in zip(spec.tolist(), win_u[spec].tolist()):
            if p >= e:
                break
            t = walk.at(free + p)
            x = ulab[u]
            occ = times[np.searchsorted(sl, x) : np.searchsorted(sl, x, side="right")]
            j = int(np.searchsorted(occ, t, side="right"))
            if j < occ.size:
                tc = int(occ[j])
                casc_u.append(u)
                casc_t.append(tc)
                walk.add(tc)
                e += 1
        return _arange(e) if e <= w else None

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        """Identities held."""
        return self._size

    @property
    def occupancy(self) -> int:
        """Identities held (same as ``len``; slots ``0..occupancy-1`` are in use)."""
        return self._size

    @property
    def pending(self) -> bool:
        """True while a ``try_assign`` awaits ``rollback``/``commit``."""
        return self._undo is not None

    def lookup(self, labels: Any) -> np.ndarray:
        """Slots (int64) of ``labels``, -1 where the identity is not in the pool; read-only.

        This is the official ``view``: probe labels mapped after the gallery insertion.
        """
        return self._lookup_raw(as_labels(labels)).astype(np.int64, copy=False)

    def assign(
        self, labels: Any, return_new: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Process ``labels`` in order (official ``get``); return the slot per occurrence.

        With ``return_new``, also a bool array: ``new[i]`` iff occurrence i was a miss (the
        identity starts fresh in that slot, e.g. ring position 0 of its pool rows).
        """
        slots, new = self._apply(labels, record=False)
        return (slots, new) if return_new else slots

    def try_assign(
        self, labels: Any, return_new: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """As :meth:`assign`, recording an undo log (official ``try_get``) for :meth:`rollback`."""
        slots, new = self._apply(labels, record=True)
        return (slots, new) if return_new else slots

    def rollback(self) -> None:
        """Restore the exact state before the pending ``try_assign`` (official ``rollback``)."""
        u = self._undo
        if u is None:
            raise RuntimeError("PoolIndex.rollback: no pending try_assign to roll back")
        self._map_set(u.map_keys, u.map_vals)
        self._slot_label[u.label_slots] = u.old_labels
        self._stamp[u.stamp_slots] = u.old_stamps
        self._size = u.size
        self._clock = u.clock
        self._head = u.head
        self._tail = u.tail
        self._undo = None

    def commit(self) -> None:
        """Keep the pending ``try_assign`` and drop its undo log (no-op when none is pending)."""
        self._undo = None

    def state_dict(self) -> dict[str, np.ndarray | int | str]:
        """Canonical state: ``labels[s]`` = label in slot s (slots ``0..len-1``) and ``order``
        = occupied slots from least-recent / oldest to most-recent / newest."""
        if self._undo is not None:
            raise RuntimeError("PoolIndex.state_dict: a try_assign is pending; commit or rollback")
        order = self._valid_order()
        if order.size != self._size:  # pragma: no cover - invariant
            raise AssertionError("PoolIndex: eviction log inconsistent with occupancy")
        return {
            "version": _STATE_VERSION,
            "capacity": self.capacity,
            "policy": self.policy,
            "labels": self._slot_label[: self._size].copy(),
            "order": order.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the whole state (a pending try is discarded) by one from :meth:`state_dict`."""
        for key in ("capacity", "policy", "labels", "order"):
            if key not in state:
                raise ValueError(f"PoolIndex state: missing key '{key}'")
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"PoolIndex state 'capacity' = {state['capacity']} != this index's {self.capacity}"
            )
        if state["policy"] != self.policy:
            raise ValueError(
                f"PoolIndex state 'policy' = {state['policy']!r} != this index's {self.policy!r}"
            )
        labels = as_labels(state["labels"], "PoolIndex state 'labels'")
        size = labels.size
        if size > self.capacity:
            raise ValueError(
                f"PoolIndex state 'labels': {size} identities exceed capacity {self.capacity}"
            )
        if np.unique(labels).size != size:
            raise ValueError("PoolIndex state 'labels': duplicate labels")
        order = np.asarray(state["order"])
        if (
            order.ndim != 1
            or order.size != size
            or order.dtype.kind not in "iu"
            or not np.array_equal(np.sort(order), np.arange(size))
        ):
            raise ValueError(
                f"PoolIndex state 'order': must be a permutation of 0..{size - 1} (the slots)"
            )
        order = order.astype(np.int64)
        self._reset()
        self._slot_label[:size] = labels
        self._stamp[order] = np.arange(size)
        self._reserve_log(size)
        self._log_slot[:size] = order
        self._log_stamp[:size] = np.arange(size)
        self._tail = size
        self._clock = size
        self._size = size
        if size:
            dense = labels[labels < self._dense_limit]
            if dense.size:
                self._grow_map(int(dense.max()))
            self._map_set(labels, np.arange(size, dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        return {
            "state": self.state_dict(),
            "evictions_last": self.evictions_last,
            "cascades_last": self.cascades_last,
        }

    def __setstate__(self, d: dict[str, Any]) -> None:
        st = d["state"]
        self.__init__(int(st["capacity"]), str(st["policy"]))  # type: ignore[misc]
        self.load_state_dict(st)
        self.evictions_last = int(d["evictions_last"])
        self.cascades_last = int(d["cascades_last"])

    def __repr__(self) -> str:
        return f"PoolIndex(capacity={self.capacity}, policy={self.policy!r}, held={self._size})"
