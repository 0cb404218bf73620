"""Class-sharded heads over a gloo process group of 2 CPU processes, in float64, against the
single-process arithmetic on the global batch: the distributed cross-entropy, sharded FC and
sharded Partial FC (same sampled classes), and the sharded head checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ffc_ray.heads import parallel
from ffc_ray.heads.fc import FullFC
from ffc_ray.heads.margins import ArcFace, CosFace
from ffc_ray.heads.partial_fc import PartialFC

W, B, D, N = 2, 6, 8, 11  # N odd: unequal shards (6 and 5 classes)
TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64, a few dozen operations


def test_shard_range_hand_values():
    assert [parallel.shard_range(11, r, 2) for r in range(2)] == [(0, 6), (6, 11)]
    assert [parallel.shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert parallel.shard_range(5, 0, 1) == (0, 5)
    with pytest.raises(ValueError):
        parallel.shard_range(5, 2, 2)


def _spawn(fn, tmp_path: Path, *args) -> None:
    mp.spawn(_entry, args=(fn, str(tmp_path / "pg"), args), nprocs=W, join=True)


def _entry(rank: int, fn, init_file: str, args) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same reference weights in every process
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _global_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(W * B, D, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, N, (W * B,), generator=g)
    labels[0], labels[-1] = 0, N - 1  # targets on both shards
    return emb, labels


def _cross_entropy_case(rank: int) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(W * B, N, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, N, (W * B,), generator=g)
    full = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(full, labels)
    ref.backward()
    start, end = parallel.shard_range(N, rank, W)
    mine = logits[:, start:end].clone().requires_grad_(True)
    target = torch.where((labels >= start) & (labels < end), labels - start, -1)
    loss = parallel.cross_entropy(mine, target)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(mine.grad, full.grad[:, start:end], **TOL)
    want = float((logits.argmax(dim=1) == labels).double().mean())
    assert parallel.top1(mine.detach(), target) == want


def test_distributed_cross_entropy_equals_the_full_softmax(tmp_path):
    _spawn(_cross_entropy_case, tmp_path)


def _fc_case(rank: int, margin_name: str) -> None:
    margin = ArcFace(16.0, 0.3) if margin_name == "arcface" else CosFace(16.0, 0.2)
    emb, labels = _global_batch()
    ref = FullFC(N, D, margin).double()
    full_emb = emb.clone().requires_grad_(True)
    out_ref = ref(full_emb, labels)
    out_ref.loss.backward()

    head = FullFC(N, D, margin, sharded=True).double()
    assert head.sharded and (head.start, head.end) == parallel.shard_range(N, rank, W)
    with torch.no_grad():
        head.weight.copy_(ref.weight[head.start : head.end])
    mine = emb[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    out = head(mine, labels[rank * B : (rank + 1) * B])
    out.loss.backward()
    torch.testing.assert_close(out.loss, out_ref.loss.detach(), **TOL)
    torch.testing.assert_close(head.weight.grad, ref.weight.grad[head.start : head.end], **TOL)
    # W x the global-mean gradient: DDP's average over the ranks then gives the global one
    want = W * full_emb.grad[rank * B : (rank + 1) * B]
    torch.testing.assert_close(mine.grad, want, **TOL)
    assert out.metrics["acc"] == pytest.approx(out_ref.metrics["acc"])


@pytest.mark.parametrize("margin_name", ["arcface", "cosface"])
def test_sharded_fc_equals_the_full_classifier(tmp_path, margin_name):
    _spawn(_fc_case, tmp_path, margin_name)


def _pfc_case(rank: int, ckpt_dir: str) -> None:
    emb, labels = _global_batch(seed=1)
    kw = {"sample_rate": 0.5, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}
    ref = PartialFC(N, D, CosFace(16.0, 0.2), **kw).double()  # first: same RNG on each rank
    head = PartialFC(N, D, CosFace(16.0, 0.2), sharded=True, seed=4, **kw).double()
    with torch.no_grad():
        head.weight.copy_(ref.weight[head.start : head.end])
    mine = emb[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    out = head(mine, labels[rank * B : (rank + 1) * B])
    out.loss.backward()
    # the reference samples exactly the union of the shards' samples
    parts = [None] * W
    dist.all_gather_object(parts, (head._index + head.start).tolist())
    union = torch.tensor(sorted(sum(parts, [])))
    assert head.num_sample == int(0.5 * (head.end - head.start))
    assert set(labels[(labels >= head.start) & (labels < head.end)].tolist()) <= set(
        (head._index + head.start).tolist()  # every owned positive is sampled
    )
    ref.sample = lambda lab: (union, torch.searchsorted(union, lab))
    full_emb = emb.clone().requires_grad_(True)
    out_ref = ref(full_emb, labels)
    out_ref.loss.backward()
    torch.testing.assert_close(out.loss, out_ref.loss.detach(), **TOL)
    torch.testing.assert_close(mine.grad, W * full_emb.grad[rank * B : (rank + 1) * B], **TOL)
    head.extra_step(0.1)
    ref.extra_step(0.1)
    torch.testing.assert_close(head.weight, ref.weight[head.start : head.end], **TOL)
    torch.testing.assert_close(
        head.weight_momentum, ref.weight_momentum[head.start : head.end], **TOL
    )


def test_sharded_partial_fc_equals_the_full_sample_and_update(tmp_path):
    _spawn(_pfc_case, tmp_path, str(tmp_path))


def _checkpoint_case(rank: int, ckpt_dir: str) -> None:
    from types import SimpleNamespace

    from ffc_ray.engine.checkpoint import CheckpointError, load_head_shard, write_head_shard

    head = FullFC(N, D, CosFace(16.0, 0.2), sharded=True).double()
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    emb, labels = _global_batch()
    head(emb[rank * B : (rank + 1) * B], labels[rank * B : (rank + 1) * B]).loss.backward()
    opt.step()
    write_head_shard(Path(ckpt_dir), SimpleNamespace(head=head, optimizer=opt), rank, W)
    dist.barrier()
    fresh = FullFC(N, D, CosFace(16.0, 0.2), sharded=True).double()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    shard = load_head_shard(ckpt_dir, rank, W)
    fresh.load_state_dict(shard["head"])
    fresh_opt.load_state_dict(shard["optimizer"])
    assert torch.equal(fresh.weight, head.weight)
    mom = fresh_opt.state[fresh.weight]["momentum_buffer"]
    assert torch.equal(mom, opt.state[head.weight]["momentum_buffer"])
    with pytest.raises(CheckpointError, match="ray.num_workers: 2"):
        load_head_shard(ckpt_dir, 0, 3)


def test_sharded_head_checkpoint_round_trip_and_world_size_check(tmp_path):
    _spawn(_checkpoint_case, tmp_path, str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("head-*")) == ["head-0-of-2.pt", "head-1-of-2.pt"]


def test_a_sharded_head_without_a_process_group_is_the_full_head():
    head = FullFC(N, D, ArcFace(16.0, 0.3), sharded=True)
    assert not head.sharded and head.weight.shape == (N, D)


def test_the_shardable_margins_are_the_ones_the_config_allows():
    from ffc_ray.config import SHARDABLE_MARGINS
    from ffc_ray.registry import MARGINS

    flagged = {n for n in MARGINS.names() if getattr(MARGINS.get(n), "shardable", False)}
    assert flagged == set(SHARDABLE_MARGINS)


def _ffc_case(rank: int, k_mode: str, neg_loss: str) -> None:
    from ffc_ray.heads.ffc import FFCHead

    c, k = 9, 2  # shards of 5 and 4 slots
    kw = {"k_per_id": k, "top_k": 3, "k_mode": k_mode, "neg_loss": neg_loss}
    ref = FFCHead(c, D, CosFace(16.0, 0.2), **kw).double()
    head = FFCHead(c, D, CosFace(16.0, 0.2), sharded=True, **kw).double()
    s, e = head.start, head.end
    assert head.sharded and head.pool.shape == (k, e - s, D)
    g = torch.Generator().manual_seed(5)
    gallery = torch.randn(10, D, generator=g, dtype=torch.float64)
    slots = torch.tensor([0, 3, 3, 8, 5, 1, 6, 8, 2, 4])
    new = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    with torch.no_grad():
        ref.row_count[:] = torch.tensor([1, 2, 0, 1, 2, 0, 1, 2, 0])
        ref.ring_pos[:] = torch.tensor([1, 0, 0, 1, 0, 0, 1, 0, 0])
        for name in ("pool", "row_count", "ring_pos"):
            mine = getattr(ref, name)[..., s:e] if name != "pool" else ref.pool[:, s:e]
            getattr(head, name).copy_(mine)
    before = ref.pool.clone()
    undo_ref, undo = ref.write(gallery, slots, new), head.write(gallery, slots, new)
    torch.testing.assert_close(head.pool, ref.pool[:, s:e], rtol=0, atol=0)
    assert torch.equal(head.ring_pos, ref.ring_pos[s:e])
    assert torch.equal(head.row_count, ref.row_count[s:e])
    probes = torch.randn(W * B, D, generator=g, dtype=torch.float64) * 2
    probe_slots = torch.tensor([0, -1, 3, 8, -1, 5, 6, -1, 2, 4, -1, 7])  # both shards, negatives
    seen = ref.hit_slots(slots, new)
    full = probes.clone().requires_grad_(True)
    out_ref = ref.loss(full, probe_slots, seen)
    out_ref.loss.backward()
    mine = probes[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    out = head.loss(mine, probe_slots[rank * B : (rank + 1) * B], seen)
    out.loss.backward()
    torch.testing.assert_close(out.loss, out_ref.loss.detach(), **TOL)
    for key in ("loss_pos", "loss_neg", "num_pos", "num_neg", "cos_target", "cos_other"):
        assert out.metrics[key] == pytest.approx(out_ref.metrics[key], rel=1e-9), key
    torch.testing.assert_close(mine.grad, W * full.grad[rank * B : (rank + 1) * B], **TOL)
    ref.restore(undo_ref)
    head.restore(undo)
    assert torch.equal(head.pool, before[:, s:e])


@pytest.mark.parametrize("k_mode,neg_loss", [("ring", "topk"), ("mean", "mean_cos")])
def test_sharded_pool_equals_the_replicated_pool(tmp_path, k_mode, neg_loss):
    """The DCP pool sharded by slot: the same writes land in the owning shard, and the loss of
    every rank's probes (positives through the cross-shard softmax, negatives' top-K merged
    over the shards) and its gradients equal the single-process head's on the whole batch."""
    _spawn(_ffc_case, tmp_path, k_mode, neg_loss)
