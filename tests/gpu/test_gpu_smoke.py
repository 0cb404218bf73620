"""CUDA smoke tests (marker ``gpu``): a few training steps on one GPU, and on two through Ray
Train and NCCL with a sharded head where two GPUs are present. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffc_ray.config import Config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _smoke_cfg(**over) -> Config:
    d = {
        "data.image_size": 112,
        "data.num_identities": 200,
        "data.images_per_identity": 4,
        "data.holdout_identities": 20,
        "data.instance_batch": 32,
        "data.identity_batch": 16,
        "model.backbone": "mobilefacenet",
        "train.device": "cuda",
        "train.amp": "bf16",
        "train.steps": 40,
        "train.eval_interval": 40,
        "optim.schedule": "constant",
        "optim.lr": 0.05,
    }
    d.update(over)
    return Config().with_overrides(d)


@pytest.mark.parametrize("head", ["ffc", "fc"])
def test_single_gpu_steps_are_finite_and_the_loss_falls(head):
    from ffc_ray.engine.loop import run_single_process

    res = run_single_process(_smoke_cfg(**{"head.type": head}))
    losses = [h["loss"] for h in res["train"]["history"]]
    assert res["device"].startswith("cuda") and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_nccl_sharded_partial_fc(tmp_path):
    from ffc_ray.ray.train import run_training

    cfg = _smoke_cfg(
        **{
            "head.type": "partial_fc",
            "head.parallel": "sharded",
            "head.margin_type": "cosface",
            "head.margin": 0.35,
            "ray.num_workers": 2,
            "ray.use_gpu": True,
            "ray.cpus_per_worker": 1.0,
            "train.output_dir": str(tmp_path),
        }
    )
    run = run_training(cfg, name="gpu-smoke")
    assert run.result.error is None and run.summary["final_step"] == 40
