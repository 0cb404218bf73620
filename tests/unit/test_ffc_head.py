"""FFC (DCP) head against hand-checked pool states and a naive per-sample reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ffc_ray.config import Config
from ffc_ray.heads.ffc import FFCHead, plan_ring_writes

D = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a shared 2-core machine: a second OpenMP thread only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cfg(capacity: int = 8, **head: object) -> Config:
    over = {
        "data.instance_batch": 2,
        "data.identity_batch": 1,
        "data.num_identities": 50,
        "model.embedding_dim": D,
        "pool.capacity": capacity,
        "head.margin_type": "cosface",
        "head.margin": 0.1,
        "head.scale": 8.0,
    }
    over.update({f"head.{k}": v for k, v in head.items()})
    return Config().with_overrides(over)


class ClosedFormMargin(nn.Module):
    """Test-local CosFace / ArcFace in closed form (no fallbacks: tests keep theta + m < pi)."""

    def __init__(self, kind: str, m: float, s: float) -> None:
        super().__init__()
        self.kind, self.m, self.s = kind, m, s

    def forward(self, cos, target, norms=None):
        onehot = F.one_hot(target, cos.shape[1]).bool()
        if self.kind == "cosface":
            tgt = cos - self.m
        else:
            c = cos.clamp(-1, 1)
            tgt = c * math.cos(self.m) - torch.sqrt(1 - c * c) * math.sin(self.m)
        return self.s * torch.where(onehot, tgt, cos)


# ---- naive reference (python loops, float64) ------------------------------------------


class NaivePool:
    def __init__(self, pool: torch.Tensor) -> None:
        self.k, self.c, _ = pool.shape
        self.rows = [[pool[r, c].double().clone() for c in range(self.c)] for r in range(self.k)]
        self.ring = [0] * self.c
        self.count = [0] * self.c

    def write(self, gallery, slots, new):
        for g, s, n in zip(gallery, slots, new):
            g = F.normalize(g.double(), dim=0)
            s = int(s)
            if n:
                self.rows[0][s] = g
                self.ring[s] = 1 % self.k
                self.count[s] = 1
            else:
                self.rows[self.ring[s]][s] = g
                self.ring[s] = (self.ring[s] + 1) % self.k
                self.count[s] = min(self.k, self.count[s] + 1)

    def loss(self, probes, slots, seen, k_mode, neg_loss, top_k, margin_fn):
        seen = {int(s) for s in seen}
        sets = []
        if k_mode == "mean":
            sets.append(
                lambda r, c: (
                    sum(torch.dot(r, self.rows[j][c]) for j in range(max(1, self.count[c])))
                    / max(1, self.count[c])
                )
            )
        else:
            for k in range(self.k):

                def cosk(r, c, k=k):
                    use = k > 0 and c in seen and self.count[c] > k
                    return torch.dot(r, self.rows[k if use else 0][c])

                sets.append(cosk)
        pos_terms, neg_terms = [], []
        total_pos, total_neg = 0.0, 0.0
        for cos_fn in sets:
            pos_terms, neg_terms = [], []
            for b in range(len(probes)):
                r = F.normalize(probes[b].double(), dim=0)
                cos = torch.stack([cos_fn(r, c) for c in range(self.c)])
                t = int(slots[b])
                if t >= 0:
                    logits = margin_fn(cos, t)
                    pos_terms.append(torch.logsumexp(logits, 0) - logits[t])
                else:
                    order = sorted(range(self.c), key=lambda j: -float(cos[j].detach()))
                    if neg_loss == "topk":
                        order = order[:top_k]
                    neg_terms.extend(torch.clamp(cos[j], min=0.0) for j in order)
            if pos_terms:
                total_pos = total_pos + torch.stack(pos_terms).mean()
            if neg_terms:
                total_neg = total_neg + torch.stack(neg_terms).mean()
        return total_pos, total_neg


def margin_fn_for(kind: str, m: float, s: float):
    def fn(cos, t):
        out = cos.clone()
        c = cos[t]
        out[t] = c - m if kind == "cosface" else torch.cos(torch.acos(c) + m)
        return s * out

    return fn


def rand_feats(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g)


# ---- ring writes: hand-checked example ---------------------------------------------------


def test_ring_write_hand_checked_k2():
    head = FFCHead.from_config(
        make_cfg(capacity=4, k_per_id=2), 50, margin=ClosedFormMargin("cosface", 0.1, 8)
    )
    g = rand_feats(12, 0)
    n = F.normalize(g, dim=1)
    # call 1: slot 0 new then hit; slots 1 and 2 new
    head.write(g[0:4], [0, 1, 0, 2], [True, True, False, True])
    assert head.ring_pos.tolist() == [0, 1, 1, 0]
    assert head.row_count.tolist() == [2, 1, 1, 0]
    assert torch.equal(head.pool[0, 0], n[0]) and torch.equal(head.pool[1, 0], n[2])
    assert torch.equal(head.pool[0, 1], n[1]) and torch.equal(head.pool[0, 2], n[3])
    # call 2: a returning identity three times (rows 0, 1, 0: last write to row 0 wins),
    # a new one in slot 3, a returning one in slot 1 (its ring points at row 1)
    head.write(g[4:9], [0, 0, 0, 3, 1], [False, False, False, True, False])
    assert torch.equal(head.pool[0, 0], n[6]) and torch.equal(head.pool[1, 0], n[5])
    assert torch.equal(head.pool[0, 3], n[7])
    assert torch.equal(head.pool[1, 1], n[8]) and torch.equal(head.pool[0, 1], n[1])
    assert head.ring_pos.tolist() == [1, 0, 1, 1]
    assert head.row_count.tolist() == [2, 2, 1, 1]
    # call 3: slot 2 hit, then evicted and refilled (new -> row 0), then hit again (row 1)
    head.write(g[9:12], [2, 2, 2], [False, True, False])
    assert torch.equal(head.pool[0, 2], n[10]) and torch.equal(head.pool[1, 2], n[11])
    assert head.ring_pos[2] == 0 and head.row_count[2] == 2


def test_plan_keeps_only_the_last_write_per_row_and_slot():
    """Duplicates are resolved before the scatter (index_put_ with repeated indices is
    nondeterministic on GPU), so exactly one occurrence per (row, slot) is written."""
    plan = plan_ring_writes(
        torch.tensor([0, 0, 0, 3, 1, 0]),
        torch.tensor([False, False, False, True, False, True]),
        torch.tensor([0, 1, 1, 0]),
        torch.tensor([2, 1, 1, 0]),
        2,
    )
    assert plan.rows.tolist() == [0, 1, 0, 0, 1, 0]
    assert plan.keep.tolist() == [False, True, False, True, True, True]
    assert plan.touched.tolist() == [0, 1, 3]
    assert plan.final_ring_pos.tolist() == [1, 0, 1]
    assert plan.final_row_count.tolist() == [1, 2, 1]


def test_ring_write_hand_checked_k3_wraps():
    head = FFCHead.from_config(
        make_cfg(capacity=4, k_per_id=3), 50, margin=ClosedFormMargin("cosface", 0.1, 8)
    )
    g = rand_feats(6, 1)
    n = F.normalize(g, dim=1)
    head.write(g[0:1], [1], [True])  # row 0
    head.write(g[1:5], [1, 1, 1, 1], [False] * 4)  # rows 1, 2, 0, 1
    assert torch.equal(head.pool[0, 1], n[3])
    assert torch.equal(head.pool[1, 1], n[4])
    assert torch.equal(head.pool[2, 1], n[2])
    assert head.ring_pos[1] == 2 and head.row_count[1] == 3


def test_write_matches_naive_on_random_sequences():
    for k in (1, 2, 3):
        head = FFCHead.from_config(
            make_cfg(capacity=5, k_per_id=k), 50, margin=ClosedFormMargin("cosface", 0.1, 8)
        )
        naive = NaivePool(head.pool)
        rng = np.random.default_rng(k)
        for step in range(8):
            gsz = int(rng.integers(1, 9))
            slots = rng.integers(0, 5, gsz)
            new = rng.random(gsz) < 0.3
            g = rand_feats(gsz, 100 * k + step)
            head.write(g, slots, new)
            naive.write(g, slots, new)
        for r in range(k):
            for c in range(5):
                assert torch.allclose(head.pool[r, c].double(), naive.rows[r][c], atol=1e-6)
        assert head.ring_pos.tolist() == naive.ring
        assert head.row_count.tolist() == naive.count


def test_trial_write_restore_is_bit_identical():
    head = FFCHead.from_config(
        make_cfg(capacity=6, k_per_id=2), 50, margin=ClosedFormMargin("cosface", 0.1, 8)
    )
    head.write(rand_feats(5, 2), [0, 1, 2, 0, 3], [True, True, True, False, True])
    before = {k: v.clone() for k, v in head.state_dict().items()}
    undo = head.write(
        rand_feats(7, 3), [0, 0, 4, 1, 1, 1, 5], [False, False, True, False, False, True, True]
    )
    assert not torch.equal(before["pool"], head.pool)
    head.restore(undo)
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_write_rejects_bad_slots():
    head = FFCHead.from_config(make_cfg(capacity=4), 50, margin=ClosedFormMargin("cosface", 0.1, 8))
    with pytest.raises(ValueError, match="slots"):
        head.write(rand_feats(2, 0), [0, 4], [True, True])
    with pytest.raises(ValueError, match="disagree"):
        head.write(rand_feats(2, 0), [0], [True])


# ---- loss against the naive reference ------------------------------------------------------


@pytest.mark.parametrize("k_mode", ["ring", "mean"])
@pytest.mark.parametrize("neg_loss", ["topk", "mean_cos"])
@pytest.mark.parametrize("kind", ["cosface", "arcface"])
@pytest.mark.parametrize("k", [2, 3])
def test_two_pass_loss_matches_naive(k_mode, neg_loss, kind, k):
    m, s, cap = 0.1, 8.0, 7
    cfg = make_cfg(
        capacity=cap,
        k_per_id=k,
        k_mode=k_mode,
        neg_loss=neg_loss,
        top_k=3,
        margin_type=kind,
        margin=m,
        scale=s,
    )
    head = FFCHead.from_config(cfg, 50, margin=ClosedFormMargin(kind, m, s))
    naive = NaivePool(head.pool)
    mfn = margin_fn_for(kind, m, s)
    # earlier step: a committed pool with some returning identities
    g0 = rand_feats(5, 10)
    head.write(g0, [0, 1, 2, 3, 1], [True, True, True, True, False])
    naive.write(g0, [0, 1, 2, 3, 1], [True, True, True, True, False])

    # pass A (trial): duplicates, a returning identity (slot 1), new ones; probes incl. negatives
    # slot 3 is hit and then re-assigned (FIFO eviction inside one call): row 1 holds the old
    # identity's feature but row_count says 1, so the ring sets must use row 0 for it
    gal_a = rand_feats(7, 11)
    sl_a = [1, 4, 1, 5, 0, 3, 3]
    new_a = [False, True, False, True, False, False, True]
    probes_a = rand_feats(6, 12).requires_grad_(True)
    pslots_a = [1, 4, -1, 0, -1, 5]
    undo = head.write(gal_a, sl_a, new_a)
    seen_a = head.hit_slots(np.array(sl_a), np.array(new_a))
    out_a = head.loss(probes_a, pslots_a, seen_a)
    out_a.loss.backward()
    head.restore(undo)

    ref_pool = NaivePool(head.pool)  # restored state must equal the state before pass A
    for r in range(k):
        for c in range(cap):
            assert torch.allclose(ref_pool.rows[r][c], naive.rows[r][c])
    trial = NaivePool(head.pool)
    trial.ring, trial.count = list(naive.ring), list(naive.count)
    trial.write(gal_a, sl_a, new_a)
    pa = probes_a.detach().double().requires_grad_(True)
    rp, rn = trial.loss(pa, pslots_a, seen_a.tolist(), k_mode, neg_loss, 3, mfn)
    assert out_a.metrics["loss_pos"] == pytest.approx(float(rp.detach()), rel=1e-5, abs=1e-6)
    assert out_a.metrics["loss_neg"] == pytest.approx(float(rn.detach()), rel=1e-5, abs=1e-6)
    (rp + rn).backward()
    assert probes_a.grad is not None and probes_a.grad.abs().sum() > 0
    assert torch.allclose(probes_a.grad.double(), pa.grad, atol=1e-5)
    assert out_a.metrics["num_pos"] == 4 and out_a.metrics["num_neg"] == 2

    # pass B (commit)
    gal_b, sl_b, new_b = rand_feats(4, 13), [2, 6, 2, 3], [False, True, False, False]
    probes_b = rand_feats(5, 14).requires_grad_(True)
    pslots_b = [2, 6, 3, -1, 2]
    head.write(gal_b, sl_b, new_b)
    naive.write(gal_b, sl_b, new_b)
    seen_b = head.hit_slots(np.array(sl_b), np.array(new_b))
    out_b = head.loss(probes_b, pslots_b, seen_b)
    out_b.loss.backward()
    pb = probes_b.detach().double().requires_grad_(True)
    rp, rn = naive.loss(pb, pslots_b, seen_b.tolist(), k_mode, neg_loss, 3, mfn)
    ref_b = float((rp + rn).detach())
    assert float(out_b.loss.detach()) == pytest.approx(ref_b, rel=1e-5, abs=1e-6)
    (rp + rn).backward()
    assert torch.allclose(probes_b.grad.double(), pb.grad, atol=1e-5)
    assert head.ring_pos.tolist() == naive.ring and head.row_count.tolist() == naive.count


def test_ring_k2_equals_official_two_matrices():
    """K = 2 ring mode: set 1 = row 0 everywhere, set 2 = row 1 for re-seen columns only."""
    s, m = 8.0, 0.1
    head = FFCHead.from_config(
        make_cfg(capacity=5, k_per_id=2), 50, margin=ClosedFormMargin("cosface", m, s)
    )
    head.write(rand_feats(4, 20), [0, 1, 2, 3], [True] * 4)
    head.write(rand_feats(2, 21), [1, 2], [False, False])  # 1, 2 re-seen: row 1 valid
    p = rand_feats(3, 22)
    t = torch.tensor([1, 2, 0])
    out = head.loss(p, t, torch.tensor([1]))  # only slot 1 counts as re-seen in this pass
    pn = F.normalize(p, dim=1)
    w2 = head.pool[0].clone()
    w2[1] = head.pool[1, 1]
    ref = 0.0
    for w in (head.pool[0], w2):
        cos = pn @ w.T
        ref += F.cross_entropy(s * (cos - m * F.one_hot(t, 5)), t)
    assert float(out.loss) == pytest.approx(float(ref), rel=1e-6)


def test_pool_as_classifier_when_every_identity_is_present():
    """C >= N and all identities in the pool: the DCP positive loss is a margin softmax (CosFace
    closed form) against a classifier whose rows are the written gallery features."""
    n_ids, s, m = 5, 16.0, 0.2
    head = FFCHead.from_config(
        make_cfg(capacity=6, k_per_id=1, margin_type="cosface", margin=m, scale=s), 50
    )  # real margin module from the registry
    gal = rand_feats(6, 30)
    head.write(gal[:n_ids], np.arange(n_ids), np.ones(n_ids, bool))
    probes = rand_feats(8, 31).requires_grad_(True)
    target = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])
    out = head.loss(probes, target, None)
    w = torch.cat([F.normalize(gal[:n_ids], dim=1), head.pool[0, n_ids:]])  # slot 5 unused
    cos = F.linear(F.normalize(probes, dim=1), w)
    ref = F.cross_entropy(s * (cos - m * F.one_hot(target, 6)), target)
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert out.metrics["loss_neg"] == 0.0 and out.metrics["pos_fraction"] == 1.0
    out.loss.backward()
    assert probes.grad.abs().sum() > 0


def test_pool_as_classifier_arcface_real_margin():
    n_ids, s, m = 4, 16.0, 0.2
    head = FFCHead.from_config(
        make_cfg(capacity=4, k_per_id=1, margin_type="arcface", margin=m, scale=s), 50
    )
    gal = rand_feats(4, 40)
    head.write(gal, np.arange(n_ids), np.ones(n_ids, bool))
    probes = rand_feats(6, 41)
    target = torch.tensor([0, 1, 2, 3, 1, 2])
    out = head.loss(probes, target)
    cos = F.linear(F.normalize(probes, dim=1), F.normalize(gal, dim=1))
    theta = torch.acos(cos.gather(1, target[:, None]))
    logits = cos.scatter(1, target[:, None], torch.cos(theta + m))
    assert float(out.loss) == pytest.approx(float(F.cross_entropy(s * logits, target)), rel=1e-5)


def test_empty_row_sets_give_zero_with_graph():
    head = FFCHead.from_config(make_cfg(capacity=4), 50, margin=ClosedFormMargin("cosface", 0.1, 8))
    p = rand_feats(3, 50).requires_grad_(True)
    out = head.loss(p, [-1, -1, -1])
    assert out.metrics["loss_pos"] == 0.0 and out.metrics["num_neg"] == 3
    out.loss.backward()
    assert p.grad is not None
    q = rand_feats(2, 51).requires_grad_(True)
    out = head.loss(q, [0, 1])
    assert out.metrics["loss_neg"] == 0.0
    out.loss.backward()
    assert q.grad is not None


def test_engine_order_has_no_inplace_autograd_errors_and_misuse_is_caught():
    head = FFCHead.from_config(
        make_cfg(capacity=6, k_per_id=2), 50, margin=ClosedFormMargin("cosface", 0.1, 8)
    )
    head.write(rand_feats(3, 60), [0, 1, 2], [True] * 3)
    p = rand_feats(4, 61).requires_grad_(True)
    undo = head.write(rand_feats(3, 62), [0, 3, 0], [False, True, False])
    head.loss(p, [0, 3, -1, 1], [0, 0]).loss.backward()
    head.restore(undo)
    head.write(rand_feats(3, 63), [1, 4, 1], [False, True, False])
    head.loss(p, [1, 4, -1, 2], [1, 1]).loss.backward()
    assert p.grad.abs().sum() > 0
    # restoring BEFORE backward would corrupt the graph: autograd must refuse, not go silent
    undo = head.write(rand_feats(1, 64), [5], [True])
    out = head.loss(p, [5, 0, 1, -1], None)
    head.restore(undo)
    with pytest.raises(RuntimeError, match="inplace|modified"):
        out.loss.backward()


def test_rejects_margins_that_need_class_weights():
    with pytest.raises(ValueError, match="head.margin_type"):  # refused when the config is built
        FFCHead.from_config(make_cfg(margin_type="adaptiveface"), 50)
    fc_only = ClosedFormMargin("cosface", 0.1, 8)
    fc_only.fc_only = True  # as lsoftmax and adaptiveface declare
    with pytest.raises(ValueError, match="'head.margin_type'.*FC-only"):  # an injected one
        FFCHead.from_config(make_cfg(), 50, margin=fc_only)


def test_top_k_and_capacity_from_config():
    head = FFCHead.from_config(make_cfg(capacity=8), 50, margin=ClosedFormMargin("cosface", 0.1, 8))
    assert head.capacity == 8 and head.top_k == 3  # official min(max(0.0002 C, 3), 10)
    assert head.pool.shape == (2, 8, D)
    assert torch.allclose(head.pool.norm(dim=2), torch.ones(2, 8))
    assert (head.pool >= 0).all()  # positive orthant, as the official init
    other = FFCHead.from_config(
        make_cfg(capacity=8), 50, margin=ClosedFormMargin("cosface", 0.1, 8)
    )
    assert torch.equal(head.pool, other.pool)  # seeded
