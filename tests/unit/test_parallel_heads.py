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
