"""Run logging on rank 0: TensorBoard events, a JSON-lines progress file and the console line.

Ray Train V2 alone writes no TensorBoard files (docs/reference.md 3.2), so rank 0 owns one
``SummaryWriter`` in ``<storage>/<name>/tb``. On a resume the writer purges events at or after the
restored step (``purge_step``), so the curves show the continued run, not the lost tail.
``progress.jsonl`` in the run folder holds one record per step (and one per (re)start), the
machine-readable history that tests and benchmarks read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def process_memory_mb() -> float:
    """Resident set size of this process in MiB (``/proc``; peak RSS where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """TensorBoard + progress file + console, on rank 0 only (``enabled=False`` elsewhere)."""

    def __init__(
        self,
        run_dir: str | Path,
        start_step: int = 0,
        enabled: bool = True,
        log_interval: int = 20,
        attempt: int = 0,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.log_interval = max(1, int(log_interval))
        self.attempt = attempt
        self._writer = None
        self._progress = None
        self._t_last = time.perf_counter()
        self._step_last = start_step
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(
            log_dir=str(self.run_dir / "tb"),
            purge_step=start_step if start_step > 0 else None,
            flush_secs=10,
        )
        self._progress = open(self.run_dir / "progress.jsonl", "a", buffering=1)  # noqa: SIM115

    # ---- records ---------------------------------------------------------------------------
    def event(self, kind: str, **fields: Any) -> None:
        """A non-step record (start, restore, eval, end) in the progress file."""
        if self._progress is not None:
            rec = {"event": kind, "attempt": self.attempt, "time": time.time(), **fields}
            self._progress.write(json.dumps({k: _jsonable(v) for k, v in rec.items()}) + "\n")

    def step(
        self, step: int, metrics: Mapping[str, float], record_only: Mapping[str, Any] | None = None
    ) -> None:
        """One training step (``step`` = steps completed): progress record, TB, console.
        ``record_only`` fields go to the progress record alone (e.g. cumulative CPU time)."""
        if not self.enabled:
            return
        rec = {
            "step": step,
            "attempt": self.attempt,
            "time": time.time(),
            **{k: _jsonable(v) for k, v in metrics.items()},
            **dict(record_only or {}),
        }
        assert self._progress is not None and self._writer is not None
        self._progress.write(json.dumps(rec) + "\n")
        if step % self.log_interval == 0 or step == 1:
            for key, value in metrics.items():
                if value is not None and math.isfinite(float(value)):
                    self._writer.add_scalar(f"train/{key}", float(value), step)
            now = time.perf_counter()
            dt = max(now - self._t_last, 1e-9)
            speed = (step - self._step_last) / dt
            self._t_last, self._step_last = now, step
            log.info(
                "step %d  loss %.4f (pos %.4f neg %.4f)  lr %.4g  %.1f img/s  %.2f step/s"
                "  pool %d  actor wait %.2f ms",
                step,
                metrics.get("loss", float("nan")),
                metrics.get("loss_pos", float("nan")),
                metrics.get("loss_neg", float("nan")),
                metrics.get("lr", float("nan")),
                metrics.get("images_per_s", float("nan")),
                speed,
                int(metrics.get("occupancy", 0) or 0),
                metrics.get("actor_wait_ms", 0.0) or 0.0,
            )

    def scalars(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def image(self, step: int, tag: str, image_hwc: np.ndarray) -> None:
        """A uint8 [H, W, 3] (or [H, W, 4]) image, e.g. a ROC curve."""
        if self._writer is None:
            return
        img = np.asarray(image_hwc)
        if img.ndim == 3 and img.shape[-1] == 4:
            img = img[..., :3]
        self._writer.add_image(tag, img, step, dataformats="HWC")

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The hparams summary (TensorBoard's HPARAMS tab), written once at the end."""
        if self._writer is None:
            return
        hp = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()
        }
        mt = {
            f"hparam/{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))
        }
        self._writer.add_hparams(hp, mt, run_name="hparams")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None


def flat_hparams(cfg_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"head.type": "ffc", ...} with scalars only (lists as strings)."""
    out: dict[str, Any] = {}
    for key, value in cfg_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, name + "."))
        elif value is None:
            out[name] = "none"
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = value
    return out


def read_progress(run_dir: str | Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """(last record per step, the non-step events in order) from ``progress.jsonl``."""
    steps: dict[int, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    path = Path(run_dir) / "progress.jsonl"
    if not path.is_file():
        return steps, events
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a killed process
            continue
        if "event" in rec:
            events.append(rec)
        else:
            steps[int(rec["step"])] = rec
    return steps, events
