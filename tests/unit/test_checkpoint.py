"""The checkpoint format: written, read back as plain data only; code in a file never runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ffc_ray.cli import main
from ffc_ray.config import Config
from ffc_ray.engine.checkpoint import (
    STATE_FILE,
    CheckpointError,
    load_checkpoint_state,
    rng_state,
    write_checkpoint,
)
from ffc_ray.engine.trainer import Trainer
from ffc_ray.pool.index import PoolIndex


class _WritesMarker:
    """A hostile object: unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


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


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"step": 1, "trainer": {"x": _WritesMarker(marker)}}, ckpt / STATE_FILE)
    with pytest.raises(CheckpointError, match=str(ckpt / STATE_FILE)):
        load_checkpoint_state(ckpt)
    assert not marker.exists()
    # the CLI: one line naming the file, exit code 2, still nothing run
    assert main(["eval", str(ckpt), "--pairs", "synthetic"]) == 2
    assert not marker.exists()


def test_a_full_disk_while_writing_a_checkpoint_names_the_folder_and_the_free_space(
    tmp_path: Path, monkeypatch
) -> None:
    from ffc_ray.engine import checkpoint as ckpt_mod

    def full(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    cfg = _cfg(tmp_path)
    with pytest.raises(
        OSError, match=r"ck: cannot write \(.*No space left.*\); [\d.]+ GiB free on"
    ):
        (tmp_path / "ck").mkdir()
        write_checkpoint(
            tmp_path / "ck",
            trainer=Trainer(cfg, 20, "cpu"),
            cfg=cfg,
            index_state=None,
            index_sum=None,
            rng=[],
            epoch=0,
            position=0,
            metrics={},
            num_shards=1,
        )
