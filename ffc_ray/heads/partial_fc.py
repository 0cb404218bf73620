"""Partial FC (An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW
2021; InsightFace arcface_torch): one process holding every class, or sharded by class over the
workers (``sharded``: rank r holds a contiguous 1/W of the rows and samples inside them, the
softmax runs across the ranks, :mod:`ffc_ray.heads.parallel`).

Every step the softmax runs over a sample of the N class centres: every class present in the
batch (positives) plus uniformly drawn negatives up to ``int(sample_rate * N)`` centres in all;
if the positives alone exceed that budget, exactly the positives (arcface_torch ``PartialFC_V2
.sample``). ``sample_rate = 1`` is the plain FC softmax.

Memory and update rule (the V1 behaviour, not V2's): the full weight ``[N, D]`` and its SGD
momentum ``[N, D]`` are BUFFERS, outside ``parameters()``, so the main optimiser neither holds a
dense gradient nor a momentum for them. The forward gathers the sampled rows into a fresh leaf
tensor; after backward, :meth:`PartialFC.extra_step` applies ``torch.optim.SGD``'s math
(momentum, dampening 0, weight decay, nesterov from ``cfg.optim``) to those rows only and writes
rows and momentum back. Unsampled rows get no weight decay and no momentum carry-over that step
(V2, which indexes one dense Parameter, decays and moves every row every step). The sampled rows
are not gradient-clipped (arcface_torch clips the backbone only).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from ffc_ray.config import Config, ConfigError
from ffc_ray.heads import parallel
from ffc_ray.heads.base import Head, HeadOutput, upcast
from ffc_ray.heads.fc import (
    check_batch,
    fp32,
    init_rows,
    local_target,
    margin_logits,
    owned_margin_logits,
    shard_of,
)
from ffc_ray.heads.margins import Margin, build_margin
from ffc_ray.registry import HEADS

log = logging.getLogger(__name__)

_SEED_STRIDE = 1_000_003  # per-step seed = seed * stride + step: sampling is a function of both


@HEADS.register("partial_fc")
class PartialFC(Head):
    """Sampled-softmax classifier with sparse SGD on the sampled rows.

    Buffers: ``weight`` [N_local, D] (N(0, 0.01); N_local = N, or this rank's block when
    sharded), ``weight_momentum`` [N_local, D] (when
    ``optim.momentum > 0``), ``steps`` (updates applied; with ``train.seed`` it fixes each step's
    sample, so a resumed run draws the same samples). Metrics: ``loss_cls``, ``acc`` (top-1 among
    the sampled centres), ``num_sampled``.

    One forward per :meth:`extra_step`: a second forward while the previous sample still holds an
    unapplied gradient is an error (its update would be lost). On several workers the head runs
    sharded (``head.parallel: sharded``): each rank updates only its own rows.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: Margin,
        *,
        sample_rate: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        seed: int = 0,
        sharded: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"partial_fc head: num_classes must be >= 1, got {num_classes}")
        if nesterov and momentum <= 0:
            raise ConfigError("config field 'optim.nesterov': nesterov needs optim.momentum > 0")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.sharded, self.start, self.end = shard_of(num_classes, sharded, margin, "partial_fc")
        self.num_local = self.end - self.start  # rows held here: all, or this rank's block
        self.sample_rate = float(sample_rate)
        self.num_sample = int(self.sample_rate * self.num_local)
        if self.sharded:  # a shard that owns no positive in a step still scores one row
            self.num_sample = max(1, self.num_sample)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.seed = int(seed)
        self.register_buffer("weight", torch.empty(self.num_local, self.embedding_dim))
        init_rows(self.weight, self.start)
        if self.momentum > 0:
            self.register_buffer("weight_momentum", torch.zeros_like(self.weight))
        else:
            self.register_buffer("weight_momentum", None)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.margin = margin
        self._index: Tensor | None = None
        self._sampled: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int) -> PartialFC:
        """The head of ``cfg``: ``head`` (margin, ``sample_rate``), the SGD settings of ``optim``
        for its rows, ``model.embedding_dim`` and ``train.seed``."""
        o = cfg.optim
        if o.name != "sgd":
            raise ConfigError(
                f"config field 'optim.name': partial_fc updates its sampled rows with SGD "
                f"(momentum / weight_decay / nesterov from optim); {o.name!r} is not supported"
            )
        return cls(
            num_classes,
            cfg.model.embedding_dim,
            build_margin(cfg.head, num_classes),
            sample_rate=cfg.head.sample_rate,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.nesterov,
            seed=cfg.train.seed,
            sharded=cfg.head.parallel == "sharded",
        )

    # ---- sampling ----------------------------------------------------------------------------
    def sample(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(index, local_labels)``: sorted sampled rows [S] of this head and each label's
        column in them (``labels`` are row numbers: class ids, or a shard's own classes minus
        its first).

        Random draws come from a CPU ``torch.Generator`` seeded with (train.seed, steps, the
        shard's first class), so the sample is the same on any device and after a resume.
        """
        device = labels.device
        if self.num_sample >= self.num_local:
            index = torch.arange(self.num_local, device=device)
            return index, labels
        positive = torch.unique(labels)  # sorted
        if self.num_sample >= positive.numel():
            gen = torch.Generator(device="cpu")
            key = self.seed * _SEED_STRIDE + int(self.steps) + self.start * _SEED_STRIDE**2
            gen.manual_seed(key % (2**63))
            score = torch.rand(self.num_local, generator=gen)
            score[positive.cpu()] = 2.0  # positives first, then uniform negatives
            index = torch.topk(score, self.num_sample).indices.sort().values.to(device)
        else:
            index = positive
        return index, torch.searchsorted(index, labels)

    # ---- forward / update --------------------------------------------------------------------
    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        check_batch(embeddings, labels, self.embedding_dim, self.num_classes, "partial_fc head")
        if self._sampled is not None and self._sampled.grad is not None:
            raise RuntimeError(
                "partial_fc head: forward called again before extra_step applied the previous "
                "step's gradient to the sampled rows (call head.extra_step(lr) after backward)"
            )
        if self.sharded:
            embeddings = parallel.gather(embeddings)
            target = local_target(parallel.gather_labels(labels), self.start, self.end)
            owned = (target >= 0).nonzero().squeeze(1)
            index, cols = self.sample(target[owned])
            local = target.clone()
            local[owned] = cols
        else:
            index, local = self.sample(labels)
        sampled = self.weight.index_select(0, index).requires_grad_(torch.is_grad_enabled())
        if sampled.requires_grad:
            self._index, self._sampled = index, sampled
        with fp32(embeddings.device):
            if self.sharded:
                return self._forward_sharded(upcast(embeddings), local, index, sampled)
            return self._forward(upcast(embeddings), local, index, sampled)

    def _forward_sharded(
        self, emb: Tensor, local: Tensor, index: Tensor, sampled: Tensor
    ) -> HeadOutput:
        """The global batch against this shard's sampled rows (``local``: the target's column
        among them, -1 where another shard owns it); the softmax across the shards."""
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(sampled, dim=1))
        logits = owned_margin_logits(self.margin, cos, local, emb.norm(dim=1))
        loss = parallel.cross_entropy(logits, local)
        metrics = {
            "loss_cls": float(loss.detach()),
            "num_sampled": float(index.numel()),
            "acc": parallel.top1(cos, local),
        }
        return HeadOutput(loss=loss, metrics=metrics)

    def _forward(self, emb: Tensor, local: Tensor, index: Tensor, sampled: Tensor) -> HeadOutput:
        norms = emb.norm(dim=1)
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(sampled, dim=1))
        logits = margin_logits(self.margin, cos, local, norms)
        loss_cls = F.cross_entropy(logits, local)
        loss = loss_cls
        metrics: dict[str, float] = {
            "loss_cls": float(loss_cls.detach()),
            "num_sampled": float(index.numel()),
        }
        if self.margin.has_extra_loss:
            extra = self.margin.extra_loss(norms)
            loss = loss + extra
            metrics["loss_extra"] = float(extra.detach())
        with torch.no_grad():
            metrics["acc"] = float((cos.argmax(dim=1) == local).float().mean())
        return HeadOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def extra_step(self, lr: float, grad_scale: float = 1.0) -> None:
        """SGD on the sampled rows (``torch.optim.SGD`` math, dampening 0), then write them back.

        ``grad_scale``: the loss scale when the backward ran under an fp16 ``GradScaler`` (pass
        the scale used for that backward); a non-finite gradient skips the update, as GradScaler
        skips ``optimizer.step``. Always advances ``steps`` and the margin's annealing state.
        """
        index, w = self._index, self._sampled
        self._index, self._sampled = None, None
        if w is not None and w.grad is not None:
            grad = w.grad if grad_scale == 1.0 else w.grad / grad_scale
            if not bool(torch.isfinite(grad).all()):
                log.warning("partial_fc: non-finite gradient on the sampled rows; update skipped")
            else:
                w = w.detach()
                d_p = grad.add(w, alpha=self.weight_decay) if self.weight_decay != 0 else grad
                if self.weight_momentum is not None:
                    buf = self.weight_momentum.index_select(0, index)
                    buf.mul_(self.momentum).add_(d_p)
                    d_p = d_p.add(buf, alpha=self.momentum) if self.nesterov else buf
                    self.weight_momentum.index_copy_(0, index, buf)
                self.weight.index_copy_(0, index, w.add(d_p, alpha=-lr))
        elif w is not None:
            log.warning("partial_fc: extra_step without a gradient on the sampled rows; no update")
        self.steps += 1
        self.margin.step(int(self.steps))

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes}, dim={self.embedding_dim}, "
            f"sample_rate={self.sample_rate}, num_sample={self.num_sample}"
        )
