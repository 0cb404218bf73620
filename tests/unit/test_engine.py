"""Engine: EMA math, LR schedules, one train step per head type, checkpoint round trip."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from ffc_ray.config import Config
from ffc_ray.engine.ema import ema_update
from ffc_ray.engine.schedule import build_scheduler
from ffc_ray.engine.trainer import Trainer

NUM_IDS = 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a shared 2-core machine: a second OpenMP thread only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(head: str = "ffc", **over: object) -> Config:
    d = {
        "data.image_size": 32,
        "data.instance_batch": 8,
        "data.identity_batch": 4,
        "data.num_identities": NUM_IDS,
        "model.backbone": "tiny",
        "model.embedding_dim": 32,
        "head.type": head,
        "head.margin_type": "cosface",
        "head.margin": 0.2,
        "head.scale": 16.0,
        "pool.capacity": 10,
        "optim.lr": 0.05,
        "train.steps": 10,
        "train.device": "cpu",
    }
    d.update(over)
    return Config().with_overrides(d)


def make_batch(seed: int, cfg: Config):
    """x = 4 instance images + 4 identity images, y = 4 instance + the same 4 identities."""
    rng = np.random.default_rng(seed)
    s = cfg.data.image_size
    ids = rng.choice(NUM_IDS, 4, replace=False)
    lx = np.concatenate([rng.integers(0, NUM_IDS, 4), ids]).astype(np.int64)
    ly = np.concatenate([rng.integers(0, NUM_IDS, 4), ids]).astype(np.int64)
    x = rng.integers(0, 256, (8, 3, s, s), dtype=np.uint8)
    y = rng.integers(0, 256, (8, 3, s, s), dtype=np.uint8)
    return torch.from_numpy(x), lx, torch.from_numpy(y), ly


def hwc(images: torch.Tensor) -> np.ndarray:
    """A batch view as the uint8 [B, H, W, 3] arrays that ``Trainer.embed`` takes."""
    return np.ascontiguousarray(images.numpy().transpose(0, 2, 3, 1))


# ---- EMA -----------------------------------------------------------------------------------


def _pair():
    g, p = (
        nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)),
        nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)),
    )
    with torch.no_grad():
        g[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        g[0].bias.fill_(0.0)
        p[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
        p[0].bias.fill_(1.0)
        g[1].running_mean.fill_(0.0)
        p[1].running_mean.fill_(10.0)
        p[1].num_batches_tracked.fill_(7)
    return g, p


def test_ema_parameters_by_hand():
    g, p = _pair()
    ema_update(g, p, 0.9)
    assert torch.allclose(g[0].weight, torch.tensor([[1.2, 2.2]]))  # 0.9 * 1 + 0.1 * 3, ...
    assert torch.allclose(g[0].bias, torch.tensor([0.1]))
    assert g[1].running_mean.item() == 0.0  # official: parameters only
    assert g[1].num_batches_tracked.item() == 0
    assert torch.equal(p[0].weight, torch.tensor([[3.0, 4.0]]))  # P untouched


def test_ema_buffers_when_asked():
    g, p = _pair()
    ema_update(g, p, 0.75, buffers=True)
    assert g[1].running_mean.item() == pytest.approx(2.5)  # 0.75 * 0 + 0.25 * 10
    assert g[1].num_batches_tracked.item() == 7  # integer buffers are copied


def test_ema_rejects_mismatch_and_bad_momentum():
    with pytest.raises(ValueError, match="differ"):
        ema_update(nn.Linear(2, 1), nn.Sequential(nn.Linear(2, 1)), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(nn.Linear(2, 1), nn.Linear(2, 1), 1.0)


# ---- schedules -----------------------------------------------------------------------------


def _lrs(cfg: Config, total: int, n: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sch = build_scheduler(opt, cfg.optim, total)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return out


def test_multistep_values_at_boundaries():
    cfg = Config().with_overrides(
        {"optim.lr": 1.0, "optim.milestones": [0.5, 0.75], "optim.gamma": 0.1}
    )
    lrs = _lrs(cfg, 8, 8)
    assert lrs == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_warmup_cosine_endpoints():
    cfg = Config().with_overrides(
        {
            "optim.lr": 1.0,
            "optim.schedule": "cosine",
            "optim.warmup_steps": 2,
            "optim.min_lr": 0.01,
            "train.steps": 10,
        }
    )
    lrs = _lrs(cfg, 10, 11)
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # linear warmup
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at the base lr
    assert lrs[6] == pytest.approx(0.01 + 0.99 * 0.5)  # half way: t = 4 / 8
    assert lrs[10] == pytest.approx(0.01)  # ends at min_lr
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[3] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 8)))


def test_constant_and_state_dict_round_trip():
    cfg = Config().with_overrides(
        {"optim.lr": 0.3, "optim.schedule": "constant", "optim.warmup_steps": 3, "train.steps": 10}
    )
    assert _lrs(cfg, 10, 5) == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    cfg = Config().with_overrides({"optim.lr": 1.0, "optim.milestones": [0.5]})
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sch = build_scheduler(opt, cfg.optim, 4)
    for _ in range(3):
        opt.step()
        sch.step()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sch2 = build_scheduler(opt2, Config().optim, 100)  # different schedule: state must win
    sch2.load_state_dict(sch.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert sch2.get_last_lr() == pytest.approx([0.1])
    opt2.step()
    sch2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)


# ---- train steps -----------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["ffc", "fc", "partial_fc", "triplet"])
def test_train_step_each_head(head):
    cfg = tiny_cfg(head)
    tr = Trainer(cfg, NUM_IDS, "cpu")
    m1 = tr.train_step(*make_batch(0, cfg))
    assert all(math.isfinite(v) for v in m1.values()), m1
    if head == "ffc":
        assert tr.gnet is not None
        g_before = [p.detach().clone() for p in tr.gnet.parameters()]
        p_before = [p.detach().clone() for p in tr.pnet.parameters()]
    m2 = tr.train_step(*make_batch(1, cfg))
    for name, prm in tr.pnet.named_parameters():
        assert prm.grad is not None, f"{head}: no gradient for {name}"
        assert torch.isfinite(prm.grad).all()
    assert sum(float(p.grad.abs().sum()) for p in tr.pnet.parameters()) > 0
    assert m2["lr"] == pytest.approx(cfg.optim.lr)
    assert tr.step == 2
    if head == "ffc":
        mom = cfg.pool.momentum
        for gb, pb, g in zip(g_before, p_before, tr.gnet.parameters()):
            assert g.grad is None and not g.requires_grad
            assert torch.allclose(g, mom * gb + (1 - mom) * pb, atol=1e-6)  # EMA, then train
        assert any(not torch.equal(g, gb) for g, gb in zip(tr.gnet.parameters(), g_before))
        assert {"loss_pos", "loss_neg", "pos_fraction", "occupancy", "evictions"} <= set(m2)
        assert m2["loss"] == pytest.approx(m2["loss_pos"] + m2["loss_neg"], rel=1e-5)
        assert m2["pos_fraction"] >= 0.5  # the identity halves are always positives
        assert 0 < m2["occupancy"] <= 10
        assert tr.head.occupancy() == len(tr.index)


def test_upcast_widens_autocast_outputs_and_keeps_float64():
    from ffc_ray.heads.base import upcast

    for dt in (torch.float16, torch.bfloat16):
        assert upcast(torch.ones(2, dtype=dt)).dtype == torch.float32
    for dt in (torch.float32, torch.float64):
        t = torch.ones(2, dtype=dt)
        assert upcast(t) is t


@pytest.mark.parametrize("head", ["ffc", "fc", "partial_fc", "triplet"])
def test_float64_runs_every_tensor_in_float64_and_matches_float32(head):
    """train.dtype float64 (numerical checks): weights, pool, head and optimiser state are all
    float64, and the first loss (before any update, a continuous function of the same initial
    weights) equals the float32 run's up to float32 round-off (observed 1e-7 .. 2e-6 relative;
    the triplet loss is a difference of distances, so the most cancellation)."""
    losses = {}
    for dt in ("float32", "float64"):
        tr = Trainer(tiny_cfg(head, **{"train.dtype": dt}), NUM_IDS, "cpu")
        losses[dt] = tr.train_step(*make_batch(0, tr.cfg))["loss"]
        tr.train_step(*make_batch(1, tr.cfg))
        tensors = [*tr.pnet.state_dict().values(), *tr.head.state_dict().values()]
        tensors += [v for st in tr.optimizer.state.values() for v in st.values()]
        if tr.gnet is not None:
            tensors += list(tr.gnet.state_dict().values())
        floats = {t.dtype for t in tensors if torch.is_tensor(t) and t.is_floating_point()}
        assert floats == {getattr(torch, dt)}, (dt, floats)
        assert tr.embed(hwc(make_batch(2, tr.cfg)[0])).dtype == torch.float32
    assert losses["float64"] == pytest.approx(losses["float32"], rel=1e-4)


def test_ffc_pool_holds_gnet_features_of_the_commit_view():
    cfg = tiny_cfg("ffc", **{"head.k_per_id": 1})
    tr = Trainer(cfg, NUM_IDS, "cpu")
    x, lx, y, ly = make_batch(3, cfg)
    gref = copy.deepcopy(tr.gnet)
    tr.train_step(x, lx, y, ly)
    # step 1: G = EMA(G, P) = P (identical at start), so the committed rows are G(x) features
    with torch.no_grad():
        feats = torch.nn.functional.normalize(gref(tr._inputs(x)), dim=1)
    slots = tr.index.lookup(lx)
    last = {int(lab): i for i, lab in enumerate(lx)}  # last occurrence wins
    for i in last.values():
        assert torch.allclose(tr.head.pool[0, slots[i]], feats[i], atol=1e-5)


def test_symmetric_false_runs_commit_pass_only():
    cfg = tiny_cfg("ffc", **{"head.symmetric": False})
    tr = Trainer(cfg, NUM_IDS, "cpu")
    m = tr.train_step(*make_batch(0, cfg))
    assert math.isfinite(m["loss"]) and m["occupancy"] > 0


def _run(tr: Trainer, batches):
    return [tr.train_step(*b)["loss"] for b in batches]


@pytest.mark.parametrize("head", ["ffc", "partial_fc"])
def test_state_dict_round_trip_continues_identically(head):
    cfg = tiny_cfg(head, **{"optim.milestones": [0.3], "train.steps": 6})
    batches = [make_batch(10 + i, cfg) for i in range(5)]
    a = Trainer(cfg, NUM_IDS, "cpu")
    _run(a, batches[:2])
    saved = copy.deepcopy(a.state_dict())
    losses_a = _run(a, batches[2:])
    b = Trainer(
        tiny_cfg(head, **{"optim.milestones": [0.3], "train.steps": 6, "train.seed": 5}),
        NUM_IDS,
        "cpu",
    )
    b.load_state_dict(saved)
    assert b.step == 2
    losses_b = _run(b, batches[2:])
    assert losses_a == losses_b
    assert losses_a[0] != losses_a[1]
    if head == "ffc":
        assert torch.equal(a.head.pool, b.head.pool)
        assert torch.equal(a.head.ring_pos, b.head.ring_pos)


def test_embed_is_normalised_eval_mode_and_batched():
    cfg = tiny_cfg("fc")
    tr = Trainer(cfg, NUM_IDS, "cpu")
    imgs = hwc(make_batch(0, cfg)[0])
    e_all = tr.embed(imgs, batch_size=3)
    e_one = tr.embed(imgs[:1])
    assert e_all.shape == (8, 32)
    assert torch.allclose(e_all.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(e_all[0], e_one[0], atol=1e-5)  # eval-mode BN: batch independent
    assert tr.pnet.training


def test_train_step_rejects_mismatched_labels():
    cfg = tiny_cfg("fc")
    tr = Trainer(cfg, NUM_IDS, "cpu")
    x, lx, y, ly = make_batch(0, cfg)
    with pytest.raises(ValueError, match="labels"):
        tr.train_step(x, lx[:3], y, ly)


def test_the_trainer_runs_the_step_strategy_its_head_declares(monkeypatch):
    """A head registered from outside brings its own step class; the Trainer calls it between
    zero_grad and the optimiser step and keeps its state in the checkpoint."""
    from ffc_ray.heads import FullFC
    from ffc_ray.heads.base import PlainStep
    from ffc_ray.registry import HEADS

    calls = []

    class CountingStep(PlainStep):
        def __call__(self, x, lx, y, ly):
            calls.append((len(x), len(lx), len(y), len(ly)))
            return super().__call__(x, lx, y, ly)

        def state_dict(self):
            return {"gnet": None, "index": {"calls": len(calls)}}

    class CountingFC(FullFC):
        step_class = CountingStep

    monkeypatch.setitem(HEADS._entries, "counting_fc", CountingFC)  # as @HEADS.register does
    cfg = tiny_cfg("counting_fc")  # a registered name passes validation
    tr = Trainer(cfg, NUM_IDS, "cpu")
    before = tr.head.weight.detach().clone()
    tr.train_step(*make_batch(0, cfg))
    assert calls == [(8, 8, 8, 8)]
    assert not torch.equal(tr.head.weight, before)  # the optimiser stepped the head
    assert tr.state_dict()["index"] == {"calls": 1} and tr.gnet is None


def test_evaluate_sets_reports_the_configured_far_targets():
    from ffc_ray.data.types import VerificationSet
    from ffc_ray.eval.sets import evaluate_sets

    cfg = tiny_cfg("fc", **{"eval.far_targets": [0.05], "eval.folds": 2})
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (80, 32, 32, 3), dtype=np.uint8)
    vset = VerificationSet("v", imgs[0::2], imgs[1::2], np.arange(40) % 2 == 0)
    flat, _ = evaluate_sets(Trainer(cfg, NUM_IDS, "cpu"), [vset], cfg)
    assert "v/tar@far=0.05" in flat and not any("0.001" in k for k in flat)
