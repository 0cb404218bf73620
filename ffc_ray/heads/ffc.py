"""The Dynamic Class Pool (DCP) head of F2C / FFC (Wang et al., CVPR 2022, arXiv 2105.10375).

The pool replaces the N x D classifier by C identities x K feature rows, written by the G-Net
(EMA of the P-Net) and indexed by an identity -> slot cache (:mod:`ffc_ray.pool.index`). The head
owns only the tensors; slots come from outside (a local ``PoolIndex`` or the Ray pool actor), so
the same head runs in one process and replicated on every DDP worker.

Per pass the engine calls :meth:`FFCHead.write` (gallery rows in, an undo record out),
:meth:`FFCHead.loss` (probes against the C columns) and, for the trial pass,
:meth:`FFCHead.restore` after ``backward``. The pool is a buffer: no gradient reaches it.

Semantics (defaults follow the official ``tiandunx/FFC`` code, see docs/reference.md 1.1-1.2):

* ring write: a new identity fills row 0 (``ring_pos = 1``, ``row_count = 1``); a returning one
  fills row ``ring_pos`` (then ``ring_pos += 1 mod K``, ``row_count = min(K, row_count + 1)``).
  Occurrences are applied in order; where one (row, slot) is written twice in a call the LAST
  write wins (the official scatter leaves that nondeterministic).
* ``k_mode="ring"`` (official): K logit sets; set k takes row k for the columns of identities
  re-seen (hit) in this pass whose row k is valid, row 0 elsewhere; for K = 2 these are the
  official ``cos_theta1`` / ``cos_theta2``. Loss = sum over the sets.
* ``k_mode="mean"`` (the paper's eq. 8, implemented from the description "mean over the valid
  rows of the cosine"; the equation text was not available to us): one logit set, the mean of
  the cosines to the slot's valid rows = the cosine with the unnormalised mean feature.
* positives (probe slot != -1): margin softmax over the C columns (scaled logits from the margin
  module) and cross entropy, mean over positive rows.
* negatives (probe slot == -1): ``neg_loss="topk"`` (official): mean over (rows x top_k) of
  max(0, cos) of the top_k largest cosines, no scale, no margin; ``"mean_cos"`` (the paper's
  eq. 10 as described, text not available to us): mean over (rows x C) of max(0, cos).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ffc_ray.config import Config, ConfigError
from ffc_ray.heads import parallel
from ffc_ray.heads.base import Head, HeadOutput, upcast
from ffc_ray.heads.fc import owned_margin_logits, shard_of
from ffc_ray.heads.margins import build_margin
from ffc_ray.heads.pool_step import PoolStep
from ffc_ray.registry import HEADS

log = logging.getLogger(__name__)

ArrayLike = torch.Tensor | np.ndarray


@dataclass
class WriteUndo:
    """What :meth:`FFCHead.write` overwrote, enough to restore the pool bit for bit."""

    rows: torch.Tensor  # int64 [U] ring row of each touched (row, slot)
    slots: torch.Tensor  # int64 [U]
    old_vectors: torch.Tensor  # float32 [U, D]
    touched: torch.Tensor  # int64 [S] distinct slots written
    old_ring_pos: torch.Tensor  # int64 [S]
    old_row_count: torch.Tensor  # int64 [S]


@dataclass
class RingPlan:
    """Result of replaying a call's ring updates (see :func:`plan_ring_writes`)."""

    rows: torch.Tensor  # int64 [G] row written by each occurrence
    keep: torch.Tensor  # bool [G] occurrence is the last write to its (row, slot)
    touched: torch.Tensor  # int64 [S] distinct slots
    final_ring_pos: torch.Tensor  # int64 [S]
    final_row_count: torch.Tensor  # int64 [S]


