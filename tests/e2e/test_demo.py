"""`ffc-ray demo`: synthetic identities -> LMDB store + pairs -> a sweep on them -> summary.

The shipped demo (5 trials, 150 steps) is timed by hand (see the sweep owner's report); here a
2-trial, 8-step sweep file drives the same code on the shared local Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from ffc_ray.config import Config

REPO = Path(__file__).resolve().parents[2]

SMALL = {
    "data.num_identities": 64,
    "data.images_per_identity": 4,
    "data.holdout_identities": 24,
    "data.num_pairs": 120,
    "data.image_size": 32,
    "data.instance_batch": 8,
    "data.identity_batch": 4,
    "model.backbone": "tiny",
    "model.embedding_dim": 32,
    "pool.fraction": 0.5,
    "eval.folds": 5,
}


def test_demo_data_is_a_store_and_pairs_made_once(tmp_path):
    from ffc_ray.data.pairs import load_pairs
    from ffc_ray.data.store import open_store
    from ffc_ray.data.synthetic import make_identities
    from ffc_ray.ray.sweep.demo import demo_data

    cfg = Config().with_overrides(SMALL)
    store, pairs = demo_data(cfg, tmp_path)
    s = open_store(store)
    assert (s.num_identities, s.num_images, s.image_size) == (64, 256, 32)
    # the store holds exactly the generator's images (lossless PNG) under their labels
    faces = make_identities(64, 4, 32, 0)
    rows = [0, 77, 255]
    for img, lab in zip(s.images(rows), s.labels[rows]):
        assert any(np.array_equal(img, f) for f in faces.images[faces.labels == lab])
    v = load_pairs(pairs, image_size=32)
    assert len(v.issame) == 120 and v.issame.sum() == 60 and set(v.folds.tolist()) == set(range(5))
    stamps = (os.stat(store / "meta.json").st_mtime_ns, os.stat(pairs).st_mtime_ns)
    assert demo_data(cfg, tmp_path) == (store, pairs)  # reused, not rewritten
    assert (os.stat(store / "meta.json").st_mtime_ns, os.stat(pairs).st_mtime_ns) == stamps


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_runs_a_sweep_on_the_store_and_prints_the_summary(ray_session, tmp_path, capsys):
    import csv

    from ffc_ray.cli import main
    from ffc_ray.config import load_config

    sweep = tmp_path / "tiny_demo.yaml"
    overrides = {
        **SMALL,
        "train.steps": 8,
        "train.eval_interval": 4,
        "train.checkpoint_interval": 4,
        "optim.warmup_steps": 2,
        "ray.num_workers": 1,
        "ray.cpus_per_worker": 0.5,
        "ray.max_failures": 0,
    }
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "tinydemo",
                "base": str(REPO / "configs" / "synthetic_ffc.yaml"),
                "overrides": overrides,
                "search": {"head.margin": {"uniform": [0.2, 0.5]}},
                "tune": {"num_samples": 2, "max_concurrent": 1, "asha": None},
            }
        )
    )
    work = tmp_path / "work"
    rc = main(["demo", "--workdir", str(work), "--sweep", str(sweep), "--name", "tinydemo"])
    out = capsys.readouterr().out
    assert rc == 0, out
    exp = work / "sweeps" / "tinydemo"
    with open(exp / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert float(rows[0]["head.margin"]) == 0.5  # the paper's m first
    best = load_config(exp / "best_config.yaml")
    assert Path(best.data.source).parent == work / "data"  # trained on the LMDB store
    assert best.eval.pairs[0].endswith(".npz")
    assert "| trial | status | head.margin |" in out
    assert f"best config: {exp / 'best_config.yaml'}" in out
    assert f"tensorboard --logdir {exp / 'tb'}" in out
