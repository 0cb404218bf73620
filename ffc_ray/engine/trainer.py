"""One worker's training state and optimiser step for every head, in pure torch; used alone and
inside each Ray Train worker.

A step: ``zero_grad``; the head's step strategy (``head.step_class``: the forward passes and
backward, e.g. :class:`~ffc_ray.heads.base.PlainStep` for fc / partial_fc / triplet,
:class:`~ffc_ray.heads.pool_step.PoolStep` for the DCP head); the average of replicated head
gradients across workers; clip; optimiser step; lr schedule step; ``head.extra_step(lr)``.
"""

from __future__ import annotations

import contextlib
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
from ffc_ray.data.batch import chw_tensor, normalize
from ffc_ray.engine.schedule import build_scheduler
from ffc_ray.heads import build_head, parallel
from ffc_ray.heads.base import StepContext
from ffc_ray.models import build_backbone

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
    """P-Net, head and its step (the G-Net and pool index for ffc), optimiser, schedule and
    AMP for one worker.

    ``gather(features)`` all-gathers gallery features in rank order (default: identity);
    ``plan(trial_gallery, trial_probe, commit_gallery, commit_probe) -> StepSlots`` takes this
    worker's labels and gives the slots of every rank's gallery and of this worker's probes
    (default: :func:`ffc_ray.pool.plan.plan_step` on a local ``PoolIndex``, one worker);
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
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.step = 0
        self.dtype = getattr(torch, cfg.train.dtype)  # float32, or float64 for numerical checks
        self.amp_dtype = resolve_amp(cfg.train.amp, self.device, cfg.train.dtype)

        # build under a forked RNG: same cfg -> same initial weights, global RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self.pnet = build_backbone(cfg.model, cfg.data.image_size).to(self.device, self.dtype)
            self.head = build_head(cfg, self.num_classes).to(self.device, self.dtype)
        self.pnet.train()
        ctx = StepContext(
            pnet=self.pnet,
            forward=self.pnet,
            backward=self._backward,
            autocast=self._autocast,
            gather=gather or _identity_gather,
            plan=plan,
            num_classes=self.num_classes,
        )
        self.head_step = self.head.step_class(self.head, ctx, cfg)  # copies the P-Net (G-Net)
        self.pnet_fwd = ddp_wrap(self.pnet) if ddp_wrap is not None else self.pnet
        ctx.forward = self.pnet_fwd  # wrapped after the copy: the G-Net stays a plain module

        self.params = [p for p in self.pnet.parameters() if p.requires_grad]
        self.head_params = [p for p in self.head.parameters() if p.requires_grad]
        self.params += self.head_params
        # DDP covers the P-Net only; replicated head weights (FC) are averaged by hand, a
        # sharded head's rows are each rank's own
        sharded = getattr(self.head, "sharded", False)
        self._sync_head = ddp_wrap is not None and bool(self.head_params) and not sharded
        self._sharded_rows = self.head_params if sharded else []  # rank-own optimised rows
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

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _inputs(self, images: Any) -> torch.Tensor:
        """A view of a :class:`~ffc_ray.data.batch.StepBatch` (uint8 or float [B, 3, H, W])
        -> the network's input on this device, normalised there."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(
                f"train_step: images must be [B, 3, H, W] tensors, got {type(images).__name__}"
            )
        return normalize(images, self.device, self.dtype)

    def _average_head_grads(self) -> None:
        world = parallel.world()[1]
        if world == 1:
            return
        for p in self.head_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            parallel.sum_(p.grad).div_(world)

    def _clip(self, max_norm: float) -> float:
        """Clip every gradient by the global norm. With a sharded head (its optimised rows
        differ by rank) the norm adds every rank's rows, so that all ranks scale alike and the
        DDP-synchronised P-Nets stay equal."""
        if not self._sharded_rows:
            return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        own = {id(p) for p in self._sharded_rows}
        shared = [p.grad for p in self.params if p.grad is not None and id(p) not in own]
        rows = [p.grad for p in self._sharded_rows if p.grad is not None]
        sq = torch.nn.utils.get_total_norm(rows).float() ** 2 if rows else torch.zeros(())
        sq = parallel.sum_(sq.to(self.device))
        if shared:
            sq = sq + torch.nn.utils.get_total_norm(shared).float().to(self.device) ** 2
        total = sq.sqrt()
        torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, total)
        return float(total)

    def _agree_on_overflow(self) -> None:
        """Under an fp16 GradScaler every rank must skip the same steps: an inf or NaN in any
        rank's sharded rows is copied into every rank's, so that every ``unscale_`` finds it."""
        if not self.scaler.is_enabled():
            return
        grads = [p.grad for p in self._sharded_rows if p.grad is not None]
        bad = torch.tensor(
            [float(any(not bool(torch.isfinite(g).all()) for g in grads))], device=self.device
        )
        if float(parallel.sum_(bad)) > 0 and grads:
            grads[0].view(-1)[0] = float("inf")

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    # ---- the step -------------------------------------------------------------------------
    @property
    def gnet(self) -> nn.Module | None:
        """The G-Net (EMA of the P-Net) of a head step that keeps one, else None."""
        return getattr(self.head_step, "gnet", None)

    @property
    def index(self) -> Any:
        """The local pool index of a head step that keeps one (one process), else None."""
        return getattr(self.head_step, "index", None)

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
        metrics = self.head_step(xt, lx_np, yt, ly_np)
        if self._sync_head:
            self._average_head_grads()
        if self._sharded_rows:
            self._agree_on_overflow()
        self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip is not None:
            metrics["grad_norm"] = self._clip(self.cfg.optim.grad_clip)
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
                t = normalize(chw_tensor(images_u8[i : i + bs]), self.device, self.dtype)
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
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.head_step.state_dict(),  # gnet and index (None for a stateless step)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("step", "pnet", "head", "optimizer", "scheduler") if k not in state]
        if missing:
            raise KeyError(f"Trainer.load_state_dict: checkpoint lacks {', '.join(missing)}")
        self.pnet.load_state_dict(state["pnet"])
        self.head_step.load_state_dict(state)
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
