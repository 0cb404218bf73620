"""The pool-index actor: one :class:`~ffc_ray.pool.index.PoolIndex` shared by all Ray Train workers.

Why an actor: the identity -> slot map of the Dynamic Class Pool (F2C, section 3.2; the official
LRU in docs/reference.md 1.1) must advance exactly once per step for the whole data-parallel
group. Rank 0 sends the step's gathered labels in ONE call (trial gallery + trial probes, rollback,
commit gallery + commit probes, i.e. :func:`~ffc_ray.pool.plan.plan_step`) and broadcasts the
answer, so the replicated pool buffers on every worker receive identical writes.

Protocol (what makes the call safe under restarts and retries):

* the actor counts the steps it has planned (``step``); ``plan(step, ...)`` is applied only when
  ``step`` equals that counter, and the answer is cached, so a retried call for the same step
  (``max_task_retries``) returns the same slots instead of advancing the LRU twice;
* a restarted actor (``max_restarts=-1`` re-runs ``__init__``) has lost its index: its counter is
  ``None`` and every ``plan`` answers :data:`STATUS_LOST` until a worker calls
  :meth:`PoolIndexActor.load_state` with the index state and step from its checkpoint (or
  :meth:`PoolIndexActor.reset` for a fresh run);
* the answer is one packed int32 array (:func:`pack_slots`; slots < 2**31), ready for
  ``torch.distributed.broadcast`` and unpacked on every rank with :func:`unpack_slots`. int32
  keeps a 4 x 4096-label answer under Ray's 100 KiB inline limit, so it skips the object store.

The call is a plain Ray actor call. Rank 0 submits it as soon as the step's labels are known
and collects the answer after the EMA update and the G-Net forward, so the round trip (about
2-4 ms on a 2-core machine) is hidden behind work the step does anyway
(:class:`~ffc_ray.ray.dist.ActorPlanner`).

This is the only module under ``ffc_ray/pool/`` that imports ray, and only inside functions, so
importing it costs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from typing import Any

import numpy as np

from ffc_ray.pool.index import PoolIndex
from ffc_ray.pool.plan import StepSlots, plan_step

log = logging.getLogger(__name__)

STATUS_OK = 0
STATUS_LOST = 1  # the actor restarted and has no state: reload it from the last checkpoint
STATUS_OUT_OF_SYNC = 2  # the caller's step is neither the next step nor the cached one
STATUS_ERROR = 3  # the call failed (rank 0 raises the error; the other ranks raise too)

#: header of a packed answer: status, actor step counter, evictions, occupancy, in-actor plan time
#: (us), then the four lengths (trial gallery, trial probe, commit gallery, commit probe)
HEADER = 9


def actor_name(run_name: str) -> str:
    """The per-run actor name: concurrent runs (and Tune trials) never share an index."""
    if not run_name:
        raise ValueError("actor_name: run name must be a non-empty string")
    return f"ffc-pool-{run_name}"


def _words(n_bits: int) -> int:
    return (n_bits + 31) // 32


def packed_length(n_tg: int, n_tp: int, n_cg: int, n_cp: int) -> int:
    """Length (int32 words) of the packed answer for the given label counts (all ranks know
    them): header, the four slot arrays, then the two ``new`` flag arrays as bits."""
    return HEADER + n_tg + n_tp + n_cg + n_cp + _words(n_tg) + _words(n_cg)


PACK_DTYPE = np.int32


def _bits(flags: np.ndarray) -> np.ndarray:
    raw = np.packbits(np.asarray(flags, dtype=bool), bitorder="little")
    out = np.zeros(_words(len(flags)) * 4, np.uint8)
    out[: len(raw)] = raw
    return out.view(PACK_DTYPE)


def _unbits(words: np.ndarray, n: int) -> np.ndarray:
    u8 = np.ascontiguousarray(words, dtype=PACK_DTYPE).view(np.uint8)
    return np.unpackbits(u8, count=n, bitorder="little").astype(bool)


def pack_slots(
    slots: StepSlots, status: int = STATUS_OK, step: int = 0, plan_us: int = 0
) -> np.ndarray:
    """One int32 array holding a :class:`StepSlots` plus a status header.

    Slots are int32 (capacity < 2**31); the ``new`` flags travel as bits. For 4 x 4096 labels
    that is 64 KiB, under Ray's 100 KiB inline limit, so the answer skips the object store.
    """
    head = np.array(
        [
            status,
            step,
            slots.evictions,
            slots.occupancy,
            min(plan_us, 2**31 - 1),
            len(slots.trial_gallery),
            len(slots.trial_probe),
            len(slots.commit_gallery),
            len(slots.commit_probe),
        ],
        dtype=PACK_DTYPE,
    )
    parts = [slots.trial_gallery, slots.trial_probe, slots.commit_gallery, slots.commit_probe]
    return np.concatenate(
        [head]
        + [np.asarray(p).astype(PACK_DTYPE, copy=False) for p in parts]
        + [_bits(slots.trial_new), _bits(slots.commit_new)]
    )


def status_answer(
    status: int, step: int | None, n_tg: int, n_tp: int, n_cg: int, n_cp: int
) -> np.ndarray:
    """A packed answer of the right length that carries only a non-OK status."""
    out = np.zeros(packed_length(n_tg, n_tp, n_cg, n_cp), dtype=PACK_DTYPE)
    out[:HEADER] = [status, -1 if step is None else step, 0, 0, 0, n_tg, n_tp, n_cg, n_cp]
    return out


def unpack_slots(buf: np.ndarray) -> tuple[int, int, int, StepSlots | None]:
    """Inverse of :func:`pack_slots`: (status, actor step, plan_us, slots or None)."""
    buf = np.asarray(buf)
    status, step, evictions, occupancy, plan_us, n_tg, n_tp, n_cg, n_cp = (
        int(v) for v in buf[:HEADER]
    )
    if len(buf) != packed_length(n_tg, n_tp, n_cg, n_cp):
        raise ValueError(
            f"unpack_slots: {len(buf)} values do not match the header lengths "
            f"({n_tg}, {n_tp}, {n_cg}, {n_cp})"
        )
    if status != STATUS_OK:
        return status, step, plan_us, None
    cuts = np.cumsum([HEADER, n_tg, n_tp, n_cg, n_cp, _words(n_tg), _words(n_cg)])
    tg, tp, cg, cp, tn, cn = (buf[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
    i64 = np.int64
    slots = StepSlots(
        trial_gallery=tg.astype(i64),
        trial_new=_unbits(tn, n_tg),
        trial_probe=tp.astype(i64),
        commit_gallery=cg.astype(i64),
        commit_new=_unbits(cn, n_cg),
        commit_probe=cp.astype(i64),
        evictions=evictions,
        occupancy=occupancy,
    )
    return status, step, plan_us, slots


def pack_labels(tg: np.ndarray, tp: np.ndarray, cg: np.ndarray, cp: np.ndarray) -> np.ndarray:
    """The four label arrays as one array for the call (int32 when every label fits): one
    small argument to serialise instead of four."""
    arrays = [np.asarray(a).reshape(-1) for a in (tg, tp, cg, cp)]
    head = np.array([len(a) for a in arrays], dtype=np.int64)
    allv = np.concatenate(arrays) if sum(head) else np.empty(0, np.int64)
    small = not len(allv) or (allv.min() >= 0 and allv.max() < 2**31)
    dtype = np.int32 if small else np.int64
    return np.concatenate([head.astype(dtype), allv.astype(dtype, copy=False)])


def unpack_labels(buf: np.ndarray) -> tuple[np.ndarray, ...]:
    """Inverse of :func:`pack_labels`: (trial gallery, trial probe, commit gallery, commit
    probe) as int64."""
    buf = np.asarray(buf)
    n = [int(v) for v in buf[:4]]
    cuts = np.cumsum([4] + n)
    return tuple(buf[a:b].astype(np.int64) for a, b in zip(cuts[:-1], cuts[1:]))


def index_checksum(state: dict[str, Any]) -> str:
    """SHA-256 over a ``PoolIndex.state_dict()`` (keys sorted; arrays by dtype, shape, bytes)."""
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        h.update(key.encode())
        if isinstance(value, np.ndarray):
            h.update(str(value.dtype).encode() + str(value.shape).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


class PoolIndexActor:
    """Actor body (wrapped by :func:`create_pool_actor`); one per run, one call per step."""

    def __init__(self, capacity: int, policy: str = "lru", num_labels: int = 0) -> None:
        if not 0 < int(capacity) < 2**31:
            raise ValueError(f"pool capacity {capacity} must be in [1, 2**31)")
        self._capacity = int(capacity)
        self._policy = str(policy)
        self._num_labels = int(num_labels)
        self._index = self._new_index()
        self._step: int | None = None  # None: no state yet (new or restarted actor)
        self._cache: tuple[int, np.ndarray] | None = None
        self._plans = 0
        self._restarted = _was_reconstructed()
        if self._restarted:
            log.warning("pool actor restarted without its index; waiting for load_state")

    # ---- state ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Counters for tests and logs: step (None = lost), size, restarts, plans served."""
        return {
            "step": self._step,
            "capacity": self._capacity,
            "policy": self._policy,
            "size": len(self._index),
            "restarted": self._restarted,
            "plans": self._plans,
        }

    def _new_index(self) -> PoolIndex:
        return PoolIndex(self._capacity, self._policy, self._num_labels)

    def reset(self) -> int:
        """Empty index at step 0 (a fresh run, or a restart before the first checkpoint)."""
        self._index = self._new_index()
        self._step = 0
        self._cache = None
        return 0

    def load_state(self, state: dict[str, Any] | None, step: int) -> str:
        """Restore the index saved with the checkpoint of ``step``; returns its checksum."""
        index = self._new_index()
        if state is not None:
            index.load_state_dict(state)
        self._index = index
        self._step = int(step)
        self._cache = None
        return index_checksum(index.state_dict())

    def get_state(self) -> tuple[dict[str, Any] | None, int | None]:
        """(``PoolIndex.state_dict()``, step) for the checkpoint; state None when lost."""
        if self._step is None:
            return None, None
        return self._index.state_dict(), self._step

    # ---- the per-step call ------------------------------------------------------------------
    def plan_packed(self, step: int, labels: np.ndarray) -> np.ndarray:
        """:meth:`plan` with the labels in one array (:func:`pack_labels`): the wire format."""
        return self.plan(step, *unpack_labels(labels))

    def plan(
        self,
        step: int,
        trial_gallery: np.ndarray,
        trial_probe: np.ndarray,
        commit_gallery: np.ndarray,
        commit_probe: np.ndarray,
    ) -> np.ndarray:
        """Slots for step ``step`` (0-based): :func:`plan_step` once, packed; idempotent."""
        n = (len(trial_gallery), len(trial_probe), len(commit_gallery), len(commit_probe))
        if self._step is None:
            return status_answer(STATUS_LOST, None, *n)
        if self._cache is not None and self._cache[0] == step and self._step == step + 1:
            return self._cache[1]  # a retried call: same answer, the LRU advanced once
        if step != self._step:
            return status_answer(STATUS_OUT_OF_SYNC, self._step, *n)
        t0 = time.perf_counter_ns()
        slots = plan_step(self._index, trial_gallery, trial_probe, commit_gallery, commit_probe)
        packed = pack_slots(slots, STATUS_OK, step, (time.perf_counter_ns() - t0) // 1000)
        self._step = step + 1
        self._cache = (step, packed)
        self._plans += 1
        return packed


def _was_reconstructed() -> bool:
    try:
        import ray

        if not ray.is_initialized():
            return False
        ctx = ray.get_runtime_context()
        if ctx.get_actor_id() is None:
            return False
        with warnings.catch_warnings():  # the property reads the deprecated ``actor_id``
            warnings.simplefilter("ignore", DeprecationWarning)
            return bool(ctx.was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - outside an actor (plain object in unit tests)
        return False


def create_pool_actor(
    run_name: str,
    capacity: int,
    policy: str = "lru",
    *,
    num_labels: int = 0,
    namespace: str | None = None,
    timeout_s: float = 120.0,
) -> Any:
    """Create (or join, ``get_if_exists``) the run's actor and wait until it answers.

    No CPU reservation (``num_cpus=0``): it must not take a training worker's CPU. It restarts
    forever (``max_restarts=-1``) and retries calls (``max_task_retries=-1``): safe, because a
    restarted actor refuses to plan until it is reloaded and a duplicate call for a step it has
    already planned returns the cached answer. A joined actor with another capacity or policy is
    an error (two runs with one name); a joined actor that is being killed is waited out.
    """
    import ray

    remote_cls = ray.remote(PoolIndexActor)
    deadline = time.monotonic() + timeout_s
    while True:
        handle = remote_cls.options(
            name=actor_name(run_name),
            namespace=namespace,
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=1,
        ).remote(int(capacity), str(policy), int(num_labels))
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=timeout_s)
            info = ray.get(handle.info.remote(), timeout=timeout_s)
            break
        except ray.exceptions.RayActorError:  # joined an actor that is going away
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    if info["capacity"] != int(capacity) or info["policy"] != policy:
        raise ValueError(
            f"pool actor {actor_name(run_name)!r} already exists with capacity "
            f"{info['capacity']} / policy {info['policy']!r}, not {capacity} / {policy!r}: "
            "use another run name (--name)"
        )
    return handle


def kill_pool_actor(handle: Any, wait_s: float = 10.0) -> None:
    """End the run's actor for good (no restart) and wait until it is gone, so the name is free."""
    import ray

    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=wait_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.05)
