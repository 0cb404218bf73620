"""Shared fixtures: one local Ray per test session (started lazily), LFW location, small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LFW_DIR = Path(os.environ.get("FFC_LFW_DIR", REPO.parent / "shared" / "data" / "lfw"))

# Keep CPU tests deterministic and light on a 2-core machine.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole session (2 CPUs), shut it down at the end.

    Goes through ``start_ray`` so the dashboard address is pinned into the job's runtime env:
    Ray Train's placement-group cleaner otherwise fails when other Ray instances run on the
    machine, and leaked placement groups stall later tests.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from ffc_ray.ray.start import start_ray

        start_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def lfw_dir() -> Path:
    if not (LFW_DIR / "images").is_dir():
        pytest.skip(f"LFW not found at {LFW_DIR}")
    return LFW_DIR
