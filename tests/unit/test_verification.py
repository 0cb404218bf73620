"""Verification metrics against naive references (brute force, hand-computed values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffc_ray.data.types import VerificationSet
from ffc_ray.eval import evaluate, histogram_image, roc_image, verification_metrics
from ffc_ray.eval.verification import best_threshold, roc_auc, roc_curve, tar_at_far


def _auc_brute(s, y):
    same, diff = s[y], s[~y]
    gt = (same[:, None] > diff[None, :]).sum()
    eq = (same[:, None] == diff[None, :]).sum()
    return (gt + 0.5 * eq) / (len(same) * len(diff))


def _accuracy_brute(s, y, t):
    return np.mean((s > t) == y)


def _all_thresholds_brute(s):
    """Every threshold that changes a decision: below all, between neighbours, at the top."""
    u = np.unique(s)
    return [u[0] - 1.0] + [(a + b) / 2 for a, b in zip(u[:-1], u[1:])] + [u[-1]]


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pair_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 8, 60) / 4.0  # many ties
    y = rng.random(60) < 0.4
    assert roc_auc(s, y) == pytest.approx(_auc_brute(s, y), abs=1e-12)
    m = verification_metrics(s, y, np.arange(60) % 3)
    assert m["auc"] == pytest.approx(_auc_brute(s, y), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    s = np.round(rng.normal(size=40), 1)  # ties
    y = rng.random(40) < 0.5
    t, acc = best_threshold(s, y)
    accs = [_accuracy_brute(s, y, c) for c in _all_thresholds_brute(s)]
    assert acc == pytest.approx(max(accs))
    assert _accuracy_brute(s, y, t) == pytest.approx(max(accs))
    # ties between candidates go to the smallest threshold
    first = _all_thresholds_brute(s)[int(np.argmax(accs))]
    assert t == pytest.approx(first) or (first < s.min() and t < s.min())


@pytest.mark.parametrize("seed", range(3))
def test_fold_accuracy_matches_brute_force_per_fold(seed):
    rng = np.random.default_rng(200 + seed)
    n = 50
    y = rng.random(n) < 0.5
    s = np.round(rng.normal(size=n) + y * 0.8, 2)
    folds = np.arange(n) * 5 // n
    m = verification_metrics(s, y, folds)
    expect_acc, expect_thr = [], []
    for k in range(5):
        tr, te = folds != k, folds == k
        cands = _all_thresholds_brute(s[tr])
        accs = [_accuracy_brute(s[tr], y[tr], c) for c in cands]
        best = cands[int(np.argmax(accs))]
        expect_thr.append(best)
        expect_acc.append(_accuracy_brute(s[te], y[te], best))
    np.testing.assert_allclose(m["fold_accuracy"], expect_acc)
    assert m["accuracy"] == pytest.approx(np.mean(expect_acc))
    assert m["accuracy_std"] == pytest.approx(np.std(expect_acc))
    if min(expect_thr) >= s.min():  # the "below everything" candidate is not reproduced exactly
        assert m["threshold"] == pytest.approx(np.mean(expect_thr))


def test_precision_recall_f1_by_hand():
    # two folds with identical data -> both pick the same threshold
    s = np.array([0.9, 0.8, 0.5, 0.4, 0.3, 0.1] * 2)
    y = np.array([1, 1, 0, 1, 0, 0] * 2, bool)
    m = verification_metrics(s, y, np.repeat([0, 1], 6))
    # accuracy per threshold interval: (<0.1) 3/6, (0.1,0.3) 4/6, (0.3,0.4) 5/6, (0.4,0.5) 4/6,
    # (0.5,0.8) 5/6, (0.8,0.9) 4/6, (>0.9) 3/6 -> the smallest best is (0.3 + 0.4) / 2 = 0.35
    assert m["threshold"] == pytest.approx(0.35)
    # at 0.35 over all 12 pairs: predicted same = {0.9, 0.8, 0.5, 0.4} x2 -> TP 6, FP 2, FN 0
    assert m["precision"] == pytest.approx(6 / 8)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert m["accuracy"] == pytest.approx(5 / 6)


def test_tar_at_far_by_hand():
    diff = np.arange(1000) / 1000.0  # 0.000 .. 0.999
    same = np.array([0.9985, 0.9975, 0.995, 0.5, 0.2])
    s = np.concatenate([same, diff])
    y = np.concatenate([np.ones(5, bool), np.zeros(1000, bool)])
    # FAR <= 1e-3 allows 1 false accept: threshold = 2nd largest diff = 0.998 (0.999 accepted)
    tar, t = tar_at_far(s, y, 1e-3)
    assert t == pytest.approx(0.998)
    assert tar == pytest.approx(1 / 5)  # only 0.9985 > 0.998
    # FAR <= 1e-4 allows none: threshold = max diff 0.999 -> nothing of `same` above it
    tar, t = tar_at_far(s, y, 1e-4)
    assert t == pytest.approx(0.999) and tar == 0.0
    # FAR <= 5e-3 allows 5: threshold = 6th largest = 0.994 -> 3 of 5 same above
    assert tar_at_far(s, y, 5e-3)[0] == pytest.approx(3 / 5)
    m = verification_metrics(s, y, np.arange(len(s)) % 10, far_targets=(1e-3, 5e-3))
    assert m["tar@far=0.001"] == pytest.approx(1 / 5)
    assert m["tar@far=0.005"] == pytest.approx(3 / 5)


def test_perfect_separation():
    rng = np.random.default_rng(1)
    y = np.arange(200) % 2 == 0
    s = np.where(y, rng.uniform(0.6, 1.0, 200), rng.uniform(-1.0, 0.4, 200))
    m = verification_metrics(s, y, np.arange(200) * 10 // 200)
    assert m["accuracy"] == 1.0 and m["auc"] == 1.0 and m["accuracy_std"] == 0.0
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["f1"] == 1.0
    # 100 negative pairs: one false accept is already FAR 0.01, so 0.001 cannot be measured
    assert m["tar@far=0.001"] is None and "100 negative pairs" in m["notes"]
    assert 0.4 <= m["threshold"] <= 0.6
    big = verification_metrics(np.tile(s, 10), np.tile(y, 10), np.arange(2000) * 10 // 2000)
    assert big["tar@far=0.001"] == 1.0  # 1000 negatives: measurable; 1e-4 still is not
    assert big["tar@far=0.0001"] is None and "tar@far=0.001:" not in big["notes"]
    np.testing.assert_allclose(m["roc"]["tpr"][-1], 1.0)


def test_random_scores_are_chance():
    rng = np.random.default_rng(2)
    n = 4000
    y = rng.random(n) < 0.5
    m = verification_metrics(rng.normal(size=n), y, np.arange(n) * 10 // n)
    assert abs(m["auc"] - 0.5) < 0.03
    assert abs(m["accuracy"] - 0.5) < 0.04


def test_roc_curve_points_match_direct_counts():
    rng = np.random.default_rng(3)
    s = np.round(rng.normal(size=30), 1)
    y = rng.random(30) < 0.5
    roc = roc_curve(s, y)
    assert roc["fpr"][0] == 0 and roc["tpr"][0] == 0
    assert roc["fpr"][-1] == 1 and roc["tpr"][-1] == 1
    for f, t, thr in zip(roc["fpr"][1:], roc["tpr"][1:], roc["thresholds"][1:]):
        assert t == pytest.approx(np.mean(s[y] >= thr))
        assert f == pytest.approx(np.mean(s[~y] >= thr))
    # trapezoid area equals the Mann-Whitney AUC
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(_auc_brute(s, y))


def test_number_of_folds_means_consecutive_blocks():
    rng = np.random.default_rng(6)
    y = rng.random(97) < 0.5
    s = rng.normal(size=97) + y
    a = verification_metrics(s, y, 5)
    b = verification_metrics(s, y, np.arange(97) * 5 // 97)
    np.testing.assert_array_equal(a["fold_accuracy"], b["fold_accuracy"])
    assert len(a["fold_accuracy"]) == 5


def test_hist_and_bad_input():
    s = np.array([0.1, 0.9, 0.2, 0.8])
    y = np.array([0, 1, 0, 1], bool)
    m = verification_metrics(s, y, [0, 0, 1, 1])
    np.testing.assert_array_equal(m["hist"]["same"], [0.9, 0.8])
    np.testing.assert_array_equal(m["hist"]["diff"], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        verification_metrics(s, y[:3], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="both same and different"):
        verification_metrics(s, np.ones(4, bool), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="non-finite"):
        verification_metrics([np.nan, 0.1, 0.2, 0.3], y, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="folds"):
        verification_metrics(s, y, [0, 0, 0, 0])


def _toy_vset(n_pairs=40, size=8):
    """Images whose embedding (mean colour) is known: same pairs share the colour."""
    rng = np.random.default_rng(4)
    cols = rng.integers(0, 256, (n_pairs, 3))
    same = np.arange(n_pairs) % 2 == 0
    other = rng.integers(0, 256, (n_pairs, 3))
    left = np.broadcast_to(cols[:, None, None, :], (n_pairs, size, size, 3)).astype(np.uint8)
    rcols = np.where(same[:, None], cols, other)
    right = np.broadcast_to(rcols[:, None, None, :], (n_pairs, size, size, 3)).astype(np.uint8)
    return VerificationSet("toy", left.copy(), right.copy(), same)


def test_evaluate_batches_normalises_and_flips():
    vset = _toy_vset()
    calls = []

    def embed(x):
        calls.append(len(x))
        # a torch tensor, not normalised, colour minus grey plus a scale that normalisation removes
        v = x.reshape(len(x), -1, 3).mean(1).astype(np.float32) - 127.5
        return torch.from_numpy(v * 7.0)

    m = evaluate(embed, vset, batch_size=16)
    assert calls == [16, 16, 8, 16, 16, 8]
    assert m["num_pairs"] == 40
    # reference: cosine of centred colours
    lv = vset.left.reshape(40, -1, 3).mean(1) - 127.5
    rv = vset.right.reshape(40, -1, 3).mean(1) - 127.5
    ref = (lv * rv).sum(1) / np.linalg.norm(lv, axis=1) / np.linalg.norm(rv, axis=1)
    np.testing.assert_allclose(
        np.sort(np.concatenate([m["hist"]["same"], m["hist"]["diff"]])), np.sort(ref), atol=1e-5
    )
    np.testing.assert_allclose(m["hist"]["same"], 1.0, atol=1e-5)

    # flip: the mirrored image's embedding is added before normalising
    seen = []

    def embed_lr(x):
        seen.append(x.copy())
        return x[:, 0, :, 0].astype(np.float32)  # first row, red channel: order sensitive

    vset2 = VerificationSet(
        "grad",
        np.tile(np.arange(4, dtype=np.uint8)[None, None, :, None], (2, 4, 1, 3)),
        np.zeros((2, 4, 4, 3), np.uint8) + 1,
        np.array([True, False]),
    )
    m = evaluate(embed_lr, vset2, flip=True)
    np.testing.assert_array_equal(seen[1], seen[0][:, :, ::-1])
    # emb + emb_flip = [0,1,2,3] + [3,2,1,0] = [3,3,3,3] -> cosine 1 with the constant right side
    np.testing.assert_allclose(m["hist"]["same"], [1.0], atol=1e-6)
    m = evaluate(embed_lr, vset2, flip=False)
    np.testing.assert_allclose(m["hist"]["same"], [6 / (np.sqrt(14) * 2)], atol=1e-6)


def test_evaluate_rejects_nan_embeddings():
    vset = _toy_vset(10)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(lambda x: np.full((len(x), 4), np.nan), vset)


def test_figures_are_images():
    rng = np.random.default_rng(5)
    y = np.arange(300) % 2 == 0
    s = np.where(y, rng.normal(0.5, 0.2, 300), rng.normal(0.0, 0.2, 300))
    m = verification_metrics(s, y, np.arange(300) * 10 // 300)
    for img in (roc_image(m), roc_image(m, log_fpr=True), histogram_image(m)):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape[:2] == (360, 480)
        assert (img < 250).any() and (img == 255).any()  # something drawn on a white canvas
    # the ROC curve colour appears; the histogram shows both classes' colours
    roc = roc_image(m)
    assert ((roc[..., 0] == 31) & (roc[..., 1] == 119) & (roc[..., 2] == 180)).sum() > 100
