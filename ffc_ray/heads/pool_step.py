"""The DCP head's training step (F2C, arXiv 2105.10375; the official ``FFC.forward``).

1. G-Net <- EMA of P-Net (once per step);
2. G-Net features of both views under ``no_grad`` (train-mode BN, as the official code), passed
   through the ``gather`` hook (all-gather across workers, rank order; identity in one process);
3. ONE ``plan`` call with this worker's four label arrays (trial gallery y, trial probes x,
   commit gallery x, commit probes y) -> :class:`~ffc_ray.pool.plan.StepSlots` for the
   gathered galleries and this worker's probes (a local ``PoolIndex`` in one process; in Ray the
   pool actor, whose planner gathers every rank's labels once per step);
4. pass A (trial; skipped when ``head.symmetric`` is false): P(x) probes, write G(y) into the
   pool, loss, backward, restore the pool rows;
5. pass B (commit): P(y) probes, write G(x) for good, loss, backward.

Writes happen before the logits are taken and restores after ``backward``, so no tensor saved
by autograd is ever modified in place. The trainer then clips, steps the optimiser and the
schedule (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ffc_ray.engine.ema import ema_update
from ffc_ray.heads.base import StepContext, upcast
from ffc_ray.pool.index import PoolIndex
from ffc_ray.pool.plan import StepSlots, plan_step

if TYPE_CHECKING:
    from ffc_ray.config import Config
    from ffc_ray.heads.ffc import FFCHead

_EMPTY = np.empty(0, dtype=np.int64)


class PoolStep:
    """Owns the G-Net (a frozen copy of the P-Net, EMA-updated) and, in one process, the pool
    index; checkpoints hold both (``gnet``, ``index``; in Ray the actor keeps the index)."""

    def __init__(self, head: FFCHead, ctx: StepContext, cfg: Config) -> None:
        self.head = head
        self.ctx = ctx
        self.momentum = float(cfg.pool.momentum)
        self.ema_buffers = bool(cfg.pool.ema_buffers)
        self.gnet: nn.Module = copy.deepcopy(ctx.pnet)
        for prm in self.gnet.parameters():
            prm.requires_grad_(False)
        self.gnet.train()  # official: batch-statistics BN inside no_grad
        local = ctx.plan is None
        self.index = PoolIndex(head.capacity, cfg.pool.policy, ctx.num_classes) if local else None

    def _plan(self, tg: np.ndarray, tp: np.ndarray, cg: np.ndarray, cp: np.ndarray) -> StepSlots:
        if self.ctx.plan is not None:
            return self.ctx.plan(tg, tp, cg, cp)
        return plan_step(self.index, tg, tp, cg, cp)

    def __call__(
        self, x: torch.Tensor, lx: np.ndarray, y: torch.Tensor, ly: np.ndarray
    ) -> dict[str, float]:
        head, ctx = self.head, self.ctx
        symmetric = head.symmetric
        ema_update(self.gnet, ctx.pnet, self.momentum, self.ema_buffers)
        with torch.no_grad(), ctx.autocast():
            gy = upcast(self.gnet(y)) if symmetric else None
            gx = upcast(self.gnet(x))
        gy = ctx.gather(gy) if gy is not None else None
        gx = ctx.gather(gx)
        slots = self._plan(*((ly, lx) if symmetric else (_EMPTY, _EMPTY)), lx, ly)

        outs = []
        if symmetric:
            no_sync = getattr(ctx.forward, "no_sync", None)  # DDP: one all-reduce, in pass B
            with no_sync() if callable(no_sync) else contextlib.nullcontext():
                with ctx.autocast():
                    px = ctx.forward(x)
                undo = head.write(gy, slots.trial_gallery, slots.trial_new)
                hit = head.hit_slots(slots.trial_gallery, slots.trial_new)
                out_a = head.loss(px, slots.trial_probe, hit)
                ctx.backward(out_a.loss)
                head.restore(undo)
            outs.append((float(out_a.loss.detach()), out_a.metrics))
            del px, out_a
        with ctx.autocast():
            py = ctx.forward(y)
        head.write(gx, slots.commit_gallery, slots.commit_new)
        out_b = head.loss(
            py, slots.commit_probe, head.hit_slots(slots.commit_gallery, slots.commit_new)
        )
        ctx.backward(out_b.loss)
        outs.append((float(out_b.loss.detach()), out_b.metrics))
        return _pass_metrics(outs, slots)

    def state_dict(self) -> dict[str, Any]:
        index = self.index.state_dict() if self.index is not None else None
        return {"gnet": self.gnet.state_dict(), "index": index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("gnet") is None:
            raise KeyError("Trainer.load_state_dict: ffc checkpoint lacks 'gnet'")
        self.gnet.load_state_dict(state["gnet"])
        if self.index is not None:
            if state.get("index") is None:
                raise KeyError("Trainer.load_state_dict: ffc checkpoint lacks 'index'")
            self.index.load_state_dict(state["index"])


def _pass_metrics(outs: list[tuple[float, dict]], slots: StepSlots) -> dict[str, float]:
    """Losses add up over the passes (loss = A + B); the other metrics are pass averages."""
    metrics = {k: float(np.mean([m[k] for _, m in outs if k in m])) for k in outs[-1][1]}
    for k in ("loss_pos", "loss_neg", "num_pos", "num_neg"):
        metrics[k] = float(sum(m.get(k, 0.0) for _, m in outs))
    metrics.update(
        loss=float(sum(v for v, _ in outs)),
        occupancy=float(slots.occupancy),
        evictions=float(slots.evictions),
    )
    return metrics
