"""FC, Partial FC and triplet heads against naive references (python loops, torch.optim.SGD)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ffc_ray.config import Config, ConfigError
from ffc_ray.heads import FullFC, PartialFC, TripletHead, build_head
from ffc_ray.registry import HEADS

D = 16


def make_cfg(**overrides) -> Config:
    base = {
        "head.type": "fc",
        "model.embedding_dim": D,
        "data.num_identities": 50,
        "data.identity_batch": 4,
        "data.instance_batch": 4,
    }
    base.update(overrides)
    return Config().with_overrides(base)


def batch(b: int, n: int, seed: int = 0, distinct: int | None = None):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, D, generator=g) * 5
    pool = torch.randperm(n, generator=g)[: distinct or n]
    labels = pool[torch.randint(0, len(pool), (b,), generator=g)]
    return emb, labels


def test_registry_has_the_heads():
    assert {"fc", "partial_fc", "triplet"} <= set(HEADS.names())
    assert isinstance(build_head(make_cfg(), 10), FullFC)
    assert isinstance(build_head(make_cfg(**{"head.type": "partial_fc"}), 10), PartialFC)
    assert isinstance(build_head(make_cfg(**{"head.type": "triplet"}), 10), TripletHead)


# ---- FC -------------------------------------------------------------------------------------


def naive_margin_ce(emb, labels, weight, margin_type, s, m, norms_fn=None) -> float:
    """Per-sample python loop: cosines, margin on the target, -log softmax, in float64."""
    emb, weight = emb.double(), weight.double()
    total = 0.0
    for i in range(emb.shape[0]):
        x = emb[i]
        y = int(labels[i])
        logits = []
        for j in range(weight.shape[0]):
            c = float(x @ weight[j]) / (float(x.norm()) * float(weight[j].norm()))
            c = min(1.0, max(-1.0, c))
            if j == y:
                if margin_type == "arcface":
                    t = math.acos(c)
                    c = math.cos(t + m) if t + m < math.pi else c - math.sin(math.pi - m) * m
                elif margin_type == "cosface":
                    c = c - m
                elif margin_type == "magface":
                    a = min(110.0, max(10.0, float(x.norm())))
                    mm = 0.35 / 100.0 * (a - 10.0) + 0.45
                    t = math.acos(c)
                    c = math.cos(t + mm) if t + mm < math.pi else c - math.sin(math.pi - mm) * mm
            logits.append(s * c)
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(z - mx) for z in logits))
        total += lse - logits[y]
    return total / emb.shape[0]


@pytest.mark.parametrize("margin_type", ["arcface", "cosface", "magface"])
def test_fc_loss_matches_naive_loop(margin_type):
    n = 12
    cfg = make_cfg(**{"head.margin_type": margin_type, "head.margin": 0.4, "head.scale": 16.0})
    head = build_head(cfg, n)
    emb, labels = batch(8, n, seed=1)
    out = head(emb, labels)
    want = naive_margin_ce(emb, labels, head.weight.detach(), margin_type, 16.0, 0.4)
    assert out.metrics["loss_cls"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    if margin_type == "magface":
        a = emb.norm(dim=1).clamp(10, 110).double()
        reg = 35.0 * float((1 / a + a / 110**2).mean())
        assert out.metrics["loss_extra"] == pytest.approx(reg, rel=1e-5)
        assert float(out.loss.detach()) == pytest.approx(want + reg, rel=1e-5)
    else:
        assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    "margin_type",
    ["arcface", "sphereface", "curricularface", "lsoftmax", "adaptiveface", "combined", "softmax"],
)
def test_fc_every_parameter_gets_a_gradient(margin_type):
    margin = 4.0 if margin_type in ("sphereface", "lsoftmax") else 0.5
    cfg = make_cfg(**{"head.margin_type": margin_type, "head.margin": margin})
    head = build_head(cfg, 10)
    emb, labels = batch(6, 10, seed=2)
    emb.requires_grad_(True)
    out = head(emb, labels)
    out.loss.backward()
    params = list(head.named_parameters())
    assert params
    for name, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert bool((p.grad != 0).any()), name
    assert torch.isfinite(emb.grad).all()


def test_fc_lsoftmax_uses_raw_logits():
    cfg = make_cfg(
        **{
            "head.margin_type": "lsoftmax",
            "head.margin": 2.0,
            "head.margin_kwargs": {"beta_min": 0.0},
        }
    )
    head = build_head(cfg, 5)
    head.margin.step(10**9)  # beta = 0: pure psi
    emb, labels = batch(4, 5, seed=3)
    out = head(emb, labels)
    w = head.weight.detach().double()
    e = emb.double()
    raw = e @ w.T
    total = 0.0
    for i in range(4):
        y = int(labels[i])
        logits = raw[i].clone()
        c = float(raw[i, y] / (e[i].norm() * w[y].norm()))
        t = math.acos(c)
        k = math.floor(2 * t / math.pi)
        logits[y] = float(e[i].norm() * w[y].norm()) * ((-1) ** k * math.cos(2 * t) - 2 * k)
        total += float(torch.logsumexp(logits, 0) - logits[y])
    assert out.metrics["loss_cls"] == pytest.approx(total / 4, rel=1e-5)


def test_fc_accuracy_and_label_checks():
    head = build_head(make_cfg(), 6)
    labels = torch.tensor([0, 3, 5, 3])
    emb = head.weight.detach()[labels] * 7.0  # each embedding is its class centre
    assert head(emb, labels).metrics["acc"] == 1.0
    assert head(emb, torch.tensor([1, 3, 5, 3])).metrics["acc"] == 0.75
    with pytest.raises(ValueError, match=r"labels must be in \[0, 6\)"):
        head(emb, torch.tensor([0, 3, 6, 3]))
    with pytest.raises(ValueError, match="embedding_dim"):
        head(torch.zeros(4, D + 1), labels)


def test_fc_extra_step_advances_margin_annealing():
    head = build_head(make_cfg(**{"head.margin_type": "sphereface", "head.margin": 4.0}), 5)
    for _ in range(3):
        head.extra_step(0.1)
    assert int(head.margin.iteration) == 3
    assert head.margin.current_lambda() == pytest.approx(1000.0 / (1 + 0.12 * 3))
    state = head.state_dict()
    fresh = build_head(make_cfg(**{"head.margin_type": "sphereface", "head.margin": 4.0}), 5)
    fresh.load_state_dict(state)
    assert fresh.margin.current_lambda() == pytest.approx(head.margin.current_lambda())


# ---- Partial FC -----------------------------------------------------------------------------


def pfc_cfg(rate: float, seed: int = 0, **kw) -> Config:
    return make_cfg(
        **{"head.type": "partial_fc", "head.sample_rate": rate, "train.seed": seed, **kw}
    )


def test_pfc_weights_are_buffers_not_parameters():
    head = build_head(pfc_cfg(0.1), 100)
    assert list(head.parameters()) == []
    names = dict(head.named_buffers())
    assert names["weight"].shape == (100, D) and names["weight_momentum"].shape == (100, D)
    assert head.memory_bytes() >= 2 * 100 * D * 4


def test_pfc_sample_contains_positives_and_has_budget_size():
    n, rate = 200, 0.1
    head = build_head(pfc_cfg(rate), n)
    _, labels = batch(16, n, seed=4, distinct=7)
    index, local = head.sample(labels)
    assert index.numel() == int(rate * n) == 20
    assert set(labels.tolist()) <= set(index.tolist())
    assert bool((index[1:] > index[:-1]).all())  # sorted, unique
    torch.testing.assert_close(index[local], labels)


def test_pfc_positives_over_budget_gives_exactly_the_positives():
    n = 100
    head = build_head(pfc_cfg(0.05), n)  # budget 5
    _, labels = batch(16, n, seed=5, distinct=9)
    index, local = head.sample(labels)
    torch.testing.assert_close(index, torch.unique(labels))
    torch.testing.assert_close(index[local], labels)


def test_pfc_sampling_is_deterministic_per_seed_and_changes_per_step():
    n = 1000
    _, labels = batch(8, n, seed=6)
    a, b, c = (build_head(pfc_cfg(0.1, seed=s), n) for s in (7, 7, 8))
    ia, ib, ic = a.sample(labels)[0], b.sample(labels)[0], c.sample(labels)[0]
    assert torch.equal(ia, ib)
    assert not torch.equal(ia, ic)
    a.extra_step(0.1)
    assert not torch.equal(a.sample(labels)[0], ia)  # new step, new negatives
    b.extra_step(0.1)
    assert torch.equal(a.sample(labels)[0], b.sample(labels)[0])


def test_pfc_rate_one_equals_fc_loss_on_the_same_weight():
    n = 30
    for margin_type in ("arcface", "cosface"):
        pfc = build_head(pfc_cfg(1.0, **{"head.margin_type": margin_type}), n)
        fc = build_head(make_cfg(**{"head.margin_type": margin_type}), n)
        with torch.no_grad():
            fc.weight.copy_(pfc.weight)
        emb, labels = batch(10, n, seed=8)
        out_p, out_f = pfc(emb, labels), fc(emb, labels)
        assert out_p.metrics["num_sampled"] == n
        torch.testing.assert_close(out_p.loss, out_f.loss)
        assert out_p.metrics["acc"] == out_f.metrics["acc"]


def reference_step(head, emb, labels, lr, cfg: Config):
    """Independent reference: loss on the sampled sub-matrix, torch.optim.SGD on it, with its
    momentum buffer pre-loaded from the head's stored rows (the V1 optimizer-state swap)."""
    index, local = head.sample(labels)
    sub = head.weight[index].clone().requires_grad_(True)
    fc = build_head(make_cfg(**{"head.margin_type": cfg.head.margin_type}), index.numel())
    logits = fc.margin(
        torch.nn.functional.linear(
            torch.nn.functional.normalize(emb), torch.nn.functional.normalize(sub)
        ),
        local,
    )
    torch.nn.functional.cross_entropy(logits, local).backward()
    o = cfg.optim
    opt = torch.optim.SGD(
        [sub], lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    )
    stored = head.weight_momentum[index].clone()
    if bool(stored.any()):
        opt.state[sub]["momentum_buffer"] = stored
    opt.step()
    buf = opt.state[sub]["momentum_buffer"]
    return index, sub.detach(), buf


