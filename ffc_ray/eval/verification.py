"""Face verification metrics (LFW protocol) and embedding of a verification set.

Why: the paper reports verification accuracy on pair benchmarks (LFW, CFP, AgeDB ...), with the
LFW protocol: 10 folds, the threshold chosen on nine folds and applied to the tenth (FFC
``evaluation_code``; InsightFace ``eval/verification.py``). We search the threshold exactly over
all midpoints between consecutive distinct scores (no 1000-bin histogram, no 0.01 grid), and add
the numbers a sweep or a report needs: ROC AUC (exact Mann-Whitney statistic with ties),
TAR at fixed FAR, precision / recall / F1 at the chosen threshold, ROC and score histograms.

Decision rule everywhere: a pair is predicted "same" iff its score (cosine) is ``> threshold``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ffc_ray.data.types import VerificationSet

log = logging.getLogger(__name__)


def _as_inputs(scores: Any, issame: Any, folds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(issame).reshape(-1)
    if np.ndim(folds) == 0:  # a number of folds: consecutive equal blocks (LFW layout)
        k = int(folds)
        folds = np.arange(len(s)) * k // max(len(s), 1)
    f = np.asarray(folds).reshape(-1)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("verification_metrics: issame must be boolean (or 0/1)")
        y = y.astype(bool)
    if len(y) != len(s) or len(f) != len(s):
        raise ValueError(
            f"verification_metrics: scores ({len(s)}), issame ({len(y)}) and folds ({len(f)}) "
            "must have the same length"
        )
    if not np.isfinite(s).all():
        raise ValueError(
            f"verification_metrics: scores contain {int((~np.isfinite(s)).sum())} "
            "non-finite values (diverged model?)"
        )
    if y.all() or not y.any():
        raise ValueError("verification_metrics: issame needs both same and different pairs")
    return s, y, f


def threshold_candidates(scores: np.ndarray) -> np.ndarray:
    """Every distinct decision of the rule ``score > t``: one threshold below all scores,
    midpoints between consecutive distinct scores, and the maximum (nothing accepted)."""
    u = np.unique(np.asarray(scores, dtype=np.float64))
    mids = u[:-1] + (u[1:] - u[:-1]) * 0.5
    mids = np.where(mids >= u[1:], u[:-1], mids)  # guard against rounding up to the next score
    return np.concatenate([[np.nextafter(u[0], -np.inf)], mids, [u[-1]]])


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Threshold maximising accuracy of ``score > t`` on these pairs, and that accuracy.

    Vectorised over all candidates (see :func:`threshold_candidates`) with cumulative counts
    over the sorted scores; ties between candidates go to the smallest threshold.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(issame, dtype=bool)
    order = np.argsort(s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    u, first = np.unique(s_sorted, return_index=True)
    same_below = np.concatenate([[0], np.cumsum(y_sorted)])  # same pairs among the i lowest
    # candidate j accepts the scores >= u[j] (j = len(u): none); below = first[j] lowest scores
    below = np.concatenate([first, [len(s)]])
    n_same_below = same_below[below]
    correct = (y.sum() - n_same_below) + (below - n_same_below)  # TP + TN
    j = int(np.argmax(correct))
    return float(threshold_candidates(u)[j]), float(correct[j] / len(s))


def roc_auc(scores: np.ndarray, issame: np.ndarray) -> float:
    """Exact ROC AUC = P(s_same > s_diff) + 0.5 P(s_same = s_diff) (Mann-Whitney U, mid-ranks)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(issame, dtype=bool)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each value
    n1, n0 = int(y.sum()), int((~y).sum())
    u_stat = mid_rank[inv][y].sum() - n1 * (n1 + 1) / 2.0
    return float(u_stat / (n1 * n0))


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> dict[str, np.ndarray]:
    """ROC points for every distinct threshold, from (0, 0) to (1, 1).

    Point i accepts the pairs with score >= ``thresholds[i]`` (``thresholds[0] = inf``).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(issame, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    last = np.flatnonzero(np.diff(s_desc) != 0)  # last index of each distinct score
    last = np.concatenate([last, [len(s) - 1]])
    tp = np.cumsum(y_desc)[last]
    fp = (last + 1) - tp
    tpr = np.concatenate([[0.0], tp / y.sum()])
    fpr = np.concatenate([[0.0], fp / (~y).sum()])
    return {"fpr": fpr, "tpr": tpr, "thresholds": np.concatenate([[np.inf], s_desc[last]])}


def tar_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> tuple[float, float]:
    """(TAR, threshold) at the smallest threshold whose FAR (different pairs accepted by
    ``score > t``) is <= ``far``: t is the (floor(far * n_diff) + 1)-th largest different score."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(issame, dtype=bool)
    diff = np.sort(s[~y])[::-1]
    k = int(np.floor(far * len(diff) + 1e-9))  # false accepts allowed
    if k >= len(diff):
        t = np.nextafter(diff[-1], -np.inf)
    else:
        t = diff[k]
    return float((s[y] > t).mean()), float(t)


