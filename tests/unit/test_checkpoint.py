"""The checkpoint format: written, read back as plain data only; code in a file never runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ffc_ray.config import Config
from ffc_ray.engine.checkpoint import (
    load_checkpoint_state,
    rng_state,
    write_checkpoint,
)
from ffc_ray.engine.trainer import Trainer
from ffc_ray.pool.index import PoolIndex


def _cfg(tmp_path: Path) -> Config:
    return Config().with_overrides(
        {
            "data.image_size": 32,
            "data.num_identities": 20,
            "data.instance_batch": 8,
            "data.identity_batch": 4,
            "model.backbone": "tiny",
            "model.embedding_dim": 16,
            "pool.capacity": 10,
            "train.output_dir": str(tmp_path),
        }
    )


def test_written_checkpoint_reads_back_as_plain_data(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    trainer = Trainer(cfg, 20, "cpu")
    index = PoolIndex(10, "lru")
    index.assign(np.arange(8, dtype=np.int64))
    index.assign(np.arange(4, 10, dtype=np.int64))
    write_checkpoint(
        tmp_path,
        trainer=trainer,
        cfg=cfg,
        index_state=index.state_dict(),
        index_sum=None,
        rng=[rng_state()],
        epoch=0,
        position=3,
        metrics={"loss": 1.5},
        num_shards=1,
    )
    state = load_checkpoint_state(tmp_path)
    for k, v in trainer.state_dict()["pnet"].items():
        assert torch.equal(state["trainer"]["pnet"][k], v), k
    assert torch.equal(state["trainer"]["head"]["pool"], trainer.head.pool)
    ref = index.state_dict()
    for k in ("labels", "order"):
        np.testing.assert_array_equal(state["index"][k], ref[k])
    np.testing.assert_array_equal(state["rng"][0]["numpy"][1], np.random.get_state()[1])
    assert state["position"] == 3 and state["config"] == cfg.to_dict()