def plan_ring_writes(
    slots: torch.Tensor,
    new: torch.Tensor,
    ring_pos: torch.Tensor,
    row_count: torch.Tensor,
    k: int,
) -> RingPlan:
    """Replay the sequential ring rule for a whole call at once (no Python loop over occurrences).

    Occurrences are grouped by slot with a stable sort (so order inside a slot is kept). Inside a
    group an occurrence either follows a ``new`` occurrence of the same call (then its row is its
    distance to that occurrence, mod K) or continues the slot's stored ring (row =
    ``ring_pos + hits so far``, mod K).
    """
    g = slots.numel()
    dev = slots.device
    order = torch.sort(slots, stable=True).indices
    s_sorted = slots[order]
    n_sorted = new[order]
    idx = torch.arange(g, device=dev)
    is_start = torch.ones(g, dtype=torch.bool, device=dev)
    if g > 1:
        is_start[1:] = s_sorted[1:] != s_sorted[:-1]
    group_start = torch.cummax(torch.where(is_start, idx, torch.zeros_like(idx)), 0).values
    last_new = torch.cummax(torch.where(n_sorted, idx, torch.full_like(idx, -1)), 0).values
    after_new = last_new >= group_start  # a new occurrence of this slot precedes (or is) this one

    since_new = idx - last_new  # 0 for the new occurrence itself
    hits = idx - group_start + 1  # hits so far in this group (when no new precedes)
    ring0 = ring_pos[s_sorted]
    count0 = row_count[s_sorted]
    row_sorted = torch.where(after_new, since_new % k, (ring0 + hits - 1) % k)
    ring_after = torch.where(after_new, (since_new + 1) % k, (ring0 + hits) % k)
    count_after = torch.where(
        after_new, torch.clamp(since_new + 1, max=k), torch.clamp(count0 + hits, max=k)
    )

    rows = torch.empty_like(row_sorted)
    rows[order] = row_sorted

    is_end = torch.ones(g, dtype=torch.bool, device=dev)
    if g > 1:
        is_end[:-1] = s_sorted[1:] != s_sorted[:-1]
    touched = s_sorted[is_end]

    # last write wins per (row, slot): stable sort by key, keep the last of each run
    key = rows * (int(slots.max().item()) + 1 if g else 1) + slots
    korder = torch.sort(key, stable=True).indices
    k_sorted = key[korder]
    k_end = torch.ones(g, dtype=torch.bool, device=dev)
    if g > 1:
        k_end[:-1] = k_sorted[1:] != k_sorted[:-1]
    keep = torch.zeros(g, dtype=torch.bool, device=dev)
    keep[korder[k_end]] = True
    return RingPlan(rows, keep, touched, ring_after[is_end], count_after[is_end])


