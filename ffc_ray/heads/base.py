"""What every head returns, and the hook for heads that update their own state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: autocast's float16 / bfloat16 become float32, while float32 and
    float64 (a float64 run, see ``train.dtype``) pass unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class HeadOutput:
    """``loss``: scalar to back-propagate; ``metrics``: floats to log (e.g. loss_pos, loss_neg)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Head(nn.Module):
    """Base of the classifier heads (fc, partial_fc, triplet).

    ``forward(embeddings, labels)`` takes raw (unnormalised) embeddings [B, D] and int64 labels
    [B] and returns a :class:`HeadOutput`. Heads whose parameters the main optimiser must not
    touch (Partial FC's sparse rows) keep them out of ``parameters()`` and update them in
    :meth:`extra_step`, which the engine calls after ``optimizer.step()``.
    """

    def extra_step(self, lr: float) -> None:  # noqa: B027 - optional hook
        """Update state the main optimiser does not own. Default: nothing."""

    def memory_bytes(self) -> int:
        """Bytes of head state (weights, optimiser state, pool buffers) for reporting."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())
