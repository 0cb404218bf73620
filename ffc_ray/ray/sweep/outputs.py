"""What a finished sweep writes: rows, tables, best config, Pareto front, summary."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ffc_ray.ray.sweep.experiment import push_sweep
from ffc_ray.ray.sweep.results import (
    BEST_CONFIG,
    PARETO_CONFIGS,
    PARETO_CSV,
    PARETO_MD,
    RESULTS_CSV,
    RESULTS_MD,
    STATUS_ERROR,
    TB_DIR,
    SweepTensorBoard,
    _fmt,
    has_session,
    ready_config,
    start_order,
    trial_row,
    write_config,
    write_table,
)
from ffc_ray.ray.sweep.spec import (
    Objective,
    SweepSpec,
    objectives_of,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepOutcome:
    """What :func:`run_sweep` returns: the rows and the files it wrote."""

    name: str
    exp_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Path | None
    pareto: list[dict[str, Any]]
    tb_dir: Path
    optuna_storage: str
    wall_s: float
    num_errors: int = 0
    spec: SweepSpec | None = None  # the sweep as run (name, resolved paths)
    exp_uri: str | None = None  # remote experiment folder (exp_dir is then its local staging)

    @property
    def results_csv(self) -> Path:
        return self.exp_dir / RESULTS_CSV

    @property
    def results_md(self) -> Path:
        return self.exp_dir / RESULTS_MD


def spec_record(spec: SweepSpec) -> dict[str, Any]:
    """The resolved sweep (base config, search space, settings) for the experiment folder."""
    return {
        "name": spec.name,
        "source": str(spec.path) if spec.path else None,
        "base": spec.base.to_dict(),
        "search": {
            p.key: (
                {"choice": list(p.choices)}
                if p.kind == "choice"
                else {p.kind: [p.low, p.high], **({"step": p.step} if p.step else {})}
            )
            for p in spec.params
        },
        "tune": json.loads(json.dumps(dataclasses.asdict(spec.tune), default=str)),
        "initial_points": spec.initial_points(),
    }


def rows_from_grid(spec: SweepSpec, grid: Any) -> list[dict[str, Any]]:
    """Final rows in trial start order; errored trials carry the first line of their error."""
    keyed = []
    for res in grid:
        metrics = dict(res.metrics or {})
        trial_id = metrics.get("trial_id") or Path(res.path).name
        row = trial_row(
            spec, str(trial_id), res.config or {}, metrics, errored=res.error is not None
        )
        if res.error is not None:
            lines = [ln for ln in str(res.error).strip().splitlines() if ln.strip()]
            row["error"] = (lines[-1] if lines else type(res.error).__name__)[:160]
        keyed.append((start_order(metrics), row))
    keyed.sort(key=lambda kv: kv[0])
    return [row for _, row in keyed]


def best_rows(spec: SweepSpec, rows: Sequence[Mapping[str, Any]], storage: Any) -> list[int]:
    """Indices of the rows of the study's best trials, in row order: Optuna's ``best_trials``
    (the Pareto front of the COMPLETE trials) with several objectives, ``best_trial`` with one
    (the first such row on a tie).

    A study trial is matched to its table row by the searched values and the objective values,
    which Tune handed to Optuna from that row's last report. Errored trials FAIL in the study
    (:func:`~ffc_ray.ray.sweep.search.build_searcher`), so their rows never match.
    """
    import optuna

    objs = objectives_of(spec)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    try:
        best = study.best_trials if len(objs) > 1 else [study.best_trial]
    except ValueError:  # no COMPLETE trial
        return []
    wanted = {(tuple(t.params.get(p.key) for p in spec.params), tuple(t.values)) for t in best}
    found = [
        i
        for i, r in enumerate(rows)
        if r["status"] != STATUS_ERROR
        and (tuple(r[p.key] for p in spec.params), tuple(r.get(o.metric) for o in objs)) in wanted
    ]
    return found if len(objs) > 1 else found[:1]


def write_outputs(
    spec: SweepSpec,
    exp_dir: Path,
    grid: Any,
    url: str,
    wall_s: float,
    exp_uri: str | None = None,
) -> SweepOutcome:
    """Final table, best config (and Pareto front), hparams for trials the callback missed;
    with ``exp_uri`` (remote storage) the staged files are uploaded there at the end."""
    rows = rows_from_grid(spec, grid)
    objs = objectives_of(spec)
    write_table(
        rows,
        exp_dir / RESULTS_CSV,
        exp_dir / RESULTS_MD,
        f"sweep {spec.name}: {len(rows)} trials, "
        + ", ".join(f"{o.metric} ({o.mode})" for o in objs),
    )
    tb = SweepTensorBoard(spec, exp_dir / TB_DIR)
    for r in rows:
        if not any(
            (exp_dir / TB_DIR / r["trial"]).glob("events.out.tfevents.*")
        ) or not has_session(exp_dir / TB_DIR / r["trial"]):
            tb.end(r["trial"], r)
    tb.close()

    best = best_rows(spec, rows, url)
    best_i = best[0] if best else None
    best_path = None
    pareto: list[dict[str, Any]] = []
    if spec.tune.multi_objective:
        pareto = [rows[i] for i in best]
        pareto.sort(
            key=lambda r: -r[objs[0].metric] if objs[0].mode == "max" else r[objs[0].metric]
        )
        write_table(
            pareto,
            exp_dir / PARETO_CSV,
            exp_dir / PARETO_MD,
            f"sweep {spec.name}: Pareto front of "
            + ", ".join(f"{o.metric} ({o.mode})" for o in objs),
        )
        cdir = exp_dir / PARETO_CONFIGS
        cdir.mkdir(exist_ok=True)
        for r in pareto:
            write_config(
                ready_config(spec, r),
                cdir / f"{r['trial']}.yaml",
                _config_header(spec, r, objs, "on the Pareto front of"),
            )
        best_i = rows.index(pareto[0]) if pareto else best_i
    if best_i is not None:
        best_path = exp_dir / BEST_CONFIG
        write_config(
            ready_config(spec, rows[best_i]),
            best_path,
            _config_header(spec, rows[best_i], objs, "best on " + objs[0].metric + " of"),
        )
    num_errors = sum(r["status"] == STATUS_ERROR for r in rows)
    if exp_uri is not None:
        push_sweep(exp_dir, exp_uri)
    log.info(
        "sweep %s finished in %.1f s: %d trials, %d errors, results in %s",
        spec.name,
        wall_s,
        len(rows),
        num_errors,
        exp_uri or exp_dir,
    )
    return SweepOutcome(
        name=spec.name,
        exp_dir=exp_dir,
        rows=rows,
        best=rows[best_i] if best_i is not None else None,
        best_config=best_path,
        pareto=pareto,
        tb_dir=exp_dir / TB_DIR,
        optuna_storage=url,
        wall_s=wall_s,
        num_errors=num_errors,
        spec=spec,
        exp_uri=exp_uri,
    )


def _config_header(
    spec: SweepSpec, row: Mapping[str, Any], objs: Sequence[Objective], what: str
) -> str:
    vals = ", ".join(f"{o.metric}={_fmt(row.get(o.metric))}" for o in objs)
    params = ", ".join(f"{p.key}={_fmt(row.get(p.key))}" for p in spec.params)
    return (
        f"Trial {row['trial']}, {what} sweep {spec.name} ({row.get('status')}): {vals}\n"
        f"{params}\nTrain it: ffc-ray train <this file>   (written by ffc-ray sweep)"
    )