@pytest.mark.parametrize("nesterov", [True, False])
def test_pfc_extra_step_updates_only_sampled_rows_like_sgd(nesterov):
    n, lr = 60, 0.3
    cfg = pfc_cfg(0.2, seed=3, **{"optim.nesterov": nesterov, "optim.weight_decay": 0.05})
    head = build_head(cfg, n)
    for step in range(3):  # later steps carry momentum on rows sampled before
        emb, labels = batch(8, n, seed=10 + step, distinct=4)
        before_w, before_m = head.weight.clone(), head.weight_momentum.clone()
        index, want_w, want_m = reference_step(head, emb, labels, lr, cfg)
        out = head(emb, labels)
        assert out.metrics["num_sampled"] == index.numel() == 12
        out.loss.backward()
        head.extra_step(lr)
        changed = (head.weight != before_w).any(dim=1)
        sampled = torch.zeros(n, dtype=torch.bool)
        sampled[index] = True
        assert bool((changed == sampled).all()), step
        assert torch.equal(head.weight_momentum[~sampled], before_m[~sampled])
        torch.testing.assert_close(head.weight[index], want_w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(head.weight_momentum[index], want_m, rtol=1e-5, atol=1e-7)
    assert int(head.steps) == 3


def test_pfc_second_forward_before_extra_step_is_an_error():
    head = build_head(pfc_cfg(0.2), 40)
    emb, labels = batch(4, 40, seed=11)
    head(emb, labels).loss.backward()
    with pytest.raises(RuntimeError, match="extra_step"):
        head(emb, labels)
    head.extra_step(0.1)
    head(emb, labels)  # fine again


def test_pfc_grad_scale_and_nonfinite_skip():
    n = 40
    a, b = build_head(pfc_cfg(0.25), n), build_head(pfc_cfg(0.25), n)
    b.load_state_dict(a.state_dict())
    emb, labels = batch(6, n, seed=12)
    a(emb, labels).loss.backward()
    a.extra_step(0.2)
    (b(emb, labels).loss * 1024.0).backward()
    b.extra_step(0.2, grad_scale=1024.0)
    torch.testing.assert_close(a.weight, b.weight)
    before = b.weight.clone()
    out = b(emb, labels)
    (out.loss * float("inf")).backward()
    b.extra_step(0.2)
    assert torch.equal(b.weight, before)


def test_pfc_refuses_adamw():
    with pytest.raises(ConfigError, match="optim.name"):
        build_head(pfc_cfg(0.1, **{"optim.name": "adamw"}), 10)


# ---- triplet --------------------------------------------------------------------------------


def brute_force_triplet(emb: np.ndarray, labels: list[int], alpha: float):
    """All (a, p, n) triplets enumerated; per (a, p) the semi-hard rule picks one n."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    b = len(labels)

    def d(i, j):
        return float(((e[i] - e[j]) ** 2).sum())

    losses = []
    for a, p in itertools.permutations(range(b), 2):
        if labels[a] != labels[p]:
            continue
        cands = [(d(a, n), n) for n in range(b) if labels[n] != labels[a]]
        if not cands:
            continue
        dap = d(a, p)
        semi = [(dan, n) for dan, n in cands if dap < dan < dap + alpha]
        dan = min(semi)[0] if semi else min(cands)[0]
        losses.append(max(0.0, dap - dan + alpha))
    if not losses:
        return 0.0, 0.0, 0
    return float(np.mean(losses)), float(np.mean([x > 0 for x in losses])), len(losses)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_brute_force(alpha, seed):
    rng = np.random.default_rng(seed)
    labels = [0, 0, 1, 1, 2, 0, 1, 3]
    emb = rng.normal(size=(len(labels), D)).astype(np.float32)
    head = build_head(make_cfg(**{"head.type": "triplet", "head.triplet_margin": alpha}), 4)
    x = torch.from_numpy(emb).requires_grad_(True)
    out = head(x, torch.tensor(labels))
    loss, active, num = brute_force_triplet(emb.astype(np.float64), labels, alpha)
    assert float(out.loss.detach()) == pytest.approx(loss, abs=1e-5)
    assert out.metrics["active_fraction"] == pytest.approx(active)
    assert out.metrics["num_triplets"] == num == 12  # ordered pairs: 3*2 (class 0) + 3*2 (class 1)
    out.loss.backward()
    assert torch.isfinite(x.grad).all()


def test_triplet_semi_hard_choice_hand_made():
    # 2-D unit vectors at given angles; squared distance = 2 - 2 cos(angle difference)
    def v(deg):
        r = math.radians(deg)
        return [math.cos(r), math.sin(r)] + [0.0] * (D - 2)

    labels = torch.tensor([0, 0, 1, 1])
    # anchor 0 at 0 deg, positive at 40 deg: d_ap = 0.468; negatives at 45 deg (d=0.586, within
    # margin 0.2 -> semi-hard) and 120 deg (d=3.0, easy)
    emb = torch.tensor([v(0), v(40), v(45), v(120)])
    head = TripletHead.from_config(make_cfg(**{"head.triplet_margin": 0.2}), 2)
    out = head(emb, labels)
    dap, dan = 2 - 2 * math.cos(math.radians(40)), 2 - 2 * math.cos(math.radians(45))
    losses = [dap - dan + 0.2]  # (0, 1): semi-hard 45 deg
    # (1, 0): anchor 40 deg, positive 0 deg (d_ap 0.468); negatives 45 deg (d=0.0076, harder than
    # the positive -> not semi-hard) and 120 deg (d=1.653, beyond margin): fallback hardest = 45
    losses.append(max(0.0, dap - (2 - 2 * math.cos(math.radians(5))) + 0.2))
    # (2, 3) and (3, 2): d_ap = 2 - 2 cos 75 deg; their negatives 0/40 deg
    d23 = 2 - 2 * math.cos(math.radians(75))
    for a_deg in (45, 120):
        negs = sorted(2 - 2 * math.cos(math.radians(a_deg - n)) for n in (0, 40))
        semi = [x for x in negs if d23 < x < d23 + 0.2]
        losses.append(max(0.0, d23 - (semi[0] if semi else negs[0]) + 0.2))
    assert float(out.loss.detach()) == pytest.approx(sum(losses) / 4, abs=1e-5)


def test_triplet_without_positive_pairs_is_zero_with_grad():
    head = TripletHead.from_config(make_cfg(), 5)
    x = torch.randn(4, D, requires_grad=True)
    out = head(x, torch.tensor([0, 1, 2, 3]))
    assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad
    assert out.metrics["no_positive_pairs"] == 1.0 and out.metrics["num_triplets"] == 0
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    single = head(x, torch.tensor([2, 2, 2, 2]))  # pairs but no negatives
    assert float(single.loss.detach()) == 0.0 and single.metrics["num_triplets"] == 0
    assert single.metrics["no_positive_pairs"] == 0.0


@pytest.mark.parametrize("head_type", ["fc", "partial_fc", "triplet"])
def test_heads_compute_in_fp32_under_autocast(head_type):
    cfg = make_cfg(**{"head.type": head_type, "head.sample_rate": 1.0})
    head = build_head(cfg, 20)
    emb, labels = batch(12, 20, seed=13, distinct=5)
    want = head(emb, labels).loss.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(emb.bfloat16(), labels).loss.detach()
    assert got.dtype == torch.float32
    # bf16 matmuls would be off by ~1e-2; the head must run its matmul in fp32 (bf16 input only
    # rounds the embeddings, which the reference below reproduces)
    with torch.no_grad():
        ref = head(emb.bfloat16().float(), labels).loss
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert float(want) > 0


def test_heads_take_explicit_arguments_and_from_config_maps_the_sections():
    """The constructors need no Config; from_config reads head / optim / model / train."""
    from ffc_ray.heads import FFCHead
    from ffc_ray.heads.margins import ArcFace, CosFace

    cfg = make_cfg(
        **{"head.margin_type": "cosface", "head.margin": 0.3, "head.scale": 20.0, "train.seed": 3}
    )
    torch.manual_seed(0)
    a = FullFC.from_config(cfg, 12)
    torch.manual_seed(0)
    b = FullFC(12, D, CosFace(20.0, 0.3))
    assert torch.equal(a.weight, b.weight) and (a.margin.m, a.margin.scale) == (0.3, 20.0)

    pcfg = make_cfg(**{"head.type": "partial_fc", "head.sample_rate": 0.25, "optim.momentum": 0.8})
    pfc = PartialFC.from_config(pcfg, 40)
    assert (pfc.num_sample, pfc.momentum, pfc.nesterov) == (10, 0.8, pcfg.optim.nesterov)

    fcfg = make_cfg(**{"head.type": "ffc", "pool.capacity": 8, "head.k_per_id": 3})
    ffc = FFCHead.from_config(fcfg, 50)
    explicit = FFCHead(8, D, ArcFace(32.0, 0.5), k_per_id=3, top_k=3, seed=fcfg.train.seed)
    assert torch.equal(ffc.pool, explicit.pool) and ffc.pool.shape == (3, 8, D)
    assert TripletHead.from_config(make_cfg(**{"head.triplet_margin": 0.4}), 5).margin == 0.4
