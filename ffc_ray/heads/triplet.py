"""FaceNet triplet loss with online semi-hard mining (Schroff et al., CVPR 2015, eq. 1, sec. 3.2).

On L2-normalised embeddings with squared Euclidean distance d, for every anchor-positive pair
(a, p) in the batch (same label, a != p) one negative n is chosen:

* semi-hard: the closest negative that is farther than the positive but within the margin,
  ``d(a,p) < d(a,n) < d(a,p) + alpha`` (FaceNet eq. 4 region);
* if none exists, the hardest negative, ``argmin_n d(a,n)`` (which may already be beyond the
  margin, then the triplet is inactive).

Loss = mean over valid pairs (pairs with at least one negative) of ``max(0, d(a,p) - d(a,n) +
alpha)``. No class weights: head memory is zero and the loss does not depend on N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ffc_ray.config import Config
from ffc_ray.heads.base import Head, HeadOutput, upcast
from ffc_ray.heads.fc import check_batch, fp32
from ffc_ray.registry import HEADS

_FAR = 1e6  # stands in for "no such negative"; squared distances of unit vectors are <= 4


def squared_distances(emb: Tensor) -> Tensor:
    """Pairwise squared L2 distances of unit rows, ``2 - 2 x.y`` clamped at 0 ([B, B])."""
    return (2.0 - 2.0 * emb @ emb.T).clamp_min(0.0)


@HEADS.register("triplet")
class TripletHead(Head):
    """Triplet loss head with margin ``margin`` (alpha) on squared distances of unit embeddings.

    Metrics: ``loss``, ``active_fraction`` (valid triplets with a positive loss),
    ``num_triplets`` (valid anchor-positive pairs), ``no_positive_pairs`` (1.0 when the batch has
    no two images of one identity: the loss is then 0, still attached to the graph).
    """

    def __init__(self, embedding_dim: int, margin: float = 0.2) -> None:
        super().__init__()
        self.embedding_dim = int(embedding_dim)
        self.margin = float(margin)

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int) -> TripletHead:
        """The head of ``cfg`` (``head.triplet_margin``, ``model.embedding_dim``);
        ``num_classes`` is unused (no class weights)."""
        return cls(cfg.model.embedding_dim, cfg.head.triplet_margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        check_batch(embeddings, labels, self.embedding_dim, None, "triplet head")
        with fp32(embeddings.device):
            return self._forward(embeddings, labels)

    def _forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        emb = F.normalize(upcast(embeddings), dim=1)
        dist = squared_distances(emb)
        n = labels.shape[0]
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(n, dtype=torch.bool, device=labels.device)
        a_idx, p_idx = torch.nonzero(same & ~eye, as_tuple=True)
        zero = embeddings.sum() * 0.0
        if a_idx.numel() == 0:
            metrics = {
                "loss": 0.0,
                "active_fraction": 0.0,
                "num_triplets": 0.0,
                "no_positive_pairs": 1.0,
            }
            return HeadOutput(loss=zero, metrics=metrics)

        d_ap = dist[a_idx, p_idx]  # [P]
        d_an = dist[a_idx]  # [P, B]
        neg = ~same[a_idx]  # [P, B]
        semi = neg & (d_an > d_ap[:, None]) & (d_an < d_ap[:, None] + self.margin)
        far = torch.full_like(d_an, _FAR)
        semi_min = torch.where(semi, d_an, far).min(dim=1).values
        hard_min = torch.where(neg, d_an, far).min(dim=1).values
        chosen = torch.where(semi.any(dim=1), semi_min, hard_min)
        valid = neg.any(dim=1)
        losses = F.relu(d_ap - chosen + self.margin)[valid]
        num = int(valid.sum())
        if num == 0:  # every pair's anchor has no negative: the batch is a single identity
            metrics = {
                "loss": 0.0,
                "active_fraction": 0.0,
                "num_triplets": 0.0,
                "no_positive_pairs": 0.0,
            }
            return HeadOutput(loss=zero, metrics=metrics)
        loss = losses.mean()
        metrics = {
            "loss": float(loss.detach()),
            "active_fraction": float((losses.detach() > 0).float().mean()),
            "num_triplets": float(num),
            "no_positive_pairs": 0.0,
        }
        return HeadOutput(loss=loss, metrics=metrics)

    def extra_repr(self) -> str:
        return f"dim={self.embedding_dim}, margin={self.margin}"
