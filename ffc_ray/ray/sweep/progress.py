"""Tune callbacks of the driver: live results table and per-trial TensorBoard runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback

from ffc_ray.ray.sweep.experiment import push_sweep
from ffc_ray.ray.sweep.results import (
    RESULTS_CSV,
    RESULTS_MD,
    TB_DIR,
    SweepTensorBoard,
    _fmt,
    start_order,
    trial_row,
    write_table,
)
from ffc_ray.ray.sweep.spec import (
    SweepSpec,
    objectives_of,
)

log = logging.getLogger(__name__)


class SweepTrialTensorBoardOff(TBXLoggerCallback):
    """Stands in for Tune's default per-trial TBX logger, which would duplicate ``tb/``.

    Tune adds a ``TBXLoggerCallback`` unless one is passed; its events (``ray/tune/*`` in every
    trial folder, hparams at trial end -- checked: they are there) would show each trial twice
    in TensorBoard next to the sweep's own runs under ``tb/``. CSV and JSON loggers stay.
    """

    def __init__(self) -> None:  # no tensorboardX writers
        pass

    def log_trial_start(self, trial: Any) -> None:
        pass

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        pass

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        pass


class SweepProgress(Callback):
    """Tune callback on the sweep driver.

    On every result: a compact log line, TensorBoard scalars, the results table rewritten. On
    every trial end: its hparams session. The table is built from Tune's trial list, which after
    a resume includes the restored trials, so the files always describe the whole sweep.
    """

    def __init__(self, spec: SweepSpec, exp_dir: str, exp_uri: str | None = None) -> None:
        self.spec = spec
        self.exp_dir = Path(exp_dir)
        self.exp_uri = exp_uri  # remote experiment folder: staged files uploaded at trial ends
        self.tb = SweepTensorBoard(spec, self.exp_dir / TB_DIR)
        self._t0 = time.time()
        self._last_write = 0.0

    def _rows(self, trials: Sequence[Any]) -> list[dict[str, Any]]:
        trials = sorted(trials, key=lambda t: start_order(t.last_result))
        return [
            trial_row(
                self.spec,
                t.trial_id,
                t.config,
                t.last_result,
                errored=t.status == "ERROR",
                state=t.status,
            )
            for t in trials
        ]

    def _write(self, trials: Sequence[Any], force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write < 2.0:
            return
        self._last_write = now
        try:
            write_table(
                self._rows(trials),
                self.exp_dir / RESULTS_CSV,
                self.exp_dir / RESULTS_MD,
                f"sweep {self.spec.name} (running)",
            )
        except OSError as exc:  # never let reporting kill the sweep
            log.warning("could not write the results table: %s", exc)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.info(
            "[sweep %s] trial %s started (%d/%d): %s",
            self.spec.name,
            trial.trial_id,
            trials.index(trial) + 1 if trial in trials else len(trials),
            self.spec.tune.num_samples,
            ", ".join(f"{p.key}={_fmt(trial.config.get(p.key))}" for p in self.spec.params),
        )
        self._write(trials, force=True)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self.tb.result(trial.trial_id, result)
        objs = ", ".join(
            f"{o.metric} {_fmt(result.get(o.metric))}" for o in objectives_of(self.spec)
        )
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        log.info(
            "[sweep %s %.0fs] trial %s eval %s step %s: %s | %d/%d trials done",
            self.spec.name,
            time.time() - self._t0,
            trial.trial_id,
            result.get("training_iteration"),
            _fmt(result.get("step")),
            objs,
            done,
            self.spec.tune.num_samples,
        )
        self._write(trials)

    def _end(self, trials: list, trial: Any, errored: bool) -> None:
        row = trial_row(
            self.spec,
            trial.trial_id,
            trial.config,
            trial.last_result,
            errored=errored,
            state="ERROR" if errored else "TERMINATED",
        )
        self.tb.end(trial.trial_id, row)
        log.info(
            "[sweep %s] trial %s %s: %s",
            self.spec.name,
            trial.trial_id,
            row["status"],
            ", ".join(f"{o.metric} {_fmt(row.get(o.metric))}" for o in objectives_of(self.spec)),
        )
        self._write(trials, force=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trials, trial, errored=False)
        self._push()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trials, trial, errored=True)
        self._push()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.tb.close()
        self._push()

    def _push(self) -> None:
        if self.exp_uri:  # (the ended trial's TensorBoard writer is closed, so flushed)
            push_sweep(self.exp_dir, self.exp_uri)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tb"] = SweepTensorBoard(self.spec, self.tb.dir)  # writers are not picklable
        return d