def far_key(far: float) -> str:
    """Metric name of a FAR target: ``tar@far=0.001``."""
    return f"tar@far={far:g}"


def verification_metrics(
    scores: Any,
    issame: Any,
    folds: Any,
    far_targets: Sequence[float] = (1e-3, 1e-4),
) -> dict[str, Any]:
    """LFW-protocol verification metrics of pair scores (cosine similarities).

    Per fold: the best threshold on the other folds (:func:`best_threshold`), accuracy on the
    held-out fold (``folds``: a fold id per pair, or a number of consecutive equal folds).
    Reported: ``accuracy`` (mean over folds), ``accuracy_std``, ``threshold``
    (mean), ``precision``/``recall``/``f1`` over all pairs at the mean threshold, ``auc``,
    ``tar@far=<f>`` per target (None, with the reason in ``notes``, where the FAR is below one
    false accept among the negative pairs: unmeasurable on that set), ``roc`` {fpr, tpr,
    thresholds}, ``hist`` {same, diff}.
    """
    s, y, f = _as_inputs(scores, issame, folds)
    fold_ids = np.unique(f)
    if len(fold_ids) < 2:
        raise ValueError(
            f"verification_metrics: folds needs >= 2 distinct folds, got {len(fold_ids)}"
        )
    accs, thrs = [], []
    for k in fold_ids:
        test = f == k
        thr, _ = best_threshold(s[~test], y[~test])
        accs.append(float(((s[test] > thr) == y[test]).mean()))
        thrs.append(thr)
    thr = float(np.mean(thrs))
    pred = s > thr
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out: dict[str, Any] = {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "threshold": thr,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auc": roc_auc(s, y),
    }
    negatives = int((~y).sum())
    notes = []
    for far in far_targets:
        if not 0 < far < 1:
            raise ValueError(f"verification_metrics: far_targets entry {far} is outside (0, 1)")
        if far * negatives < 1:  # one false accept is already a FAR of 1 / negatives
            out[far_key(far)] = None
            notes.append(f"{far_key(far)}: not measurable with {negatives} negative pairs")
        else:
            out[far_key(far)] = tar_at_far(s, y, far)[0]
    if notes:
        out["notes"] = "; ".join(notes)
    out["fold_accuracy"] = np.asarray(accs)
    out["roc"] = roc_curve(s, y)
    out["hist"] = {"same": s[y].copy(), "diff": s[~y].copy()}
    return out


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def embed_images(
    embed_fn: Callable[[np.ndarray], Any],
    images: np.ndarray,
    flip: bool = False,
    batch_size: int = 256,
) -> np.ndarray:
    """Raw embeddings [N, D] of uint8 [N, H, W, 3] images, in batches; with ``flip`` the
    embedding of the mirrored image is added (InsightFace flip test: emb + emb_flip)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for b0 in range(0, len(images), batch_size):
        batch = images[b0 : b0 + batch_size]
        e = _to_numpy(embed_fn(batch))
        if flip:
            e = e + _to_numpy(embed_fn(np.ascontiguousarray(batch[:, :, ::-1])))
        if e.ndim != 2 or len(e) != len(batch):
            raise ValueError(
                f"embed_fn must return [B, D] for B={len(batch)} images, got {e.shape}"
            )
        out.append(e)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate(
    embed_fn: Callable[[np.ndarray], Any],
    vset: VerificationSet,
    flip: bool = False,
    batch_size: int = 256,
    far_targets: Sequence[float] = (1e-3, 1e-4),
) -> dict[str, Any]:
    """Embed both sides of ``vset``, L2-normalise, score by cosine, then
    :func:`verification_metrics`; adds ``num_pairs`` and ``xnorm`` (mean raw embedding norm)."""
    if len(vset) == 0:
        raise ValueError(f"evaluate: verification set {vset.name!r} has no pairs")
    left = embed_images(embed_fn, vset.left, flip, batch_size)
    right = embed_images(embed_fn, vset.right, flip, batch_size)
    if not (np.isfinite(left).all() and np.isfinite(right).all()):
        raise ValueError(f"evaluate: embed_fn returned non-finite embeddings on {vset.name!r}")
    nl = np.linalg.norm(left, axis=1, keepdims=True)
    nr = np.linalg.norm(right, axis=1, keepdims=True)
    scores = np.sum((left / np.maximum(nl, 1e-12)) * (right / np.maximum(nr, 1e-12)), axis=1)
    out = verification_metrics(scores, vset.issame, vset.folds, far_targets)
    out["num_pairs"] = len(vset)
    out["xnorm"] = float(np.concatenate([nl, nr]).mean())
    log.debug("%s: accuracy %.4f auc %.4f", vset.name, out["accuracy"], out["auc"])
    return out
