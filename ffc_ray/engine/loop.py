"""The training loop, its callbacks, and the single-process run (tests, demo).

:func:`train_loop` drives a :class:`~ffc_ray.engine.trainer.Trainer` over step batches
(:class:`~ffc_ray.data.batch.StepBatch`) and calls its :class:`Callback` s around each step.
It is the one loop: :func:`run_single_process` (synthetic data in memory, verification
before and after) and the Ray Train worker (:mod:`ffc_ray.ray.worker`: pool-actor prefetch,
logging, evaluation, reports and checkpoints) differ only in the callbacks they pass.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ffc_ray.config import Config, ConfigError
from ffc_ray.data.batch import StepBatch
from ffc_ray.data.source import SyntheticSource
from ffc_ray.data.types import FaceArrays, VerificationSet
from ffc_ray.engine.trainer import Trainer, resolve_device
from ffc_ray.preflight import check_run

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What the callbacks of one :func:`train_loop` share: the step just done (``step``), the
    last step (``steps``) and ``stop``, which a callback sets to end the loop after this step."""

    steps: int
    step: int = 0
    stop: bool = False

    @property
    def final(self) -> bool:
        return self.step >= self.steps


class Callback:
    """A hook of :func:`train_loop`; override what you need.

    ``before_step`` sees the batch before the step (the Ray worker starts the pool actor's
    plan there, so the round trip overlaps the step); ``after_step`` sees the step's metrics.
    Callbacks run in list order, so one that sets ``loop.stop`` goes before those that react
    to it (the Ray worker checkpoints when ``loop.stop`` is set).
    """

    def before_step(self, trainer: Trainer, batch: StepBatch) -> None:  # noqa: B027 - optional
        pass

    def after_step(self, trainer: Trainer, metrics: dict[str, Any], loop: LoopState) -> None:  # noqa: B027
        pass


def train_loop(
    trainer: Trainer, batches: Iterable[StepBatch], steps: int, callbacks: Sequence[Callback] = ()
) -> LoopState:
    """Train from ``trainer.step`` up to step ``steps`` (or until a callback stops the loop).

    The one training loop: the single-process run and every Ray Train worker drive their
    :class:`~ffc_ray.engine.trainer.Trainer` through it with their own callbacks.
    """
    loop = LoopState(steps, trainer.step)
    it: Iterator[StepBatch] = iter(batches)
    while not (loop.final or loop.stop):
        try:
            batch = next(it)
        except StopIteration:
            raise RuntimeError(
                f"train_loop: the batch iterator ran out at step {trainer.step} of {steps}"
            ) from None
        for cb in callbacks:
            cb.before_step(trainer, batch)
        metrics = trainer.train_step(*batch)
        loop.step = trainer.step
        for cb in callbacks:
            cb.after_step(trainer, metrics, loop)
    return loop


class StopAfter(Callback):
    """Stop the loop after step ``step`` (the Ray worker then saves a checkpoint, as at the
    end, and the same run name resumes from it)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def after_step(self, trainer: Trainer, metrics: dict[str, Any], loop: LoopState) -> None:
        if loop.step >= self.step and not loop.final:
            log.info("stopping after step %d (StopAfter)", loop.step)
            loop.stop = True


class FiniteLoss(Callback):
    """Raise naming the step when the loss is not finite."""

    def after_step(self, trainer: Trainer, metrics: dict[str, Any], loop: LoopState) -> None:
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"train_loop: non-finite loss {metrics['loss']} at step {loop.step}"
            )


def _mean_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for m in window for k in m}
    return {k: float(np.mean([m[k] for m in window if k in m])) for k in sorted(keys)}


class History(Callback):
    """The single-process run's record: window averages every ``log_interval`` steps (given
    to ``log_fn``, default ``logging``), evaluations every ``eval_interval`` steps and at the
    end (``eval_fn(step)``), and throughput over every step but the first (which pays
    one-time costs: imports, allocator warm-up)."""

    def __init__(
        self,
        cfg: Config,
        eval_fn: Callable[[int], dict[str, Any]] | None = None,
        log_fn: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.cfg, self.eval_fn, self.log_fn = cfg, eval_fn, log_fn
        self.history: list[dict[str, float]] = []
        self.evals: list[tuple[int, dict[str, Any]]] = []
        self.window: list[dict[str, float]] = []
        self.times: list[float] = []
        self.images = 0
        self.first = True

    def before_step(self, trainer: Trainer, batch: StepBatch) -> None:
        self.batch_images = len(batch.x) + len(batch.y)

    def after_step(self, trainer: Trainer, metrics: dict[str, Any], loop: LoopState) -> None:
        t = self.cfg.train
        self.window.append(metrics)
        if not self.first:
            self.times.append(metrics["step_time"])
            self.images += self.batch_images
        self.first = False
        end = loop.final or loop.stop
        if loop.step % t.log_interval == 0 or end:
            avg = {"step": float(loop.step), **_mean_metrics(self.window)}
            self.history.append(avg)
            self.window = []
            if self.log_fn is not None:
                self.log_fn(loop.step, avg)
            else:
                log.info(
                    "step %d loss %.4f lr %.4g %.0f img/s",
                    loop.step,
                    avg["loss"],
                    avg["lr"],
                    avg["images_per_s"],
                )
        if self.eval_fn is not None and (loop.step % t.eval_interval == 0 or end):
            self.evals.append((loop.step, self.eval_fn(loop.step)))

    def summary(self) -> dict[str, Any]:
        """``history`` (window averages), ``evals`` ([(step, metrics)]), ``final`` (the last
        window), ``mean_step_time`` and ``images_per_s``."""
        total_t = float(np.sum(self.times)) if self.times else 0.0
        return {
            "history": self.history,
            "evals": self.evals,
            "final": self.history[-1] if self.history else {},
            "mean_step_time": total_t / len(self.times) if self.times else float("nan"),
            "images_per_s": self.images / total_t if total_t > 0 else float("nan"),
        }


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
    record = History(cfg, eval_fn, log_fn)
    batches = SyntheticSource(cfg, train, [0], 1).iter_batches(0, cfg.train.steps)
    train_loop(trainer, batches, cfg.train.steps, [FiniteLoss(), record])
    summary = record.summary()
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
