"""One Ray start-up for training, sweeps and the demo: join a cluster or start a local one.

A local Ray starts with its dashboard on a port chosen here (``ray.init(dashboard_port=...)``),
and that address goes into the job's runtime environment as ``RAY_API_SERVER_ADDRESS``, the
variable Ray's State API reads first. Ray Train's placement-group cleaner queries the State API
without an address; with several Ray instances on one machine (tests, other users) it would
otherwise fail with "Found multiple active Ray instances", leak the placement groups of trials
that ASHA stops, and the next trial could wait forever (docs/reference.md 3.3).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from collections.abc import Mapping

import ray

log = logging.getLogger(__name__)

#: glibc malloc settings for the job's Ray worker processes (its runtime environment, so the
#: raylet, the driver and other jobs are untouched; a variable already set in the environment
#: wins). A training step allocates its batch and activations afresh and frees them; glibc's
#: defaults hand such blocks back to the kernel, and every step then pays for fresh zeroed pages.
#: Blocks up to 32 MiB come from the heap and up to 1 GiB of free heap is kept. Measured with
#: benchmarks/ray_overhead.py (synthetic, 32 px, 64 images per step): the Ray Train worker's CPU
#: per step 66.1 ms without these, 45.7 ms with them, against 38.9 / 40.9 ms for the plain loop.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}

DASHBOARD_HOST = "127.0.0.1"


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster this process is connected to."""
    return float(ray.cluster_resources().get("CPU", 0.0))


def dashboard_available() -> bool:
    """Whether ``ray[default]`` (the dashboard and its State API) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("aiohttp", "opencensus"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((DASHBOARD_HOST, 0))
        return int(sock.getsockname()[1])


def start_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    log_to_driver: bool = True,
    need_dashboard: bool = False,
    env_vars: Mapping[str, str] | None = None,
) -> None:
    """Join ``address`` (``auto``, ``host:port``, ``ray://...``) or, without one, start a local
    Ray with ``num_cpus``; nothing when Ray is already up in this process.

    ``need_dashboard``: refuse to start without ``ray[default]`` (sweeps: without the State API
    the placement groups of stopped trials are never removed).
    """
    if ray.is_initialized():
        return
    env = {"RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0")}
    env.update({k: os.environ.get(k, v) for k, v in WORKER_MALLOC_ENV.items()})
    env.update(env_vars or {})
    if address:
        if address != "auto" and "://" not in address:
            env["RAY_ADDRESS"] = address  # Train's cleaner finds this cluster, not another one
        ray.init(
            address=address,
            configure_logging=False,
            log_to_driver=log_to_driver,
            runtime_env={"env_vars": env},
        )
        return
    dashboard = dashboard_available()
    if need_dashboard and not dashboard:
        raise RuntimeError(
            "ffc-ray sweep needs ray[default] (the dashboard / State API): without it the "
            "placement groups of trials that ASHA stops are never removed and the next trial "
            "waits forever. Install it with: pip install 'ray[default]==2.60.0'"
        )
    port = _free_port() if dashboard else None
    if port is not None:
        env["RAY_API_SERVER_ADDRESS"] = f"http://{DASHBOARD_HOST}:{port}"
    ctx = ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host=DASHBOARD_HOST,
        dashboard_port=port or 8265,
        configure_logging=False,
        log_to_driver=log_to_driver,
        runtime_env={"env_vars": env},
    )
    if port is not None and not str(ctx.dashboard_url).endswith(f":{port}"):
        log.warning(
            "Ray's dashboard started at %s, not on port %d: Train's placement-group cleanup "
            "may fail if other Ray instances run on this machine",
            ctx.dashboard_url,
            port,
        )
