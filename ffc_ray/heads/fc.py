"""Full fully-connected classifier head (the "FC" baseline of the FFC paper's tables).

One learned centre per training identity: ``W`` [N, D], logits ``s * f(cos)`` with
cos = normalize(x) @ normalize(W)^T and f the configured margin, cross entropy over all N classes.
Head memory grows as N x D (weights) plus the optimiser's momentum and the gradient, which is the
cost the Dynamic Class Pool removes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffc_ray.config import Config
from ffc_ray.heads.base import Head, HeadOutput, upcast
from ffc_ray.heads.margins import Margin, build_margin
from ffc_ray.registry import HEADS


def check_batch(
    embeddings: Tensor, labels: Tensor, dim: int, num_classes: int | None, who: str
) -> None:
    """Shapes, dtypes and (when ``num_classes`` is given) the label range of a head's input."""
    if embeddings.dim() != 2 or embeddings.shape[1] != dim:
        raise ValueError(
            f"{who}: embeddings must be [B, {dim}] (model.embedding_dim), "
            f"got shape {tuple(embeddings.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{who}: labels must be [B] with B = {embeddings.shape[0]}, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dtype != torch.long:
        raise ValueError(f"{who}: labels must be int64 (long), got {labels.dtype}")
    if embeddings.shape[0] == 0:
        raise ValueError(f"{who}: empty batch")
    if num_classes is not None:
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{who}: labels must be in [0, {num_classes}), got min {lo} and max {hi}"
            )


def fp32(device: torch.device) -> torch.autocast:
    """A region where autocast is off: the head's matmuls and margins run in fp32 under AMP
    (arcface_torch also keeps the FC in fp32; cos(theta + m) near theta = 0 needs it)."""
    return torch.autocast(device_type=device.type, enabled=False)


def margin_logits(
    margin: Margin, cos: Tensor, labels: Tensor, norms: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Scaled logits; L-Softmax additionally gets the class-weight norms (its logits are
    unnormalised, ||W_j|| ||x|| f(cos))."""
    if weight is not None and getattr(margin, "uses_weight_norms", False):
        return margin(cos, labels, norms, upcast(weight).norm(dim=1))  # type: ignore[call-arg]
    return margin(cos, labels, norms)


@HEADS.register("fc")
class FullFC(Head):
    """Cosine classifier over all N identities with a margin (ArcFace by default).

    ``weight``: Parameter [N, D], N(0, 0.01) as arcface_torch; updated by the main optimiser.
    ``extra_step`` advances the margin's annealing iteration (SphereFace / L-Softmax).
    Metrics: ``loss_cls`` (margin cross entropy), ``acc`` (top-1 of the margin-free scores on the
    batch), ``loss_extra`` (MagFace / AdaptiveFace regulariser, when the margin has one).
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: Margin) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"fc head: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_dim))
        nn.init.normal_(self.weight, 0.0, 0.01)
        self.margin = margin
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int) -> FullFC:
        """The head of ``cfg`` (``head`` for the margin, ``model.embedding_dim``)."""
        return cls(num_classes, cfg.model.embedding_dim, build_margin(cfg.head, num_classes))

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        check_batch(embeddings, labels, self.embedding_dim, self.num_classes, "fc head")
        with fp32(embeddings.device):
            return self._forward(upcast(embeddings), labels)

    def _forward(self, emb: Tensor, labels: Tensor) -> HeadOutput:
        norms = emb.norm(dim=1)
        weight = upcast(self.weight)
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(weight, dim=1))
        logits = margin_logits(self.margin, cos, labels, norms, weight)
        loss_cls = F.cross_entropy(logits, labels)
        loss = loss_cls
        metrics: dict[str, float] = {"loss_cls": float(loss_cls.detach())}
        if self.margin.has_extra_loss:
            extra = self.margin.extra_loss(norms)
            loss = loss + extra
            metrics["loss_extra"] = float(extra.detach())
        with torch.no_grad():
            raw = getattr(self.margin, "uses_weight_norms", False)  # L-Softmax: unnormalised
            plain = F.linear(emb, weight) if raw else cos
            metrics["acc"] = float((plain.argmax(dim=1) == labels).float().mean())
        return HeadOutput(loss=loss, metrics=metrics)

    def extra_step(self, lr: float) -> None:
        """Count the step and set the margin's annealing state (no-op for most margins)."""
        self.iteration += 1
        self.margin.step(int(self.iteration))

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, dim={self.embedding_dim}"
