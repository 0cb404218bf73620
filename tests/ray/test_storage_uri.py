"""A Ray Train run whose storage, store and verification set are URIs (``file://`` here).

Stands in for a bucket: Ray Train writes the checkpoints through pyarrow at the URI, the run's
own files are staged locally and uploaded, the store is synced to the node cache, and running
the same name again -- after the staging folder is gone, as on another node -- resumes from the
checkpoint at the URI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ffc_ray import storage
from ffc_ray.config import load_config
from ffc_ray.data.importers import ImportOptions, import_synthetic
from ffc_ray.data.pairs import save_verification_set
from ffc_ray.data.store import close_cached_envs
from ffc_ray.data.synthetic import synthetic_split
from ffc_ray.engine.loop import StopAfter
from ffc_ray.ray.train import run_training

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


def _events(text: str) -> tuple[list[dict], list[dict]]:
    steps, events = [], []
    for line in text.splitlines():
        if line.strip():
            rec = json.loads(line)
            (events if "event" in rec else steps).append(rec)
    return steps, events


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(
        json.loads((d / "meta.json").read_text())["step"]
        for d in run_dir.glob("checkpoint_*")
        if (d / "meta.json").is_file()
    )


def _cache_roots() -> list[Path]:
    return [storage.cache_root(), Path(storage.DEFAULT_CACHE).expanduser()]


def test_train_with_uri_storage_store_and_pairs_resumes(ray_session, tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    base = load_config(REPO / "configs" / "tiny_test.yaml")
    # the store and the verification set, uploaded to the "bucket"
    opts = ImportOptions(image_size=32, encoding="png", num_shards=2, progress=False)
    import_synthetic(tmp_path / "store", opts, num_identities=60, images_per_identity=4, seed=3)
    close_cached_envs()
    store_uri = bucket.as_uri() + "/stores/faces"
    storage.upload_dir(tmp_path / "store", store_uri)
    vset = synthetic_split(base.data, num_folds=base.eval.folds)[1]
    save_verification_set(vset, tmp_path / "syn.npz")
    pairs_uri = bucket.as_uri() + "/sets/syn.npz"
    storage.upload_file(tmp_path / "syn.npz", pairs_uri)

    runs_uri = bucket.as_uri() + "/runs"
    staging = tmp_path / "staging"
    cfg = base.with_overrides(
        {
            "data.source": store_uri,
            "eval.pairs": [pairs_uri],
            "ray.storage_path": runs_uri,
            "train.output_dir": str(staging),
            "train.steps": 12,
            "train.checkpoint_interval": 6,
            "train.eval_interval": 12,
        }
    )
    remote_run = bucket / "runs" / "uri-run"
    try:
        first = run_training(cfg, name="uri-run", loop_callbacks=[StopAfter(6)])
        assert first.result.error is None and first.summary["final_step"] == 6
        assert first.run_uri == runs_uri + "/uri-run"
        assert first.run_dir == staging / "uri-run"
        # Ray's checkpoint and our uploaded run files are at the URI
        assert _checkpoint_steps(remote_run) == [6]
        assert (remote_run / "config.yaml").is_file()
        steps, events = _events((remote_run / "progress.jsonl").read_text())
        assert [r["step"] for r in steps] == list(range(1, 7))
        assert [e["event"] for e in events if e["event"] == "checkpoint"] == ["checkpoint"]
        assert list((remote_run / "tb").glob("events.out.tfevents.*"))
        # the store was opened from the node cache
        entry = storage.local_cache_dir(store_uri).name
        assert any((root / entry / storage.COMPLETE).is_file() for root in _cache_roots())

        shutil.rmtree(staging)  # as if the second run were started on another node
        second = run_training(cfg, name="uri-run")
        assert second.result.error is None
        assert second.summary["start_step"] == 6 and second.summary["final_step"] == 12
        assert _checkpoint_steps(remote_run) == [6, 12]
        steps, events = _events((remote_run / "progress.jsonl").read_text())
        assert sorted({r["step"] for r in steps}) == list(range(1, 13))  # history kept
        starts = [e for e in events if e["event"] == "start"]
        assert [e["attempt"] for e in starts] == [0, 1] and starts[1]["step"] == 6
        assert any(e["event"] == "restore" and e["from_step"] == 6 for e in events)
        evals = [e for e in events if e["event"] == "eval" and e["step"] == 12]
        assert evals and any(k.endswith("/accuracy") for k in evals[-1])
    finally:
        for u in (store_uri, pairs_uri):  # Ray workers use the default node cache
            for root in _cache_roots():
                shutil.rmtree(root / storage.local_cache_dir(u).name, ignore_errors=True)
