"""Fault drills: damage inside a store, a full disk during an import, a pairs conversion and a
checkpoint write. Each ends in one error naming the path, with nothing half-written left."""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import pytest

from ffc_ray.data.importers import import_arrays
from ffc_ray.data.store import StoreError, close_cached_envs, open_store, shard_dir, verify_store
from ffc_ray.data.transforms import encode_image
from ffc_ray.data.writer import StoreWriter
from ffc_ray.engine.checkpoint import write_checkpoint
from ffc_ray.engine.trainer import Trainer
from tests.unit.test_checkpoint import _cfg
from tests.unit.test_store import opts, smooth_images


class _FullDisk:
    """An LMDB environment whose write transactions fail as on a full disk."""

    def begin(self, write=False, **kw):
        raise lmdb.Error("mdb_txn_commit: No space left on device")

    def close(self):
        pass


def test_damaged_pages_inside_a_shard_are_named_everywhere(tmp_path):
    """Pages overwritten in place (size unchanged, so the opening checks pass): verify lists
    the shard and goes on with the others, the pre-run key walk and the loaders' reads raise
    a StoreError naming the shard; nothing crashes with LMDB's bare exception."""
    from ffc_ray.config import Config, ConfigError
    from ffc_ray.data.store import read_records
    from ffc_ray.preflight import check_store_readable

    labels = np.repeat(np.arange(40), 4)
    import_arrays(smooth_images(160, 16), labels, tmp_path / "st", opts(image_size=16))
    close_cached_envs()
    data = shard_dir(tmp_path / "st", 0) / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[2 * 4096 :] = bytes(len(raw) - 2 * 4096)  # every page but LMDB's two meta pages
    data.write_bytes(bytes(raw))

    report = verify_store(tmp_path / "st")
    assert not report.ok and report.checked > 0  # the other shards were still checked
    where, what = report.problems[0]
    assert where == str(shard_dir(tmp_path / "st", 0)) and "MDB_CORRUPTED" in what
    store = open_store(tmp_path / "st")
    with pytest.raises(StoreError, match=r"shard-00000: LMDB reports damage"):
        store.check_readable()
    rows = np.flatnonzero(store.shards == 0)[:2]
    with pytest.raises(StoreError, match=r"shard-00000: LMDB cannot read key"):
        read_records(store.path, store.keys[rows], store.shards[rows])
    cfg = Config().with_overrides({"data.source": str(tmp_path / "st"), "data.image_size": 16})
    with pytest.raises(ConfigError, match=r"'data.source'.*shard-00000: LMDB reports damage"):
        check_store_readable(cfg)
    close_cached_envs()


def test_a_full_disk_during_import_names_the_store_and_leaves_nothing(tmp_path):
    w = StoreWriter(tmp_path / "st", image_size=8, encoding="png", num_shards=1)
    w._envs[0].close()
    w._envs[0] = _FullDisk()  # the one shard's environment
    blob = encode_image(smooth_images(1, 8)[0], "png")
    with pytest.raises(StoreError, match=r"st: cannot write \(.*No space left.*\); .* GiB free"):
        with w:
            w.add(0, blob, "a.png")
            w.finish(["a"])
    assert list(tmp_path.iterdir()) == []  # no store, no <store>.tmp-<pid>


def test_a_full_disk_while_writing_pairs_leaves_no_part_file(tmp_path, monkeypatch):
    from ffc_ray.data import pairs as pairs_mod
    from ffc_ray.data.types import VerificationSet

    def full(f, **arrays):
        f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pairs_mod.np, "savez", full)
    imgs = smooth_images(4, 8)
    vset = VerificationSet("v", imgs[0::2], imgs[1::2], np.array([True, False]))
    with pytest.raises(pairs_mod.DataError, match=r"v\.npz: cannot write .*GiB free"):
        pairs_mod.save_verification_set(vset, tmp_path / "v.npz")
    assert list(tmp_path.iterdir()) == []


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
