"""Sweep results without Ray: metric names, table rows, tables, configs, TensorBoard runs.

Pure Python + torch's TensorBoard writer, so the unit tests cover it without a Ray session;
:mod:`ffc_ray.ray.sweep` drives it from Tune callbacks.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ffc_ray.config import Config
from ffc_ray.ray.sweep.spec import (
    REPORTED_METRICS,
    VERIFICATION_METRICS,
    SweepSpec,
    objectives_of,
)
from ffc_ray.storage import atomic_write_text

log = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
BEST_CONFIG = "best_config.yaml"
PARETO_CSV = "pareto.csv"
PARETO_MD = "pareto.md"
PARETO_CONFIGS = "pareto_configs"
SPEC_FILE = "sweep.yaml"
TB_DIR = "tb"
TRAIN_DIR = "train"
OPTUNA_FILE = "optuna.db"

STATUS_COMPLETED = "completed"
STATUS_STOPPED = "stopped early (ASHA)"
STATUS_ERROR = "error"

#: Table columns after the searched parameters (``tar@far=0.001`` etc. as configured).
TABLE_METRICS = (
    "accuracy",
    "auc",
    "tar@far=0.001",
    "tar@far=0.0001",
    "head_memory_mb",
    "images_per_s",
    "step_time_ms",
    "loss",
)


# ------------------------------------------------------------------------------------------
# metrics: trainer report -> sweep names


def tune_metrics(
    reported: Mapping[str, Any],
    static: Mapping[str, float] | None = None,
    speed: Mapping[str, float] | None = None,
) -> dict[str, Any] | None:
    """The Tune result for one trainer report, or None when the report holds no evaluation.

    Every name of :data:`REPORTED_METRICS` is filled: a verification metric from the report's
    own key or from the first evaluated set (``<set>/<metric>``, the set the trainer's ``score``
    ranks by); ``head_memory_mb`` and the speed metrics from the report, else from ``static``
    (head memory computed by the driver) and ``speed`` (means over the steps since the previous
    report). Missing values are NaN, never dropped silently; the sweep's objectives are checked
    present before the sweep starts (:func:`ffc_ray.ray.sweep.spec.check_reported`).
    """
    out = dict(reported)
    sets = [k[: -len("/accuracy")] for k in reported if k.endswith("/accuracy")]
    first = sets[0] if sets else None
    if "accuracy" not in reported and first is None:
        return None
    for name in REPORTED_METRICS:
        if name in reported and reported[name] is not None:
            value = reported[name]
        elif name in VERIFICATION_METRICS and first is not None:
            value = reported.get(f"{first}/{name}")
        elif static and name in static:
            value = static[name]
        elif speed and name in speed:
            value = speed[name]
        else:
            value = None
        out[name] = float(value) if isinstance(value, (int, float)) else float("nan")
    for key, value in (static or {}).items():  # extra driver facts (e.g. started_at)
        out.setdefault(key, value)
    if first is not None:
        out.setdefault("eval_set", first)
    return out


class _ProgressTail:
    """Incremental reader of a run's ``progress.jsonl`` (one record per step, rank 0).

    ``speed(step)`` is the mean ``images_per_s`` and ``step_time`` of the steps after the
    previous call's step up to ``step``: reports can reach the controller late and several at
    once, so records are matched by step number, not by arrival.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.records: dict[int, tuple[float | None, float | None]] = {}
        self.last_step = 0
        self.last: dict[str, float] = {}

    def _read_new(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in chunk[: end + 1].splitlines():
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if "event" in rec or not isinstance(rec.get("step"), int):
                continue
            ips, dt = rec.get("images_per_s"), rec.get("step_time")
            self.records[rec["step"]] = (
                float(ips) if isinstance(ips, (int, float)) else None,
                float(dt) if isinstance(dt, (int, float)) else None,
            )

    def speed(self, step: Any) -> dict[str, float]:
        self._read_new()
        if not isinstance(step, (int, float)):
            return dict(self.last)
        step = int(step)
        window = [v for s, v in self.records.items() if self.last_step < s <= step]
        ips = [a for a, _ in window if a is not None]
        dt = [b for _, b in window if b is not None]
        out = {}
        if ips:
            out["images_per_s"] = sum(ips) / len(ips)
        if dt:
            out["step_time_ms"] = 1e3 * sum(dt) / len(dt)
        if out:
            self.last = out
            self.last_step = step
            self.records = {s: v for s, v in self.records.items() if s > step}
        return dict(self.last)


# ------------------------------------------------------------------------------------------
# table rows, best config, Pareto front


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def trial_row(
    spec: SweepSpec,
    trial_id: str,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    *,
    errored: bool = False,
    state: str | None = None,
) -> dict[str, Any]:
    """One results-table row: parameters, last reported metrics, status.

    Status: ``error``; ``completed`` when the run reported its last step (``train.steps``);
    ``stopped early (ASHA)`` for a finished trial that did not; otherwise the Tune state
    (``running``, ``pending``) while the sweep runs.
    """
    metrics = dict(metrics or {})
    row: dict[str, Any] = {"trial": trial_id, "status": None}
    for p in spec.params:
        row[p.key] = config.get(p.key)
    if all(p.key in config for p in spec.params):
        steps = spec.trial_config({p.key: config[p.key] for p in spec.params}).train.steps
    else:
        steps = spec.base.train.steps
    step = metrics.get("step")
    if errored:
        status = STATUS_ERROR
    elif _finite(step) and steps is not None and int(step) >= steps:
        status = STATUS_COMPLETED
    elif state in (None, "TERMINATED"):
        status = STATUS_STOPPED if _finite(step) else "no result"
    else:
        status = state.lower()
    row["status"] = status
    objectives = [o.metric for o in objectives_of(spec) if o.metric not in TABLE_METRICS]
    for name in (*TABLE_METRICS, *objectives):  # an objective outside the table's set too
        row[name] = metrics.get(name)
    row["step"] = int(step) if _finite(step) else None
    row["evals"] = metrics.get("training_iteration")
    t = metrics.get("time_total_s")
    row["time_s"] = round(float(t), 1) if _finite(t) else None
    return row


def start_order(metrics: Mapping[str, Any] | None) -> float:
    """Sort key: when the trial's driver started (``started_at``); trials without one last."""
    v = (metrics or {}).get("started_at")
    return float(v) if _finite(v) else math.inf


def ready_config(spec: SweepSpec, row: Mapping[str, Any]) -> Config:
    """The trial's training config as a standalone run: named ``<sweep>-<trial>``, stored under
    the base config's ``train.output_dir`` (not in the sweep's folder)."""
    cfg = spec.trial_config({p.key: row[p.key] for p in spec.params})
    return cfg.with_overrides({"train.name": f"{spec.name}-{row['trial']}"})


def write_config(cfg: Config, path: Path, header: str) -> None:
    text = "".join(f"# {line}\n" for line in header.splitlines())
    atomic_write_text(path, text + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def write_table(
    rows: Sequence[Mapping[str, Any]], csv_path: Path, md_path: Path, title: str
) -> None:
    """CSV (every column, full precision) and Markdown (same columns, 4 significant digits)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write_text(csv_path, buf.getvalue())
    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in rows]
    atomic_write_text(md_path, "\n".join(lines) + "\n")


def markdown_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# TensorBoard: one run per trial under <exp>/tb, hparams sessions for the HPARAMS dashboard


class SweepTensorBoard:
    """Writes ``<exp>/tb/<trial>``: the trial's evaluation curves and its hparams session.

    Tune's TBXLogger also writes events into each trial folder, but mixed with Tune's internal
    numbers and next to the Train runs' own logs; this folder holds exactly the sweep: every
    trial a run, the searched parameters (+ status) as hparams, the table metrics as metrics.
    The experiment summary (hparam domains, metric list) is written once at ``tb/`` itself.
    """

    METRIC_TAG = "sweep/{}"
    HPARAM_TAG = "hparam/{}"

    def __init__(self, spec: SweepSpec, tb_dir: Path) -> None:
        self.spec = spec
        self.dir = Path(tb_dir)
        self._writers: dict[str, Any] = {}
        self._ended: set[str] = set()

    def _metric_names(self) -> list[str]:
        names = [o.metric for o in objectives_of(self.spec)]
        return names + [m for m in TABLE_METRICS if m not in names and m in REPORTED_METRICS]

    def _hparams_summaries(
        self, values: Mapping[str, Any], metrics: Mapping[str, float], status: str
    ):
        from torch.utils.tensorboard.summary import hparams

        hp = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()
        }
        hp["status"] = status
        discrete = {
            p.key: [c if isinstance(c, (int, float, str, bool)) else str(c) for c in p.choices]
            for p in self.spec.params
            if p.kind == "choice"
        }
        discrete["status"] = [STATUS_COMPLETED, STATUS_STOPPED, STATUS_ERROR]
        mt = {
            self.HPARAM_TAG.format(k): float(metrics.get(k, float("nan")))
            for k in self._metric_names()
        }
        return hparams(hp, mt, hparam_domain_discrete=discrete)

    def write_experiment(self) -> None:
        """The experiment summary at the root: which hparams and metrics the dashboard shows."""
        from torch.utils.tensorboard import SummaryWriter

        values = {p.key: (p.choices[0] if p.kind == "choice" else p.low) for p in self.spec.params}
        exp, _, _ = self._hparams_summaries(values, {}, STATUS_COMPLETED)
        w = SummaryWriter(log_dir=str(self.dir))
        w.file_writer.add_summary(exp)
        w.close()

    def _writer(self, trial_id: str) -> Any:
        if trial_id not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[trial_id] = SummaryWriter(log_dir=str(self.dir / trial_id), flush_secs=5)
        return self._writers[trial_id]

    def result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        step = result.get("step")
        step = int(step) if _finite(step) else int(result.get("training_iteration") or 0)
        w = self._writer(trial_id)
        for name in self._metric_names():
            v = result.get(name)
            if _finite(v):
                w.add_scalar(self.METRIC_TAG.format(name), float(v), step)
        w.flush()

    def end(self, trial_id: str, row: Mapping[str, Any]) -> None:
        """The trial's hparams session (start + end info) and its final metric values."""
        if trial_id in self._ended:
            return
        values = {p.key: row.get(p.key) for p in self.spec.params}
        metrics = {k: row.get(k) for k in self._metric_names()}
        metrics = {k: float(v) for k, v in metrics.items() if _finite(v)}
        _, ssi, sei = self._hparams_summaries(values, metrics, str(row.get("status")))
        w = self._writer(trial_id)
        w.file_writer.add_summary(ssi)
        w.file_writer.add_summary(sei)
        step = row.get("step") or 0
        for k, v in metrics.items():
            w.add_scalar(self.HPARAM_TAG.format(k), v, int(step))
        w.flush()
        w.close()
        self._writers.pop(trial_id, None)
        self._ended.add(trial_id)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


def has_session(run_dir: Path) -> bool:
    """Whether a trial's TensorBoard folder already holds an hparams session end."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return True
    tb_log = logging.getLogger("tensorboard")
    level = tb_log.level
    tb_log.setLevel(logging.WARNING)  # EventAccumulator logs every file it finishes at INFO
    try:
        acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
        acc.Reload()
        try:
            tags = acc.PluginTagToContent("hparams")
        except KeyError:  # no hparams data at all
            return False
        return "_hparams_/session_end_info" in tags
    finally:
        tb_log.setLevel(level)