@HEADS.register("ffc")
class FFCHead(Head):
    """The DCP head: pool buffers, ring writes with undo, and the positive + negative loss.

    ``capacity`` C pool identities of ``k_per_id`` rows of ``embedding_dim`` floats, initialised
    from ``seed``; ``margin`` scores the C columns (any margin but the FC-only ones);
    ``top_k``, ``k_mode``, ``neg_loss`` and ``symmetric`` as in ``HeadConfig``.
    :meth:`from_config` builds it from a run's config. Its step is :class:`PoolStep`.
    """

    step_class = PoolStep

    def __init__(
        self,
        capacity: int,
        embedding_dim: int,
        margin: nn.Module,
        *,
        k_per_id: int = 2,
        top_k: int = 3,
        k_mode: str = "ring",
        neg_loss: str = "topk",
        symmetric: bool = True,
        seed: int = 0,
        sharded: bool = False,
    ) -> None:
        super().__init__()
        if getattr(margin, "fc_only", False):
            name = type(margin).__name__
            raise ValueError(f"config field 'head.margin_type': {name} is FC-only")
        self.capacity = int(capacity)  # C of the whole run (global slot numbers)
        self.sharded, self.start, self.end = shard_of(capacity, sharded, margin, "ffc head")
        local = self.end - self.start  # slots stored here: all, or this rank's block
        self.k_per_id = int(k_per_id)
        self.top_k = min(int(top_k), self.capacity)
        if self.sharded and self.top_k > self.capacity // parallel.world()[1]:
            raise ConfigError(
                f"config field 'head.top_k': {self.top_k} exceeds the smallest pool shard "
                f"({self.capacity // parallel.world()[1]} slots)"
            )
        self.k_mode = k_mode
        self.neg_loss = neg_loss
        self.symmetric = bool(symmetric)
        self.embedding_dim = int(embedding_dim)
        self.margin = margin

        gen = torch.Generator().manual_seed(int(seed) + self.start * 1_000_003)
        pool = torch.rand(self.k_per_id, local, self.embedding_dim, generator=gen)
        self.register_buffer("pool", F.normalize(pool, dim=2))
        self.register_buffer("ring_pos", torch.zeros(local, dtype=torch.int64))
        self.register_buffer("row_count", torch.zeros(local, dtype=torch.int64))
        # optimiser steps taken, for the margin's schedule (SphereFace); kept in checkpoints
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int, margin: nn.Module | None = None) -> FFCHead:
        """The head of ``cfg`` (``head``, ``pool`` for C, ``model.embedding_dim``,
        ``train.seed``); ``margin`` overrides the one ``head.margin_type`` names (tests). The
        margin and the pool size were checked before the run (``config.validate`` and
        :func:`ffc_ray.preflight.check_run`)."""
        h = cfg.head
        capacity = int(cfg.pool_capacity(num_classes))
        if margin is None:
            margin = build_margin(h, capacity)
        return cls(
            capacity,
            cfg.model.embedding_dim,
            margin,
            k_per_id=h.k_per_id,
            top_k=h.resolved_top_k(capacity),
            k_mode=h.k_mode,
            neg_loss=h.neg_loss,
            symmetric=h.symmetric,
            seed=cfg.train.seed,
            sharded=h.parallel == "sharded",
        )

    # ---- pool writes --------------------------------------------------------------------
    def _as_index(self, a: ArrayLike | None) -> torch.Tensor:
        if a is None:
            return torch.empty(0, dtype=torch.int64, device=self.pool.device)
        return torch.as_tensor(a, device=self.pool.device).reshape(-1).to(torch.int64)

    @torch.no_grad()
    def write(self, gallery: torch.Tensor, slots: ArrayLike, new: ArrayLike) -> WriteUndo:
        """Write gallery features [G, D] (raw; normalised here) into their slots as a ring.

        ``new[i]`` says occurrence i was a cache miss (its identity starts fresh in that slot).
        Returns the undo record for :meth:`restore`.
        """
        slots_t = self._as_index(slots)
        new_t = torch.as_tensor(new, device=self.pool.device).reshape(-1).to(torch.bool)
        g = slots_t.numel()
        if gallery.ndim != 2 or gallery.shape[0] != g or new_t.numel() != g:
            raise ValueError(
                f"FFCHead.write: gallery {tuple(gallery.shape)}, slots ({g},), new "
                f"({new_t.numel()},) disagree"
            )
        if gallery.shape[1] != self.embedding_dim:
            raise ValueError(
                f"FFCHead.write: gallery dim {gallery.shape[1]} != model.embedding_dim "
                f"{self.embedding_dim}"
            )
        if g and (int(slots_t.min()) < 0 or int(slots_t.max()) >= self.capacity):
            raise ValueError(
                f"FFCHead.write: slots must lie in [0, {self.capacity}), got "
                f"[{int(slots_t.min())}, {int(slots_t.max())}]"
            )
        if self.sharded:  # the gathered gallery: keep what lands in this rank's slots
            mine = (slots_t >= self.start) & (slots_t < self.end)
            slots_t, new_t, gallery = slots_t[mine] - self.start, new_t[mine], gallery[mine]
            g = slots_t.numel()
        empty = torch.empty(0, dtype=torch.int64, device=self.pool.device)
        if g == 0:
            return WriteUndo(
                empty, empty, self.pool.new_empty(0, self.embedding_dim), empty, empty, empty
            )
        plan = plan_ring_writes(slots_t, new_t, self.ring_pos, self.row_count, self.k_per_id)
        rows, cols = plan.rows[plan.keep], slots_t[plan.keep]
        feats = F.normalize(gallery.detach().to(self.pool.dtype), dim=1)[plan.keep]
        undo = WriteUndo(
            rows=rows,
            slots=cols,
            old_vectors=self.pool[rows, cols].clone(),
            touched=plan.touched,
            old_ring_pos=self.ring_pos[plan.touched].clone(),
            old_row_count=self.row_count[plan.touched].clone(),
        )
        self.pool[rows, cols] = feats  # (row, slot) pairs are unique after `keep`
        self.ring_pos[plan.touched] = plan.final_ring_pos
        self.row_count[plan.touched] = plan.final_row_count
        return undo

    @torch.no_grad()
    def restore(self, undo: WriteUndo) -> None:
        """Undo one :meth:`write` exactly (call after ``backward`` of the loss that used it)."""
        self.pool[undo.rows, undo.slots] = undo.old_vectors
        self.ring_pos[undo.touched] = undo.old_ring_pos
        self.row_count[undo.touched] = undo.old_row_count

    @staticmethod
    def hit_slots(slots: ArrayLike, new: ArrayLike) -> np.ndarray | torch.Tensor:
        """Slots of the gallery cache hits (the ``seen_slots`` of :meth:`loss`)."""
        if isinstance(slots, torch.Tensor):
            return slots[~torch.as_tensor(new, device=slots.device).to(torch.bool)]
        return np.asarray(slots)[~np.asarray(new, dtype=bool)]

    # ---- logits ---------------------------------------------------------------------------
    def _cosine_sets(self, p: torch.Tensor, seen_slots: torch.Tensor) -> list[torch.Tensor]:
        """One [B, C] cosine matrix per logit set (K for ring mode, 1 for mean mode).

        Ring mode does ONE [B, D] x [D, C] product (row 0); set k > 0 differs from it only in the
        columns of slots hit in this pass whose row k is valid (at most the gallery size), so
        those columns are computed alone and patched in (``index_copy``, out of place: autograd
        sends the set's gradient of the unpatched columns back through the shared product, and
        the backward is one [B, C] x [C, D] product too)."""
        if self.k_mode == "mean":
            with torch.no_grad():
                n = self.row_count.clamp(min=1)  # never-written slots: their random row 0
                valid = torch.arange(self.k_per_id, device=n.device)[:, None] < n[None, :]
                center = (self.pool * valid[..., None]).sum(0) / n[:, None].to(self.pool.dtype)
            return [F.linear(p, center)]
        base = F.linear(p, self.pool[0])
        sets = [base]
        if self.k_per_id > 1:
            with torch.no_grad():
                seen = torch.unique(seen_slots) if seen_slots.numel() else seen_slots
            for k in range(1, self.k_per_id):
                with torch.no_grad():
                    cols = seen[self.row_count[seen] > k] if seen.numel() else seen
                if cols.numel() == 0:
                    sets.append(base)
                    continue
                patch = F.linear(p, self.pool[k].index_select(0, cols))
                sets.append(base.index_copy(1, cols, patch))
        return sets

    def _neg_term(self, cos_neg: torch.Tensor) -> torch.Tensor:
        if self.neg_loss == "topk":
            return cos_neg.topk(self.top_k, dim=1).values.clamp(min=0).mean()
        return cos_neg.clamp(min=0).mean()

    def loss(
        self,
        probe_raw: torch.Tensor,
        probe_slots: ArrayLike,
        seen_slots: ArrayLike | None = None,
    ) -> HeadOutput:
        """Positive margin CE + negative loss of raw probe embeddings [B, D] against the pool.

        ``probe_slots``: the probes' slots after this pass's gallery insertion (-1: not in the
        pool). ``seen_slots``: slots hit in this pass's gallery (ring mode uses their row k).
        """
        slots = self._as_index(probe_slots)
        if probe_raw.ndim != 2 or probe_raw.shape[0] != slots.numel():
            raise ValueError(
                f"FFCHead.loss: probes {tuple(probe_raw.shape)} and probe_slots "
                f"({slots.numel()},) disagree"
            )
        if slots.numel() and (int(slots.max()) >= self.capacity or int(slots.min()) < -1):
            raise ValueError(f"FFCHead.loss: probe slots must lie in [-1, {self.capacity})")
        seen = self._as_index(seen_slots)
        if self.sharded:
            return self._loss_sharded(upcast(probe_raw), slots, seen)
        raw = upcast(probe_raw)
        p = F.normalize(raw, dim=1)
        pos = slots >= 0
        neg = ~pos
        num_pos, num_neg = int(pos.sum()), int(neg.sum())
        zero = p.sum() * 0.0  # keeps a graph when a row set is empty
        loss_pos, loss_neg = zero, zero
        norms = raw.norm(dim=1)
        diag: dict[str, float] = {}
        everyone = num_neg == 0  # the usual case: no [B, C] row copies then
        target = slots if everyone else slots[pos]
        norms_pos = norms if everyone else norms[pos]
        for cos in self._cosine_sets(p, seen):
            if not diag:  # first logit set: mean target cosine / mean cosine to other columns
                diag = self._diagnostics(cos.detach(), slots, pos)
            if num_pos:
                cos_pos = cos if everyone else cos[pos]
                logits = self.margin(cos_pos, target, norms_pos)
                loss_pos = loss_pos + F.cross_entropy(upcast(logits), target)
            if num_neg:
                loss_neg = loss_neg + self._neg_term(cos if num_pos == 0 else cos[neg])
        if num_pos and getattr(self.margin, "has_extra_loss", False):  # MagFace regulariser
            loss_pos = loss_pos + self.margin.extra_loss(norms_pos)
        total = loss_pos + loss_neg
        b = max(1, slots.numel())
        metrics = {
            "loss_pos": float(loss_pos.detach()),
            "loss_neg": float(loss_neg.detach()),
            "pos_fraction": num_pos / b,
            "num_pos": float(num_pos),
            "num_neg": float(num_neg),
            **diag,
        }
        return HeadOutput(total, metrics)

    def _loss_sharded(
        self, raw: torch.Tensor, slots: torch.Tensor, seen: torch.Tensor
    ) -> HeadOutput:
        """:meth:`loss` of every rank's probes (gathered) against this rank's slots: the
        positives' softmax across the shards, the negatives' top-K merged over the shards."""
        raw, slots = parallel.gather(raw), parallel.gather_labels(slots)
        p = F.normalize(raw, dim=1)
        own = (seen >= self.start) & (seen < self.end)
        seen = seen[own] - self.start
        pos = slots >= 0
        num_pos, num_neg = int(pos.sum()), int((~pos).sum())
        target = torch.where((slots >= self.start) & (slots < self.end), slots - self.start, -1)[
            pos
        ]
        norms = raw.norm(dim=1)[pos]
        loss_pos = loss_neg = p.sum() * 0.0
        diag: dict[str, float] = {}
        for cos in self._cosine_sets(p, seen):
            if not diag:
                diag = self._diagnostics_sharded(cos.detach(), target, pos)
            if num_pos:
                logits = owned_margin_logits(self.margin, cos[pos], target, norms)
                loss_pos = loss_pos + parallel.cross_entropy(logits, target)
            if num_neg:
                loss_neg = loss_neg + self._neg_term_sharded(cos[~pos])
        metrics = {
            "loss_pos": float(loss_pos.detach()),
            "loss_neg": float(loss_neg.detach()),
            "pos_fraction": num_pos / max(1, slots.numel()),
            "num_pos": float(num_pos),
            "num_neg": float(num_neg),
            **diag,
        }
        return HeadOutput(loss_pos + loss_neg, metrics)

    def _neg_term_sharded(self, cos_neg: torch.Tensor) -> torch.Tensor:
        """:meth:`_neg_term` over every shard's columns: this rank's entries of the global top-K
        (or all its columns for ``mean_cos``), the global sum, this rank's gradient."""
        if self.neg_loss == "topk":
            top = cos_neg.topk(self.top_k, dim=1).values
            chosen = parallel.global_topk_mask(top, self.top_k)
            part = (top.clamp(min=0) * chosen).sum()
            return parallel.global_sum(part) / (cos_neg.shape[0] * self.top_k)
        part = cos_neg.clamp(min=0).sum()
        return parallel.global_sum(part) / (cos_neg.shape[0] * self.capacity)

    @torch.no_grad()
    def _diagnostics_sharded(
        self, cos: torch.Tensor, target: torch.Tensor, pos: torch.Tensor
    ) -> dict[str, float]:
        """:meth:`_diagnostics` summed over the shards (``target``: the positives' local
        column, -1 on other shards)."""
        rows = pos.nonzero().squeeze(1)[target >= 0]
        tgt = cos[rows, target[target >= 0]]
        sums = torch.tensor(
            [float(cos.sum(dtype=torch.float64)), cos.numel(), float(tgt.sum()), tgt.numel()],
            dtype=torch.float64,
            device=cos.device,
        )
        parallel.sum_(sums)
        total, count, t_sum, t_count = sums.tolist()
        out = {"cos_other": (total - t_sum) / max(1.0, count - t_count)}
        if bool(pos.any()):
            out["cos_target"] = t_sum / max(1.0, t_count)
        return out

    def _diagnostics(
        self, cos: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor
    ) -> dict[str, float]:
        """cos_target: mean cosine of positives to their own column; cos_other: mean cosine
        to every other column (a collapse of the embedding shows as cos_other -> 1)."""
        out = {}
        total = float(cos.sum(dtype=torch.float64))
        count = cos.numel()
        if bool(pos.any()):
            t = slots[pos]
            tgt = cos[pos.nonzero().squeeze(1), t]
            out["cos_target"] = float(tgt.mean())
            total -= float(tgt.sum(dtype=torch.float64))
            count -= int(t.numel())
        out["cos_other"] = total / count if count else 0.0
        return out

    def forward(  # type: ignore[override]
        self, probe_raw: torch.Tensor, probe_slots: ArrayLike, seen_slots: ArrayLike | None = None
    ) -> HeadOutput:
        """Alias of :meth:`loss` (the FFC head is driven by slots, not labels)."""
        return self.loss(probe_raw, probe_slots, seen_slots)

    # ---- bookkeeping ------------------------------------------------------------------------
    def occupancy(self) -> int:
        """Slots that hold a written identity feature."""
        return int((self.row_count > 0).sum())

    def extra_step(self, lr: float) -> None:
        """Advance the margin's schedule (SphereFace annealing); the pool has no optimiser."""
        self.iteration += 1
        step = getattr(self.margin, "step", None)
        if callable(step):
            step(int(self.iteration))
