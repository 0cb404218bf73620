"""Model parallelism for classifier heads: classes sharded over a process group.

Rank r of W owns a contiguous block of classes (:func:`shard_range`, the first ``N % W`` ranks
one more, as InsightFace's arcface_torch). A step all-gathers the embeddings (with gradients,
:func:`gather`) and the labels of every rank, computes logits against its own rows only, and
the softmax cross-entropy runs across the shards (:func:`cross_entropy`): the row maxima and the
sums of exponentials are all-reduced, never the logits. Shared by the sharded FC and Partial FC
heads. Pure torch: any ``torch.distributed`` process group (gloo on CPU, NCCL on GPU); without
one, or with one process, everything reduces to the single-process arithmetic.

Gradient scale: the loss is the mean over the global batch, identical on every rank. The
embedding gradient that :func:`gather` returns to each rank is the sum of every rank's part,
times W, so that DDP's average of the backbone gradients gives the gradient of that global
loss (arcface_torch does the same); each rank's class rows get theirs directly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world(group: Any = None) -> tuple[int, int]:
    """(rank, size) in ``group`` (the default group), or (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of the classes rank ``rank`` of ``size`` owns: contiguous, the first
    ``n % size`` ranks one more."""
    if not 0 <= rank < size:
        raise ValueError(f"shard_range: rank {rank} outside [0, {size})")
    base, extra = divmod(int(n), int(size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        rank, size = world(group)
        ctx.rank, ctx.size, ctx.group, ctx.n = rank, size, group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce grad in place
        dist.all_reduce(grad, group=ctx.group)  # every rank's part of this rank's rows
        own = grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]
        return own * ctx.size, None  # times W: DDP divides the backbone gradients by W


def gather(x: Tensor, group: Any = None) -> Tensor:
    """Rows of every rank in rank order (equal row counts), differentiable (module doc)."""
    if world(group)[1] == 1:
        return x
    return _Gather.apply(x, group)


@torch.no_grad()
def gather_labels(labels: Tensor, group: Any = None) -> Tensor:
    """Labels of every rank in rank order (no gradient)."""
    size = world(group)[1]
    if size == 1:
        return labels
    parts = [torch.empty_like(labels) for _ in range(size)]
    dist.all_gather(parts, labels.contiguous(), group=group)
    return torch.cat(parts)


def _all_reduce(t: Tensor, op: Any, group: Any) -> Tensor:
    if world(group)[1] > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, group: Any) -> Tensor:
        own = target >= 0
        rows = own.nonzero().squeeze(1)
        mx = _all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX, group)
        e = (logits - mx[:, None]).exp_()
        total = _all_reduce(e.sum(dim=1), dist.ReduceOp.SUM, group)
        tgt = torch.zeros_like(mx)
        tgt[rows] = logits[rows, target[rows]]
        tgt = _all_reduce(tgt, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(e.div_(total[:, None]), rows, target)
        return (total.log() + mx - tgt).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        softmax, rows, target = ctx.saved_tensors
        g = softmax.clone()
        g[rows, target[rows]] -= 1.0
        return g.mul_(grad / softmax.shape[0]), None, None


def cross_entropy(logits: Tensor, target: Tensor, group: Any = None) -> Tensor:
    """Mean softmax cross-entropy over the classes of every rank.

    ``logits`` [B, C_local]: this rank's columns for the global batch (margin already on the
    target columns it owns); ``target`` [B]: the target's local column where this rank owns
    it, -1 elsewhere (exactly one rank owns each row's target). Equal to
    ``F.cross_entropy`` over the concatenated columns; the gradient is ``(softmax - onehot) / B``
    on this rank's columns.
    """
    return _CrossEntropy.apply(logits, target, group)


@torch.no_grad()
def top1(logits: Tensor, target: Tensor, group: Any = None) -> float:
    """Fraction of rows whose highest logit over all ranks' columns is the target (ties go to
    the lower rank, then the lower column)."""
    rank, size = world(group)
    best = logits.max(dim=1).values
    gbest = _all_reduce(best.clone(), dist.ReduceOp.MAX, group)
    owner = torch.where(best == gbest, rank, size).to(torch.int64)
    owner = _all_reduce(owner, dist.ReduceOp.MIN, group)  # the lowest rank holding the max
    mine = (owner == rank) & (target >= 0)
    hit = torch.zeros_like(best)
    rows = mine.nonzero().squeeze(1)
    hit[rows] = (logits[rows].argmax(dim=1) == target[rows]).to(hit.dtype)
    return float(_all_reduce(hit, dist.ReduceOp.SUM, group).mean())


def global_topk_mask(top: Tensor, k: int, group: Any = None) -> Tensor:
    """Which of this rank's per-row top entries ``top`` [R, k_local] (values, sorted or not)
    are among each row's k largest over every rank's entries: bool [R, k_local]. Every rank
    must pass the same ``k_local`` (at least ``k`` columns per shard); every rank computes the
    same global selection from the gathered values."""
    rank, size = world(group)
    if size == 1:
        return _mask_of(top, k)
    parts = [torch.empty_like(top) for _ in range(size)]
    dist.all_gather(parts, top.detach().contiguous(), group=group)
    every = torch.cat(parts, dim=1)
    chosen = torch.zeros_like(every, dtype=torch.bool)
    chosen.scatter_(1, every.topk(k, dim=1).indices, True)
    kl = top.shape[1]
    return chosen[:, rank * kl : (rank + 1) * kl]


def _mask_of(values: Tensor, k: int) -> Tensor:
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask.scatter_(1, values.topk(min(k, values.shape[1]), dim=1).indices, True)
    return mask


def sum_(t: Tensor, group: Any = None) -> Tensor:
    """``t`` summed over the ranks, in place (no gradient); returns ``t``."""
    return _all_reduce(t, dist.ReduceOp.SUM, group)


def global_sum(local: Tensor, group: Any = None) -> Tensor:
    """The sum of ``local`` (a scalar with a graph) over the ranks, whose gradient is this
    rank's own part: every rank holds the global value and back-propagates its share."""
    if world(group)[1] == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return local + (total - local.detach())
