"""The single-process training loop (tests, demo) over in-memory dual-loader batches.

:func:`train_loop` drives any :class:`~ffc_ray.engine.trainer.Trainer` over an iterator of
``(x, lx, y, ly)`` batches; :func:`run_single_process` builds everything from a config
(synthetic data, dual sampler, trainer), trains ``train.steps`` steps and evaluates on the
held-out verification pairs before and after. The Ray worker has its own loop (checkpoints,
reporting) around the same ``Trainer``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ffc_ray.config import Config, ConfigError
from ffc_ray.data.types import FaceArrays, VerificationSet
from ffc_ray.engine.trainer import Trainer, resolve_device
from ffc_ray.preflight import check_run

log = logging.getLogger(__name__)

Batch = tuple[Any, Any, Any, Any]  # (x, lx, y, ly): uint8 arrays or float tensors + labels


def _mean_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for m in window for k in m}
    return {k: float(np.mean([m[k] for m in window if k in m])) for k in sorted(keys)}


def train_loop(
    cfg: Config,
    trainer: Trainer,
    batches_iter: Iterable[Batch],
    steps: int,
    eval_fn: Callable[[int], dict[str, Any]] | None = None,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run ``steps`` train steps; average metrics over ``train.log_interval`` windows.

    ``eval_fn(step)`` runs every ``train.eval_interval`` steps and after the last one;
    ``log_fn(step, metrics)`` receives each window's averages (default: ``logging``).
    A non-finite loss stops the run with an error naming the step.
    Returns ``history`` (window averages), ``evals`` ([(step, metrics)]), ``final`` (the last
    window), ``mean_step_time`` and ``images_per_s`` (over all but the first step).
    """
    it: Iterator[Batch] = iter(batches_iter)
    history: list[dict[str, float]] = []
    evals: list[tuple[int, dict[str, Any]]] = []
    window: list[dict[str, float]] = []
    times: list[float] = []
    images = 0
    for i in range(steps):
        try:
            x, lx, y, ly = next(it)
        except StopIteration:
            raise RuntimeError(f"train_loop: the batch iterator ran out after {i} steps") from None
        m = trainer.train_step(x, lx, y, ly)
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(
                f"train_loop: non-finite loss {m['loss']} at step {trainer.step}"
            )
        window.append(m)
        if i > 0:  # the first step pays one-time costs (imports, allocator warm-up)
            times.append(m["step_time"])
            images += len(x) + len(y)
        last = i == steps - 1
        if trainer.step % cfg.train.log_interval == 0 or last:
            avg = {"step": float(trainer.step), **_mean_metrics(window)}
            history.append(avg)
            window = []
            if log_fn is not None:
                log_fn(trainer.step, avg)
            else:
                log.info(
                    "step %d loss %.4f lr %.4g %.0f img/s",
                    trainer.step,
                    avg["loss"],
                    avg["lr"],
                    avg["images_per_s"],
                )
        if eval_fn is not None and (trainer.step % cfg.train.eval_interval == 0 or last):
            evals.append((trainer.step, eval_fn(trainer.step)))
    total_t = float(np.sum(times)) if times else 0.0
    return {
        "history": history,
        "evals": evals,
        "final": history[-1] if history else {},
        "mean_step_time": total_t / len(times) if times else float("nan"),
        "images_per_s": images / total_t if total_t > 0 else float("nan"),
    }


def dual_batches(
    cfg: Config, arrays: FaceArrays, device: torch.device | str = "cpu", start_step: int = 0
) -> Iterator[Batch]:
    """Endless dual-loader batches ``(x, lx, y, ly)`` (tensors on ``device``) over epochs.

    :class:`~ffc_ray.data.sampling.DualSampler` plans each epoch (x = I + III, y = II + IV);
    :func:`~ffc_ray.data.sampling.iter_batches` normalises the images and applies the random
    horizontal flip (the official only augmentation) when ``data.flip`` is on.
    """
    from ffc_ray.data.sampling import DualSampler, iter_batches

    d = cfg.data
    sampler = DualSampler(arrays.labels, d.instance_batch, d.identity_batch, seed=d.seed)
    per_epoch = sampler.steps_per_epoch()
    if per_epoch < 1:
        raise ConfigError(
            "config field 'data.instance_batch': the training set gives no full "
            "step per epoch; lower data.instance_batch / data.identity_batch"
        )
    epoch, pos = divmod(int(start_step), per_epoch)
    while True:
        plan = sampler.epoch_plan(epoch)
        yield from iter_batches(arrays, plan, d.flip, d.seed, device, start_step=pos)
        epoch, pos = epoch + 1, 0


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The float / int entries of an evaluation result (drops ROC and histogram arrays)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
    }


def evaluate_trainer(cfg: Config, trainer: Trainer, vset: VerificationSet) -> dict[str, float]:
    """Verification metrics of the P-Net on ``vset`` (scalars only)."""
    from ffc_ray.eval.verification import evaluate

    res = evaluate(
        trainer.embed,
        vset,
        flip=cfg.eval.flip,
        batch_size=cfg.eval.batch_size,
        far_targets=tuple(cfg.eval.far_targets),
    )
    return scalar_metrics(res)


def run_single_process(
    cfg: Config,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
    data: tuple[FaceArrays, VerificationSet] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` in this process on the synthetic set; verification before and after.

    ``data`` may pass a pre-built ``(train, verification)`` pair (tests reuse one set for two
    heads). Returns ``before`` / ``after`` verification scalars, the loop's summary (``train``),
    ``num_classes``, ``capacity`` (ffc), ``device`` and wall times.
    """
    t0 = time.perf_counter()
    if data is None:
        if cfg.data.source != "synthetic":
            raise ConfigError(
                f"config field 'data.source': run_single_process reads the "
                f"synthetic set only, got {cfg.data.source!r}"
            )
        from ffc_ray.data.synthetic import synthetic_split

        data = synthetic_split(cfg.data)
    train, vset = data
    check_run(cfg, train.num_classes)
    t_data = time.perf_counter() - t0
    device = resolve_device(cfg.train.device)
    trainer = Trainer(cfg, train.num_classes, device)
    before = evaluate_trainer(cfg, trainer, vset) if len(vset) else {}
    t1 = time.perf_counter()
    eval_fn = (lambda step: evaluate_trainer(cfg, trainer, vset)) if len(vset) else None
    summary = train_loop(
        cfg,
        trainer,
        dual_batches(cfg, train, device),
        cfg.train.steps,
        eval_fn=eval_fn,
        log_fn=log_fn,
    )
    t_train = time.perf_counter() - t1
    after = summary["evals"][-1][1] if summary["evals"] else {}
    return {
        "before": before,
        "after": after,
        "train": summary,
        "num_classes": train.num_classes,
        "capacity": getattr(trainer.head, "capacity", None),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "data_time_s": t_data,
        "train_time_s": t_train,
        "total_time_s": time.perf_counter() - t0,
    }
