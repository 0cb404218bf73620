"""The code that runs inside a Tune trial: the trial driver and the report callback."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from ffc_ray import storage
from ffc_ray.config import Config
from ffc_ray.ray.run_dir import storage_root
from ffc_ray.ray.sweep.results import (
    TRAIN_DIR,
    _ProgressTail,
    tune_metrics,
)
from ffc_ray.ray.sweep.spec import (
    SweepSpec,
)

log = logging.getLogger(__name__)


class SweepReportCallback(UserCallback):
    """Train V2 controller callback: rename the trainer's metrics and forward them to Tune.

    Wraps :class:`ray.tune.integration.ray_train.TuneReportCallback` (constructed here, in the
    trial driver, where the Tune session exists); reports without an evaluation are not
    forwarded, so every Tune result carries the objectives (one Tune iteration per evaluation).
    """

    def __init__(
        self, static: Mapping[str, float] | None = None, progress_file: str | None = None
    ) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        self._inner = TuneReportCallback()
        self._static = dict(static or {})
        self._tail = _ProgressTail(progress_file) if progress_file else None

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        speed = self._tail.speed(metrics[0].get("step")) if self._tail is not None else {}
        mapped = tune_metrics(metrics[0], self._static, speed)
        if mapped is None:
            return
        self._inner.after_report(run_context, [mapped], checkpoint)


# ------------------------------------------------------------------------------------------
# one trial


def trial_config(
    spec: SweepSpec,
    values: Mapping[str, Any],
    exp_dir: str | Path,
    trial_id: str,
    staging: str | Path | None = None,
) -> Config:
    """The training config of a trial: its Train run lives in ``<exp>/train/train-<trial>``.

    ``exp_dir`` may be a URI (remote sweep storage): the trial's ``ray.storage_path`` is then
    ``<exp URI>/train`` and its files are staged in ``<staging>/train`` (the sweep's local
    staging folder) before they are uploaded."""
    cfg = spec.trial_config(values)
    over: dict[str, Any] = {
        "train.name": train_run_name(trial_id),
        "ray.storage_path": storage.join(exp_dir, TRAIN_DIR)
        if storage.is_uri(exp_dir)
        else str(Path(exp_dir) / TRAIN_DIR),
        "ray.address": None,
    }
    if storage.is_uri(exp_dir) and staging is not None:
        over["train.output_dir"] = str(Path(staging) / TRAIN_DIR)
    return cfg.with_overrides(over)


def train_run_name(trial_id: str) -> str:
    """Deterministic per trial, so a re-launched trial resumes its own Train run."""
    return f"train-{trial_id}"


def head_memory_mb(cfg: Config, num_classes: int) -> float:
    """Bytes held by the classifier head (pool, or FC weight + momentum), in MiB."""
    import torch

    from ffc_ray.heads import build_head

    with torch.random.fork_rng(devices=[]):
        head = build_head(cfg, int(num_classes))
    return float(head.memory_bytes()) / 2**20


def fit_training(cfg: Config, name: str, callbacks: Sequence[Any]) -> Any:
    """Run one training through :func:`ffc_ray.ray.train.run_training` with extra Train
    callbacks (``ray.train.UserCallback``, run on the trial's Train controller)."""
    from ffc_ray.ray import train as rt

    return rt.run_training(cfg, name=name, callbacks=list(callbacks))


def trial_driver(
    config: dict[str, Any], spec: SweepSpec, exp_dir: str, staging: str | None = None
) -> None:
    """The Tune function trainable: one Train run for the sampled ``config``."""
    import ray.tune

    from ffc_ray.data.source import num_training_classes

    trial_id = ray.tune.get_context().get_trial_id()
    values = {p.key: config[p.key] for p in spec.params}
    cfg = trial_config(spec, values, exp_dir, trial_id, staging)
    name = train_run_name(trial_id)
    static = {
        "head_memory_mb": head_memory_mb(cfg, num_training_classes(cfg)),
        "started_at": time.time(),
    }
    progress = str(storage_root(cfg) / name / "progress.jsonl")
    log.info("trial %s: %s", trial_id, ", ".join(f"{k}={v}" for k, v in values.items()))
    fit_training(cfg, name, [SweepReportCallback(static, progress)])
