"""The train step for every head, in pure torch; used alone and inside each Ray Train worker.

FFC step (F2C, arXiv 2105.10375; official ``FFC.forward``, docs/reference.md 1.3):

1. G-Net <- EMA of P-Net (once per step);
2. G-Net features of both views under ``no_grad`` (train-mode BN, as the official code), passed
   through the ``gather`` hook (all-gather across workers, rank order; identity in one process);
3. ONE ``plan`` call with this worker's four label arrays (trial gallery y, trial probes x,
   commit gallery x, commit probes y) -> :class:`~ffc_ray.pool.index.StepSlots` for the
   gathered galleries and this worker's probes (a local ``PoolIndex`` here; in Ray the pool
   actor, whose planner gathers every rank's labels once per step);
4. pass A (trial; skipped when ``head.symmetric`` is false): P(x) probes, write G(y) into the
   pool, loss, backward, restore the pool rows;
5. pass B (commit): P(y) probes, write G(x) for good, loss, backward;
6. clip, optimiser step, lr schedule step.

Writes happen before the logits are taken and restores after ``backward``, so no tensor saved
by autograd is ever modified in place. fc / partial_fc / triplet: one forward of the P-Net on
cat(x, y), the head's loss, backward, step, ``head.extra_step(lr)``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ffc_ray.config import Config
from ffc_ray.data.transforms import to_tensor_batch
from ffc_ray.engine.ema import ema_update
from ffc_ray.engine.schedule import build_scheduler
from ffc_ray.heads.base import upcast
from ffc_ray.registry import HEADS

log = logging.getLogger(__name__)

GatherFn = Callable[[torch.Tensor], torch.Tensor]
PlanFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Any]  # -> StepSlots


def _identity_gather(features: torch.Tensor) -> torch.Tensor:
    return features


def resolve_device(name: str) -> torch.device:
    """``train.device``: auto -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device, dtype: str = "float32") -> torch.dtype | None:
    """``train.amp`` -> autocast dtype, or None (off). CPU and float64 runs never autocast."""
    if device.type != "cuda" or mode == "off" or dtype == "float64":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _labels_np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    return np.asarray(a, dtype=np.int64).reshape(-1)


