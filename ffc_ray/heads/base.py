"""The head contract: what a head returns, how it is built from a config, and its step.

A head is an ``nn.Module`` with explicit constructor arguments, a :meth:`Head.from_config` that
reads the config sections it needs, and a step strategy (``step_class``) that runs one training
step's forward and backward with it. The engine's ``Trainer`` owns the optimiser, gradient
averaging, clipping and the schedule; the step owns everything between ``zero_grad`` and the
optimiser step. :class:`PlainStep` serves every head whose ``forward(embeddings, labels)``
gives the loss (fc, partial_fc, triplet); the DCP head brings its own
(:class:`ffc_ray.heads.pool_step.PoolStep`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from ffc_ray.config import Config


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: autocast's float16 / bfloat16 become float32, while float32 and
    float64 (a float64 run, see ``train.dtype``) pass unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class HeadOutput:
    """``loss``: scalar to back-propagate; ``metrics``: floats to log (e.g. loss_pos, loss_neg)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a head's step borrows from the ``Trainer``.

    ``pnet``: the trained network (its parameters; the EMA source). ``forward``: the P-Net as
    the step calls it (DDP-wrapped in multi-worker runs). ``backward(loss)``: gradients through
    the AMP scaler. ``autocast()``: the run's autocast context (a no-op on CPU). ``gather``:
    all-gathers gallery features across workers in rank order (identity in one process).
    ``plan``: the pool planner (the Ray pool actor), or None for a local pool index.
    """

    pnet: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    autocast: Callable[[], contextlib.AbstractContextManager]
    gather: Callable[[torch.Tensor], torch.Tensor]
    plan: Callable[..., Any] | None = None
    num_classes: int = 0  # identities of the training set (sizes a local pool index's map)


class PlainStep:
    """One P-Net forward on cat(x, y), the head's loss on both views' labels, backward.

    Stateless: a checkpoint records no G-Net and no pool index for it.
    """

    def __init__(self, head: Head, ctx: StepContext, cfg: Config) -> None:
        self.head = head
        self.ctx = ctx

    def __call__(
        self, x: torch.Tensor, lx: np.ndarray, y: torch.Tensor, ly: np.ndarray
    ) -> dict[str, float]:
        labels = torch.from_numpy(np.concatenate([lx, ly])).to(x.device)
        with self.ctx.autocast():
            emb = self.ctx.forward(torch.cat([x, y]))
        out = self.head(upcast(emb), labels)
        self.ctx.backward(out.loss)
        return {"loss": float(out.loss.detach()), **{k: float(v) for k, v in out.metrics.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"gnet": None, "index": None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


class Head(nn.Module):
    """Base of the classifier heads.

    ``forward(embeddings, labels)`` takes raw (unnormalised) embeddings [B, D] and int64 labels
    [B] and returns a :class:`HeadOutput`. Heads whose parameters the main optimiser must not
    touch (Partial FC's sparse rows) keep them out of ``parameters()`` and update them in
    :meth:`extra_step`, which the engine calls after ``optimizer.step()``.
    """

    step_class: ClassVar[type] = PlainStep

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int) -> Head:
        """The head for ``cfg`` and a training set of ``num_classes`` identities."""
        raise NotImplementedError(f"{cls.__name__}.from_config")

    def extra_step(self, lr: float) -> None:  # noqa: B027 - optional hook
        """Update state the main optimiser does not own. Default: nothing."""

    def memory_bytes(self) -> int:
        """Bytes of head state (weights, optimiser state, pool buffers) for reporting."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())
