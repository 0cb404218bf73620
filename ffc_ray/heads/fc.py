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

from ffc_ray.config import SHARDABLE_MARGINS, Config, ConfigError
from ffc_ray.heads import parallel
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


def local_target(labels: Tensor, start: int, end: int) -> Tensor:
    """Column of each label in the shard [start, end), -1 where another shard owns it."""
    own = (labels >= start) & (labels < end)
    return torch.where(own, labels - start, torch.full_like(labels, -1))


def owned_margin_logits(margin: Margin, cos: Tensor, target: Tensor, norms: Tensor) -> Tensor:
    """Scaled logits of a shard's columns: the margin on the rows whose target it owns
    (``target >= 0``), ``scale * cos`` on the others, as the full classifier has them."""
    with_margin = margin(cos, target.clamp_min(0), norms)
    plain = upcast(cos).clamp(-1.0, 1.0) * margin.scale
    return torch.where((target >= 0)[:, None], with_margin, plain)


def shard_of(num_classes: int, sharded: bool, margin: Margin, who: str) -> tuple[bool, int, int]:
    """(sharded, start, end) of this rank's classes: all of them unless ``sharded`` in a
    process group of several ranks."""
    rank, size = parallel.world() if sharded else (0, 1)
    if size == 1:
        return False, 0, int(num_classes)
    name = type(margin).__name__
    if not getattr(margin, "shardable", False):
        raise ConfigError(
            f"config field 'head.margin_type': {who} sharded over {size} workers supports "
            f"{', '.join(SHARDABLE_MARGINS)}; {name} is not among them"
        )
    if num_classes < size:
        raise ConfigError(
            f"config field 'head.parallel': {num_classes} classes cannot be sharded over "
            f"{size} workers"
        )
    return (True, *parallel.shard_range(num_classes, rank, size))


def init_rows(rows: Tensor, start: int) -> None:
    """N(0, 0.01) class rows (arcface_torch). A shard draws from the run's RNG offset by its
    first class, so shards differ and a run is reproducible at a fixed world size."""
    if start == 0:
        nn.init.normal_(rows, 0.0, 0.01)
        return
    gen = torch.Generator().manual_seed(int(torch.randint(2**62, ())) + start)
    with torch.no_grad():
        rows.copy_(torch.randn(rows.shape, generator=gen, dtype=rows.dtype) * 0.01)


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

    ``weight``: Parameter [N, D] (or this rank's [N/W, D] block with ``sharded``), N(0, 0.01)
    as arcface_torch; updated by the main optimiser.
    ``extra_step`` advances the margin's annealing iteration (SphereFace / L-Softmax).
    Metrics: ``loss_cls`` (margin cross entropy), ``acc`` (top-1 of the margin-free scores on the
    batch), ``loss_extra`` (MagFace / AdaptiveFace regulariser, when the margin has one).
    """

    def __init__(
        self, num_classes: int, embedding_dim: int, margin: Margin, *, sharded: bool = False
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"fc head: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.sharded, self.start, self.end = shard_of(num_classes, sharded, margin, "fc head")
        self.weight = nn.Parameter(torch.empty(self.end - self.start, self.embedding_dim))
        init_rows(self.weight, self.start)
        self.margin = margin
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int) -> FullFC:
        """The head of ``cfg`` (``head`` for the margin and ``parallel``,
        ``model.embedding_dim``)."""
        margin = build_margin(cfg.head, num_classes)
        sharded = cfg.head.parallel == "sharded"
        return cls(num_classes, cfg.model.embedding_dim, margin, sharded=sharded)

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        check_batch(embeddings, labels, self.embedding_dim, self.num_classes, "fc head")
        with fp32(embeddings.device):
            if self.sharded:
                return self._forward_sharded(upcast(embeddings), labels)
            return self._forward(upcast(embeddings), labels)

    def _forward_sharded(self, emb: Tensor, labels: Tensor) -> HeadOutput:
        """The global batch against this rank's rows; the softmax across the shards."""
        emb, labels = parallel.gather(emb), parallel.gather_labels(labels)
        target = local_target(labels, self.start, self.end)
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(upcast(self.weight), dim=1))
        logits = owned_margin_logits(self.margin, cos, target, emb.norm(dim=1))
        loss = parallel.cross_entropy(logits, target)
        acc = parallel.top1(cos, target)
        return HeadOutput(loss=loss, metrics={"loss_cls": float(loss.detach()), "acc": acc})

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