class Trainer:
    """P-Net (+ G-Net and pool for ffc), head, optimiser, schedule and AMP for one worker.

    ``gather(features)`` all-gathers gallery features in rank order (default: identity);
    ``plan(trial_gallery, trial_probe, commit_gallery, commit_probe) -> StepSlots`` takes this
    worker's labels and gives the slots of every rank's gallery and of this worker's probes
    (default: :func:`ffc_ray.pool.index.plan_step` on a local ``PoolIndex``, one worker);
    ``ddp_wrap(module) -> module`` wraps the P-Net for data-parallel training.
    """

    def __init__(
        self,
        cfg: Config,
        num_classes: int,
        device: torch.device | str = "cpu",
        *,
        gather: GatherFn | None = None,
        plan: PlanFn | None = None,
        ddp_wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        from ffc_ray.models import build_backbone

        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.is_ffc = cfg.head.type == "ffc"
        self.step = 0
        self.gather = gather or _identity_gather
        self.dtype = getattr(torch, cfg.train.dtype)  # float32, or float64 for numerical checks
        self.amp_dtype = resolve_amp(cfg.train.amp, self.device, cfg.train.dtype)

        # build under a forked RNG: same cfg -> same initial weights, global RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self.pnet = build_backbone(cfg.model, cfg.data.image_size).to(self.device, self.dtype)
            head = HEADS.build(cfg.head.type, cfg, self.num_classes)
            self.head = head.to(self.device, self.dtype)
        self.pnet.train()
        self.gnet: nn.Module | None = None
        self.index = None
        self._plan = plan
        if self.is_ffc:
            self.gnet = copy.deepcopy(self.pnet)
            for prm in self.gnet.parameters():
                prm.requires_grad_(False)
            self.gnet.train()  # official: batch-statistics BN inside no_grad
            if plan is None:
                from ffc_ray.pool.index import PoolIndex

                self.index = PoolIndex(self.head.capacity, cfg.pool.policy)
        self.pnet_fwd = ddp_wrap(self.pnet) if ddp_wrap is not None else self.pnet

        self.params = [p for p in self.pnet.parameters() if p.requires_grad]
        self.head_params = [p for p in self.head.parameters() if p.requires_grad]
        self.params += self.head_params
        # DDP covers the P-Net only; replicated head weights (FC) are averaged by hand
        self._sync_head = ddp_wrap is not None and bool(self.head_params)
        self.optimizer = self._build_optimizer()
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)

    # ---- construction helpers -----------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name == "sgd":
            return torch.optim.SGD(
                self.params,
                lr=o.lr,
                momentum=o.momentum,
                nesterov=o.nesterov and o.momentum > 0,
                weight_decay=o.weight_decay,
            )
        return torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay)

    def _plan_slots(self, tg: np.ndarray, tp: np.ndarray, cg: np.ndarray, cp: np.ndarray) -> Any:
        if self._plan is not None:
            return self._plan(tg, tp, cg, cp)
        from ffc_ray.pool.index import plan_step

        return plan_step(self.index, tg, tp, cg, cp)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _inputs(self, images: Any) -> torch.Tensor:
        """uint8 [B, H, W, 3] arrays get normalised; float [B, 3, H, W] tensors pass through."""
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(
                    f"train_step: images must be uint8 [B,H,W,3], got {images.dtype} {images.shape}"
                )
            return to_tensor_batch(images, None, self.device).to(self.dtype)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                "train_step: images must be uint8 [B,H,W,3] arrays or float [B,3,H,W] tensors"
            )
        return images.to(self.device, self.dtype, non_blocking=True)

    def _average_head_grads(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        for p in self.head_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    # ---- the step -------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, x: Any, lx: Any, y: Any, ly: Any) -> dict[str, float]:
        """One optimiser step on the two views; returns floats to log."""
        t0 = time.perf_counter()
        xt, yt = self._inputs(x), self._inputs(y)
        lx_np, ly_np = _labels_np(lx), _labels_np(ly)
        if len(lx_np) != len(xt) or len(ly_np) != len(yt):
            raise ValueError(
                f"train_step: {len(xt)}/{len(yt)} images but {len(lx_np)}/{len(ly_np)} labels"
            )
        lr = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.is_ffc:
            metrics = self._ffc_step(xt, lx_np, yt, ly_np)
        else:
            metrics = self._plain_step(xt, lx_np, yt, ly_np)
        if self._sync_head:
            self._average_head_grads()
        self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip is not None:
            gn = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
            metrics["grad_norm"] = float(gn)
        scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if scale != 1.0 and "grad_scale" in inspect.signature(self.head.extra_step).parameters:
            self.head.extra_step(lr, grad_scale=scale)  # Partial FC's rows saw the scaled loss
        else:
            self.head.extra_step(lr)
        self.step += 1
        dt = time.perf_counter() - t0
        metrics.update(lr=lr, step_time=dt, images_per_s=(len(xt) + len(yt)) / max(dt, 1e-9))
        return metrics

    def _plain_step(
        self, x: torch.Tensor, lx: np.ndarray, y: torch.Tensor, ly: np.ndarray
    ) -> dict[str, float]:
        labels = torch.from_numpy(np.concatenate([lx, ly])).to(self.device)
        with self._autocast():
            emb = self.pnet_fwd(torch.cat([x, y]))
        out = self.head(upcast(emb), labels)
        self._backward(out.loss)
        return {"loss": float(out.loss.detach()), **{k: float(v) for k, v in out.metrics.items()}}

    def _ffc_step(
        self, x: torch.Tensor, lx: np.ndarray, y: torch.Tensor, ly: np.ndarray
    ) -> dict[str, float]:
        assert self.gnet is not None
        head = self.head
        symmetric = head.symmetric
        ema_update(self.gnet, self.pnet, self.cfg.pool.momentum, self.cfg.pool.ema_buffers)
        with torch.no_grad(), self._autocast():
            gy = upcast(self.gnet(y)) if symmetric else None
            gx = upcast(self.gnet(x))
        empty = np.empty(0, dtype=np.int64)
        if gy is not None:
            gy = self.gather(gy)
        gx = self.gather(gx)
        trial = (ly, lx) if symmetric else (empty, empty)
        slots = self._plan_slots(*trial, lx, ly)

        outs = []
        if symmetric:
            assert gy is not None
            sync_off = getattr(self.pnet_fwd, "no_sync", None)
            with sync_off() if callable(sync_off) else contextlib.nullcontext():
                with self._autocast():
                    px = self.pnet_fwd(x)
                undo = head.write(gy, slots.trial_gallery, slots.trial_new)
                out_a = head.loss(
                    px, slots.trial_probe, head.hit_slots(slots.trial_gallery, slots.trial_new)
                )
                self._backward(out_a.loss)
                head.restore(undo)
            outs.append((float(out_a.loss.detach()), out_a.metrics))
            del px, out_a
        with self._autocast():
            py = self.pnet_fwd(y)
        head.write(gx, slots.commit_gallery, slots.commit_new)
        out_b = head.loss(
            py, slots.commit_probe, head.hit_slots(slots.commit_gallery, slots.commit_new)
        )
        self._backward(out_b.loss)
        outs.append((float(out_b.loss.detach()), out_b.metrics))
        # losses add up over the passes (loss = A + B); the other metrics are pass averages
        metrics = {k: float(np.mean([m[k] for _, m in outs if k in m])) for k in outs[-1][1]}
        for k in ("loss_pos", "loss_neg", "num_pos", "num_neg"):
            metrics[k] = float(sum(m.get(k, 0.0) for _, m in outs))
        metrics.update(
            loss=float(sum(v for v, _ in outs)),
            occupancy=float(slots.occupancy),
            evictions=float(slots.evictions),
        )
        return metrics

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images_u8: np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        """L2-normalised P-Net embeddings (eval-mode BN, no grad) as a CPU float32 tensor."""
        bs = int(batch_size or self.cfg.eval.batch_size)
        was_training = self.pnet.training
        self.pnet.eval()
        out = []
        try:
            for i in range(0, len(images_u8), bs):
                t = to_tensor_batch(np.asarray(images_u8[i : i + bs]), None, self.device)
                t = t.to(self.dtype)
                with self._autocast():
                    e = self.pnet(t)
                out.append(F.normalize(e.float(), dim=1).cpu())
        finally:
            self.pnet.train(was_training)
        if not out:
            return torch.empty(0, self.cfg.model.embedding_dim)
        return torch.cat(out)

    # ---- checkpoint state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically on the same device type."""
        return {
            "step": self.step,
            "pnet": self.pnet.state_dict(),
            "gnet": self.gnet.state_dict() if self.gnet is not None else None,
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "index": self.index.state_dict() if self.index is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("step", "pnet", "head", "optimizer", "scheduler") if k not in state]
        if missing:
            raise KeyError(f"Trainer.load_state_dict: checkpoint lacks {', '.join(missing)}")
        self.pnet.load_state_dict(state["pnet"])
        if self.gnet is not None:
            if state.get("gnet") is None:
                raise KeyError("Trainer.load_state_dict: ffc checkpoint lacks 'gnet'")
            self.gnet.load_state_dict(state["gnet"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.index is not None:
            if state.get("index") is None:
                raise KeyError("Trainer.load_state_dict: ffc checkpoint lacks 'index'")
            self.index.load_state_dict(state["index"])
        self.step = int(state["step"])
