"""The checkpoint format: one folder per checkpoint, readable without Ray.

* ``state.pt``: everything to continue (trainer state: P-Net, G-Net, head / pool, optimiser,
  schedule, scaler; the pool index; each rank's RNG states; the resolved config; the data
  position);
* ``meta.json``: a summary (step, head, metrics, pool and index checksums);
* ``config.yaml``: the resolved config.

Ray Train workers write these folders (:mod:`ffc_ray.ray.train`); evaluation and tools read them
with :func:`load_checkpoint_state`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffc_ray.config import CONFIG_FILE, Config
from ffc_ray.engine.trainer import Trainer
from ffc_ray.heads.ffc import FFCHead
from ffc_ray.storage import write_error

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def tensor_checksum(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' bytes (CPU copies), to compare replicated buffers across ranks."""
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous()
        h.update(str(a.dtype).encode() + str(tuple(a.shape)).encode())
        h.update(a.numpy().tobytes() if a.dtype != torch.bfloat16 else a.float().numpy().tobytes())
    return h.hexdigest()


def pool_checksum(trainer: Trainer) -> str | None:
    """Checksum of the replicated pool buffers (pool, ring position, row count)."""
    h = trainer.head
    if not isinstance(h, FFCHead):
        return None
    return tensor_checksum(h.pool, h.ring_pos, h.row_count)


def model_checksum(trainer: Trainer) -> str:
    """Checksum of the P-Net parameters and the head state: equal on every rank. (BatchNorm
    running statistics are left out: each rank updates them from its own batch, and DDP
    re-broadcasts rank 0's before every forward; the checkpoint holds rank 0's.)"""
    tensors = [p for _, p in sorted(trainer.pnet.named_parameters())]
    if not getattr(trainer.head, "sharded", False):  # a sharded head differs by rank
        head = trainer.head.state_dict()
        tensors += [t for _, t in sorted(head.items()) if isinstance(t, torch.Tensor)]
    return tensor_checksum(*tensors)


def head_shard_file(rank: int, world: int) -> str:
    return f"head-{rank}-of-{world}.pt"


def write_head_shard(directory: Path, trainer: Trainer, rank: int, world: int) -> None:
    """A sharded head's rows and this rank's optimiser state (momentum of those rows), one file
    per rank in the same checkpoint folder (Ray Train merges the ranks' folders)."""
    head = trainer.head
    shard = {
        "head": head.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "classes": [int(head.start), int(head.end)],
    }
    torch.save(shard, Path(directory) / head_shard_file(rank, world))


def load_head_shard(directory: str | Path, rank: int, world: int) -> dict[str, Any]:
    """This rank's ``head`` and ``optimizer`` state from a checkpoint of a sharded head; a
    checkpoint written by another number of workers is refused, naming that number."""
    f = Path(directory) / head_shard_file(rank, world)
    if not f.is_file():
        found = sorted(p.name for p in Path(directory).glob("head-*-of-*.pt"))
        was = re.search(r"-of-(\d+)\.pt$", found[0]).group(1) if found else None
        if was is None:
            hint = "it holds no head shards"
        elif int(was) == world:
            hint = f"the file of rank {rank} is missing (found {', '.join(found)})"
        else:
            hint = f"resume with ray.num_workers: {was}"
        raise CheckpointError(
            f"{directory}: no {f.name} for a head sharded over {world} workers: {hint} "
            "(a sharded head is restored at the world size that wrote it)"
        )
    shard = _load_plain(f)
    return {"head": shard["head"], "optimizer": shard["optimizer"]}


def write_checkpoint(
    directory: Path,
    *,
    trainer: Trainer,
    cfg: Config,
    index_state: Any,
    index_sum: str | None,
    rng: list[Any],
    epoch: int,
    position: int,
    metrics: dict[str, Any],
    num_shards: int,
) -> dict[str, Any]:
    """state.pt (everything to continue) + meta.json (summary) + config.yaml (resolved)."""
    state = {
        "step": trainer.step,
        "epoch": epoch,
        "position": position,
        "trainer": trainer.state_dict(),
        "index": index_state,
        "rng": rng,
        "config": cfg.to_dict(),
        "num_classes": trainer.num_classes,
        "num_shards": num_shards,
    }
    try:
        torch.save(state, directory / STATE_FILE)
    except OSError as exc:  # the folder is a temporary one: nothing half-written survives
        raise OSError(write_error(directory, exc)) from exc
    meta = {
        "step": trainer.step,
        "epoch": epoch,
        "position": position,
        "num_classes": trainer.num_classes,
        "head": cfg.head.type,
        "pool_checksum": pool_checksum(trainer),
        "index_checksum": index_sum,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    cfg.save(directory / CONFIG_FILE)
    return meta


class CheckpointError(ValueError):
    """A ``state.pt`` that holds anything but plain data (it is never executed)."""


def _numpy_globals() -> list[Any]:
    """What a checkpoint's numpy arrays (pool index, numpy RNG state) need under
    ``weights_only``: numpy's array reconstructor, ndarray, dtype, bytes and the numeric dtypes
    (no object dtype, nothing that runs code)."""
    reconstruct = np.empty(0).__reduce__()[0]
    dtypes = {type(np.dtype(c)) for c in "?bhilqBHILQefdFD"}
    return [reconstruct, np.ndarray, np.dtype, bytes, *dtypes]


def load_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """Read ``state.pt`` from a checkpoint folder written by :func:`write_checkpoint`, as plain
    data only (``weights_only``: tensors, numbers, strings, containers, numeric numpy arrays);
    a file holding any other object is refused before anything in it runs."""
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not an ffc_ray checkpoint (no {STATE_FILE})")
    return _load_plain(f)


def _load_plain(f: Path) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = found.group(1) if found else "an object that is not plain data"
        raise CheckpointError(
            f"{f}: refused: it holds {what}; checkpoints are read as plain data only "
            "(tensors, numbers, strings, containers, numeric arrays)"
        ) from None


def rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
