"""Collectives for the replicated Dynamic Class Pool: gallery all-gather and the planned slots.

Every worker holds the whole pool (C x K x D) and must apply the same writes in the same order
(F2C's pool update, docs/reference.md 1.4: "pool sharing = replication"). So:

* :func:`gather_gallery` gathers G-Net gallery features of all ranks in rank order (no
  gradient: the gallery side never back-propagates);
* :class:`ActorPlanner` is the Trainer's ``plan`` hook: the step's labels of all ranks are
  gathered once (:meth:`ActorPlanner.prefetch`), rank 0 sends the four label arrays to the
  pool-index actor in one call and broadcasts the packed answer; every rank unpacks it and
  keeps its own probe slice.

A non-OK answer (the actor restarted and lost its index, or is out of step) is broadcast too, so
all ranks raise :class:`PoolActorLost` together and Ray Train restarts the group from the last
checkpoint, where the index is reloaded (see ``ffc_ray/ray/train.py``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from ffc_ray.pool.actor import (
    STATUS_ERROR,
    STATUS_LOST,
    STATUS_OK,
    pack_labels,
    packed_length,
    status_answer,
    unpack_slots,
)
from ffc_ray.pool.plan import StepSlots

log = logging.getLogger(__name__)


class PoolActorLost(RuntimeError):
    """The pool-index actor cannot serve this step; restart from the last checkpoint."""


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """Where collective buffers live: CPU for gloo, this rank's CUDA device for nccl."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _comm_device(t: torch.Tensor) -> torch.device:
    if t.is_cuda and dist.get_backend() == "nccl":
        return t.device
    return comm_device()


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` of every rank along dim 0, in rank order (equal shapes required)."""
    rank, size = world()
    if size == 1:
        return tensor
    dev = _comm_device(tensor)
    local = tensor.detach().to(dev).contiguous()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def gather_gallery(features: torch.Tensor) -> torch.Tensor:
    """The Trainer's ``gather`` hook: all ranks' gallery features, rank order (their labels are
    gathered once per step by :meth:`ActorPlanner.prefetch`)."""
    return all_gather_cat(features)


def broadcast_array(
    buf: np.ndarray | None,
    length: int,
    src: int = 0,
    dtype: torch.dtype = torch.int32,
    device: torch.device | None = None,
) -> np.ndarray:
    """Broadcast an integer array of known ``length`` from ``src`` (``buf`` ignored elsewhere)."""
    rank, size = world()
    if size == 1:
        assert buf is not None
        return np.asarray(buf)
    dev = device or comm_device()
    if rank == src:
        if buf is None or len(buf) != length:
            n = None if buf is None else len(buf)
            raise ValueError(f"broadcast_array: rank {src} holds {n} values, expected {length}")
        t = torch.from_numpy(np.ascontiguousarray(buf)).to(device=dev, dtype=dtype)
    else:
        t = torch.empty(length, dtype=dtype, device=dev)
    dist.broadcast(t, src=src)
    return t.cpu().numpy()


def all_gather_strings(s: str, max_len: int = 128) -> list[str]:
    """Gather one short ASCII string per rank (e.g. checksums), rank order."""
    rank, size = world()
    if size == 1:
        return [s]
    raw = s.encode()[:max_len].ljust(max_len, b"\0")
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
    out = all_gather_cat(t.view(1, -1))
    return [bytes(row.to(torch.uint8).tolist()).rstrip(b"\0").decode() for row in out]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


class ActorPlanner:
    """The Trainer's ``plan`` hook in a Ray Train run: one actor round trip per step, from rank 0.

    ``step`` is the 0-based step being planned; the worker sets it from ``Trainer.step`` before
    every ``train_step`` (the actor uses it to make the call idempotent). ``actor`` is the actor
    handle (only rank 0 uses it).

    Pipelining: the slots depend on labels only, and the labels of a step are known before its
    forward passes. :meth:`prefetch` (called by the worker loop with the step's local labels on
    every rank, before ``train_step``) gathers all ranks' labels and submits the actor call at
    once, so the round trip runs during the EMA update and the G-Net forward; the hook then only
    waits for the answer (``last_wait_ms``), checks that the Trainer asks for exactly those
    labels, and broadcasts. ``last_latency_ms`` is the submit-to-answer time seen by rank 0
    (the round trip when nothing overlaps it), ``last_actor_ms`` the time inside the actor.
    """

    def __init__(self, actor: Any, timeout_s: float = 300.0, symmetric: bool = True) -> None:
        self.actor = actor
        self.timeout_s = float(timeout_s)
        self.symmetric = bool(symmetric)
        self.step = 0
        self.last_latency_ms = 0.0
        self.last_wait_ms = 0.0
        self.last_actor_ms = 0.0
        self._error: BaseException | None = None
        self._pending: dict[str, Any] | None = None

    # ---- rank 0: the call --------------------------------------------------------------------
    def _submit(
        self, tg: np.ndarray, tp: np.ndarray, cg: np.ndarray, cp: np.ndarray
    ) -> dict[str, Any]:
        """Rank 0: submit the actor call (answered while the step computes)."""
        ref = self.actor.plan_packed.remote(self.step, pack_labels(tg, tp, cg, cp))
        return {"t0": time.perf_counter(), "ref": ref}

    def _answer(self, pending: dict[str, Any]) -> np.ndarray:
        """Rank 0: wait for the answer; failures become a status so that every rank can raise."""

        t_wait = time.perf_counter()
        try:
            packed = ray.get(pending["ref"], timeout=self.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            log.error("pool actor unreachable at step %d: %s", self.step, exc)
            packed = status_answer(STATUS_LOST, None, *pending["n"])
        except Exception as exc:  # noqa: BLE001 - re-raised on rank 0 after the broadcast
            self._error = exc
            packed = status_answer(STATUS_ERROR, None, *pending["n"])
        now = time.perf_counter()
        self.last_wait_ms = (now - t_wait) * 1e3
        self.last_latency_ms = (now - pending["t0"]) * 1e3
        return packed

    # ---- all ranks ---------------------------------------------------------------------------
    def _gather(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every rank's copy of each local label array, rank order, in ONE all-gather."""
        arrays = tuple(np.asarray(a, np.int64).reshape(-1) for a in arrays)
        if world()[1] == 1:
            return arrays
        both = all_gather_cat(torch.from_numpy(np.concatenate(arrays)).view(1, -1))
        cuts = np.cumsum([0, *(len(a) for a in arrays)])
        return tuple(both[:, lo:hi].reshape(-1).numpy() for lo, hi in zip(cuts[:-1], cuts[1:]))

    def _start(self, local: tuple, labels: tuple) -> None:
        """Remember the step's local and gathered labels; rank 0 submits the call."""
        self._pending = {"n": tuple(len(a) for a in labels), "step": self.step, "local": local}
        if world()[0] == 0:
            self._pending.update(self._submit(*labels))

    def prefetch(self, lx: np.ndarray, ly: np.ndarray) -> None:
        """Before ``train_step`` on every rank: gather the step's labels (the only label
        all-gather of the step), submit the call."""
        lx, ly = np.asarray(lx, np.int64), np.asarray(ly, np.int64)
        lx_all, ly_all = self._gather(lx, ly)
        empty = np.empty(0, np.int64)
        if self.symmetric:  # trial: gallery y, probes x; commit: gallery x, probes y
            self._start((ly, lx, lx, ly), (ly_all, lx_all, lx_all, ly_all))
        else:
            self._start((empty, empty, lx, ly), (empty, empty, lx_all, ly_all))

    def __call__(
        self,
        trial_gallery: np.ndarray,
        trial_probe: np.ndarray,
        commit_gallery: np.ndarray,
        commit_probe: np.ndarray,
    ) -> StepSlots:
        """The Trainer's ``plan`` hook: this rank's four label arrays -> slots of every rank's
        galleries and of this rank's probes."""
        rank, size = world()
        local = tuple(
            np.asarray(a, np.int64)
            for a in (trial_gallery, trial_probe, commit_gallery, commit_probe)
        )
        if self._pending is None:  # not prefetched: gather and call now
            self._start(local, self._gather(*local))
        pending, self._pending = self._pending, None
        if pending["step"] != self.step:
            raise RuntimeError(
                f"ActorPlanner: prefetched step {pending['step']}, asked for {self.step}"
            )
        if not all(np.array_equal(a, b) for a, b in zip(local, pending["local"])):
            raise RuntimeError("ActorPlanner: the prefetched labels differ from the step's")
        n = pending["n"]
        if n != tuple(size * len(a) for a in local):
            raise RuntimeError(
                f"ActorPlanner: label counts {n} do not match the step's "
                f"{tuple(len(a) for a in local)} x {size} ranks (equal batches per rank "
                "are required)"
            )
        n_tp, n_cp = len(local[1]), len(local[3])
        packed = self._answer(pending) if rank == 0 else None
        packed = broadcast_array(packed, packed_length(*n))
        status, actor_step, plan_us, slots = unpack_slots(packed)
        self.last_actor_ms = plan_us / 1e3
        if status == STATUS_ERROR:
            if self._error is not None:
                raise self._error
            raise RuntimeError(f"pool actor call failed on rank 0 at step {self.step}")
        if status != STATUS_OK or slots is None:
            why = (
                "restarted and lost its index"
                if status == STATUS_LOST
                else (f"is at step {actor_step}")
            )
            raise PoolActorLost(
                f"pool actor {why}, the worker is at step {self.step}; "
                "restarting from the last checkpoint"
            )
        # keep this rank's probe slots (rank-order blocks of equal size)
        slots.trial_probe = slots.trial_probe[rank * n_tp : (rank + 1) * n_tp]
        slots.commit_probe = slots.commit_probe[rank * n_cp : (rank + 1) * n_cp]
        self.step += 1
        return slots
