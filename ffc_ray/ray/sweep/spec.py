"""Sweep files: base training config + search space over dotted keys + Tune settings.

Pure Python (no Ray import): a sweep is parsed and fully validated here, before any trial starts,
so an invalid sweep (unknown key, empty range, a value the config rejects, a metric the trainer
does not report) fails in seconds with a message naming the field.

Example (``sweeps/demo.yaml``)::

    name: demo
    base: configs/synthetic_ffc.yaml
    overrides: {train.steps: 120}
    search:
      pool.fraction: {loguniform: [0.05, 0.5]}
      head.margin: {uniform: [0.2, 0.5]}
      head.margin_type: {choice: [arcface, cosface]}
      head.top_k: {int: [3, 10]}
    tune:
      metric: accuracy
      mode: max
      num_samples: 5
      max_concurrent: 1
      asha: {max_t: 4, grace_period: 1, reduction_factor: 2}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ffc_ray.config import Config, ConfigError, check_name, load_config

#: Metrics every training run reports (rank 0, through ray.train.report). Sweeps may optimise any.
REPORTED_METRICS: dict[str, str] = {
    "accuracy": "max",
    "accuracy_std": "min",
    "auc": "max",
    "tar@far=0.001": "max",
    "tar@far=0.0001": "max",
    "f1": "max",
    "loss": "min",
    "head_memory_mb": "min",
    "images_per_s": "max",
    "step_time_ms": "min",
}

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")

#: Official FFC defaults (tiandunx/FFC main.py) for keys a sweep may search; evaluated first.
PAPER_DEFAULTS: dict[str, Any] = {
    "pool.fraction": 0.1,
    "head.margin": 0.5,
    "head.scale": 32.0,
    "head.margin_type": "arcface",
    "head.k_mode": "ring",
    "head.neg_loss": "topk",
    "pool.momentum": 0.99,
    "pool.policy": "lru",
    "optim.lr": 0.1,
}


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"sweep field '{key}': {msg}")


@dataclass(frozen=True)
class Param:
    """One searched dotted key and its distribution."""

    key: str
    kind: str  # one of DISTRIBUTIONS
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def bounds(self) -> list[Any]:
        """Values that must each be a valid config (range ends, every choice)."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def to_optuna(self):
        """The equivalent ``optuna.distributions`` object."""
        from optuna import distributions as od

        if self.kind == "choice":
            return od.CategoricalDistribution(list(self.choices))
        if self.kind in ("int", "logint"):
            return od.IntDistribution(
                int(self.low), int(self.high), log=self.kind == "logint", step=int(self.step or 1)
            )
        return od.FloatDistribution(
            float(self.low), float(self.high), log=self.kind == "loguniform", step=self.step
        )


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # max | min


@dataclass(frozen=True)
class TuneSettings:
    metric: str = "accuracy"
    mode: str = "max"
    num_samples: int = 4
    max_concurrent: int = 1
    seed: int = 0
    asha: Mapping[str, int] | None = field(
        default_factory=lambda: {"max_t": 4, "grace_period": 1, "reduction_factor": 2}
    )
    storage: str | None = None  # Optuna storage URL; None: sqlite file in the experiment folder
    points_to_evaluate: tuple[Any, ...] = ("paper",)
    objectives: tuple[Objective, ...] = ()  # two or more: multi-objective (Pareto front)
    trial_cpus: float = 0.25  # resources of a trial driver (the TorchTrainer's controller)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) >= 2


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: Path | None
    base: Config
    base_path: str | None
    overrides: Mapping[str, Any]
    params: tuple[Param, ...]
    tune: TuneSettings

    def optuna_space(self) -> dict[str, Any]:
        return {p.key: p.to_optuna() for p in self.params}

    def trial_config(self, values: Mapping[str, Any]) -> Config:
        """The training config of one trial: base + overrides + the sampled values."""
        return self.base.with_overrides(dict(values))

    def initial_points(self) -> list[dict[str, Any]]:
        """``points_to_evaluate``: "paper" expands to the official defaults clipped to the space."""
        points: list[dict[str, Any]] = []
        for item in self.tune.points_to_evaluate:
            if item == "paper":
                point = {}
                for p in self.params:
                    point[p.key] = _paper_value(p, self.base)
                points.append(point)
            else:
                points.append(
                    {p.key: item.get(p.key, _paper_value(p, self.base)) for p in self.params}
                )
        return points


def _paper_value(p: Param, base: Config) -> Any:
    """The official default for ``p`` (else the base config's value), moved inside the space."""
    value = PAPER_DEFAULTS.get(p.key, base.get(p.key))
    if p.kind == "choice":
        return value if value in p.choices else p.choices[0]
    if value is None:
        value = p.low
    value = min(max(value, p.low), p.high)
    if p.kind in ("int", "logint"):
        step = int(p.step or 1)
        value = int(p.low) + int(round((value - p.low) / step)) * step
        value = min(value, int(p.high))
    return value


# ------------------------------------------------------------------------------------------


def _parse_param(key: str, spec: Any) -> Param:
    where = f"search.{key}"
    if not isinstance(spec, Mapping) or len(spec) not in (1, 2):
        raise _err(where, f"expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS and k != "step"]
    if len(kinds) != 1 or extra:
        raise _err(
            where,
            f"expected one of {', '.join(DISTRIBUTIONS)} (+ optional step), got {list(spec)}",
        )
    kind = kinds[0]
    args = spec[kind]
    step = spec.get("step")
    if kind == "choice":
        if not isinstance(args, (list, tuple)) or not args:
            raise _err(where, "choice needs a non-empty list")
        if len(set(map(repr, args))) != len(args):
            raise _err(where, f"choice has duplicates: {args}")
        return Param(key, kind, choices=tuple(args))
    if not isinstance(args, (list, tuple)) or len(args) != 2:
        raise _err(where, f"{kind} needs [low, high], got {args!r}")
    low, high = args
    for v in (low, high):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _err(where, f"bounds must be finite numbers, got {args!r}")
    if kind in ("int", "logint") and not all(float(v).is_integer() for v in (low, high)):
        raise _err(where, f"{kind} bounds must be integers, got {args!r}")
    if not low < high:
        raise _err(where, f"empty range [{low}, {high}]: low must be smaller than high")
    if kind in ("loguniform", "logint") and low <= 0:
        raise _err(where, f"{kind} needs low > 0, got {low}")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0):
        raise _err(f"{where}.step", f"must be a positive number, got {step!r}")
    if step is not None and kind in ("loguniform", "logint"):
        raise _err(f"{where}.step", f"{kind} does not take a step")
    if kind in ("int", "logint"):
        low, high = int(low), int(high)
    return Param(key, kind, low=low, high=high, step=step)


def _parse_metric(key: str, metric: Any, mode: Any) -> Objective:
    if metric not in REPORTED_METRICS:
        raise _err(
            key,
            f"metric {metric!r} is not reported by the trainer; "
            f"known: {', '.join(REPORTED_METRICS)}",
        )
    if mode not in ("max", "min"):
        raise _err(key, f"mode must be max or min, got {mode!r}")
    return Objective(str(metric), str(mode))


def _parse_tune(d: Mapping[str, Any]) -> TuneSettings:
    if not isinstance(d, Mapping):
        raise _err("tune", f"expected a mapping, got {d!r}")
    known = {f for f in TuneSettings.__dataclass_fields__}
    for k in d:
        if k not in known:
            raise _err(f"tune.{k}", f"unknown key (known: {', '.join(sorted(known))})")
    kw = dict(d)
    primary = _parse_metric("tune.metric", kw.get("metric", "accuracy"), kw.get("mode", "max"))
    kw["metric"], kw["mode"] = primary.metric, primary.mode
    for k in ("num_samples", "max_concurrent"):
        if k in kw and (not isinstance(kw[k], int) or isinstance(kw[k], bool) or kw[k] < 1):
            raise _err(f"tune.{k}", f"must be an integer >= 1, got {kw[k]!r}")
    if "seed" in kw and (not isinstance(kw["seed"], int) or isinstance(kw["seed"], bool)):
        raise _err("tune.seed", f"must be an integer, got {kw['seed']!r}")
    if "trial_cpus" in kw and (
        not isinstance(kw["trial_cpus"], (int, float)) or kw["trial_cpus"] <= 0
    ):
        raise _err("tune.trial_cpus", "must be > 0 (Ray rejects a zero-resource trial)")
    asha = kw.get("asha", TuneSettings().asha)
    if asha is not None:
        if not isinstance(asha, Mapping):
            raise _err("tune.asha", f"expected a mapping or null, got {asha!r}")
        allowed = {"max_t", "grace_period", "reduction_factor"}
        for k, v in asha.items():
            if k not in allowed:
                raise _err(f"tune.asha.{k}", f"unknown key (known: {', '.join(sorted(allowed))})")
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _err(f"tune.asha.{k}", f"must be an integer >= 1, got {v!r}")
        merged = {"max_t": 4, "grace_period": 1, "reduction_factor": 2, **asha}
        if merged["grace_period"] > merged["max_t"]:
            raise _err("tune.asha.grace_period", "must not exceed max_t")
        if merged["reduction_factor"] < 2:
            raise _err("tune.asha.reduction_factor", "must be >= 2")
        kw["asha"] = merged
    objs = kw.get("objectives") or ()
    if objs:
        if not isinstance(objs, (list, tuple)) or len(objs) < 2:
            raise _err(
                "tune.objectives",
                "multi-objective mode needs a list of at least two {metric, mode}",
            )
        parsed = []
        for i, o in enumerate(objs):
            if not isinstance(o, Mapping) or set(o) - {"metric", "mode"}:
                raise _err(f"tune.objectives[{i}]", f"expected {{metric, mode}}, got {o!r}")
            parsed.append(_parse_metric(f"tune.objectives[{i}]", o.get("metric"), o.get("mode")))
        if len({o.metric for o in parsed}) != len(parsed):
            raise _err("tune.objectives", "metrics must be distinct")
        kw["objectives"] = tuple(parsed)
    pts = kw.get("points_to_evaluate", ("paper",))
    if pts is None:
        pts = ()
    if not isinstance(pts, (list, tuple)) or not all(
        p == "paper" or isinstance(p, Mapping) for p in pts
    ):
        raise _err(
            "tune.points_to_evaluate", "expected a list of 'paper' or {dotted.key: value} mappings"
        )
    kw["points_to_evaluate"] = tuple(pts)
    return TuneSettings(**kw)


def parse_sweep(
    data: Mapping[str, Any], *, path: Path | None = None, root: Path | None = None
) -> SweepSpec:
    """Validate a sweep mapping.

    A relative ``base`` path resolves against ``root``, then against the sweep file's folder.
    """
    if not isinstance(data, Mapping):
        raise _err("<root>", "a sweep file must hold a mapping")
    allowed = {"name", "base", "overrides", "search", "tune"}
    for k in data:
        if k not in allowed:
            raise _err(k, f"unknown key (known: {', '.join(sorted(allowed))})")
    base_path = data.get("base")
    resolved: Path | None = None
    if base_path is not None:
        candidates = [Path(base_path)]
        if root is not None:
            candidates.append(root / base_path)
        if path is not None:
            candidates.append(path.parent / base_path)
        resolved = next((c for c in candidates if c.is_file()), None)
        if resolved is None:
            raise _err("base", f"config file {base_path} not found")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise _err("overrides", "expected a mapping of dotted keys to values")
    try:
        base = load_config(resolved, overrides)
    except ConfigError as exc:
        raise _err("overrides" if overrides else "base", str(exc)) from exc

    search = data.get("search") or {}
    if not isinstance(search, Mapping) or not search:
        raise _err("search", "needs at least one dotted key with a distribution")
    params = []
    for key, spec in search.items():
        try:
            base.get(key)
        except ConfigError:
            raise _err(f"search.{key}", "unknown config key") from None
        param = _parse_param(key, spec)
        for value in param.bounds():
            try:
                base.with_overrides({key: value})
            except ConfigError as exc:
                raise _err(
                    f"search.{key}", f"value {value!r} is rejected by the config: {exc}"
                ) from None
        params.append(param)

    tune = _parse_tune(data.get("tune") or {})
    name = data.get("name") or (path.stem if path is not None else "sweep")
    try:
        check_name(name, "name")
    except ConfigError as exc:
        raise _err("name", str(exc)) from None
    spec = SweepSpec(
        name=name,
        path=path,
        base=base,
        base_path=str(base_path) if base_path is not None else None,
        overrides=dict(overrides),
        params=tuple(params),
        tune=tune,
    )
    by_key = {p.key: p for p in params}
    for i, item in enumerate(tune.points_to_evaluate):
        for key in item if isinstance(item, Mapping) else ():
            if key not in search:
                raise _err(f"tune.points_to_evaluate[{i}].{key}", "is not a searched key")
            if not _in_space(by_key[key], item[key]):
                raise _err(
                    f"tune.points_to_evaluate[{i}].{key}",
                    f"{item[key]!r} is outside the search space {dict(search[key])}",
                )
    for i, point in enumerate(spec.initial_points()):
        try:
            spec.trial_config(point)
        except ConfigError as exc:
            raise _err(f"tune.points_to_evaluate[{i}]", str(exc)) from None
    check_reported(spec)
    return spec


def _in_space(p: Param, value: Any) -> bool:
    """Whether ``value`` is a point of ``p``'s distribution (range, integer step, choice)."""
    if p.kind == "choice":
        return value in p.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not p.low <= value <= p.high:
        return False
    integer = p.kind in ("int", "logint")
    step = p.step or (1 if integer else None)
    if integer and value != int(value):
        return False
    if step is None:
        return True
    k = (value - p.low) / step  # on the grid low + k * step (float: as Optuna, to 1e-8)
    return abs(k - round(k)) < 1e-8


def load_sweep(
    path: str | Path, root: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> SweepSpec:
    """Read and validate a sweep file; ``overrides`` (dotted keys) go on top of its own."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {p} is not valid YAML: {exc}") from exc
    data = data or {}
    if overrides:
        if not isinstance(data, Mapping):
            raise _err("<root>", f"{p}: a sweep file must hold a mapping")
        file_overrides = data.get("overrides") or {}
        if not isinstance(file_overrides, Mapping):
            raise _err("overrides", "expected a mapping of dotted keys to values")
        data = {**data, "overrides": {**file_overrides, **dict(overrides)}}
    return parse_sweep(data, path=p, root=Path(root) if root is not None else None)


# ------------------------------------------------------------------------------------------
# what a trial reports (added by the sweep module's owner; pure, like the rest of this file)

#: Metrics that come from the verification evaluation (first ``eval.pairs`` set); every other
#: name in :data:`REPORTED_METRICS` is reported at every evaluation whatever the eval sets.
VERIFICATION_METRICS = frozenset(
    {"accuracy", "accuracy_std", "auc", "f1", "tar@far=0.001", "tar@far=0.0001"}
)


def objectives_of(spec: SweepSpec) -> tuple[Objective, ...]:
    """The optimised metrics: ``tune.objectives`` in multi-objective mode, else (metric, mode)."""
    t = spec.tune
    return t.objectives if t.multi_objective else (Objective(t.metric, t.mode),)


def evaluation_steps(cfg: Config) -> list[int]:
    """Steps after which a run evaluates and reports (every ``eval_interval`` and the last).

    One report per evaluation is one Tune ``training_iteration``: the unit of ASHA's
    ``grace_period`` and ``max_t``.
    """
    steps, every = cfg.train.steps, cfg.train.eval_interval
    return sorted({s for s in range(every, steps + 1, every)} | {steps})


def check_reported(spec: SweepSpec) -> None:
    """Fail unless every trial can report the optimised metrics often enough for ASHA.

    Verification metrics need a non-empty first verification set (``eval.pairs``; for the
    synthetic set, held-out identities and pairs) and ``tar@far=F`` needs ``F`` among
    ``eval.far_targets``. ASHA's first rung (``grace_period`` evaluations) must be reachable,
    else it could never stop a trial. Every searched value range is checked at its ends.
    """
    configs = [spec.base] + [spec.trial_config({p.key: v}) for p in spec.params for v in p.bounds()]
    keys = {p.key for p in spec.params}
    fixed_capacity = spec.base.pool.capacity is not None and "pool.capacity" not in keys
    if "pool.fraction" in keys and fixed_capacity:
        raise _err(
            "search.pool.fraction",
            f"has no effect: the base config sets pool.capacity "
            f"{spec.base.pool.capacity} (set pool.capacity: null in overrides)",
        )
    for o in objectives_of(spec):
        where = "tune.objectives" if spec.tune.multi_objective else "tune.metric"
        if o.metric not in VERIFICATION_METRICS:
            continue
        for cfg in configs:
            if not cfg.eval.pairs:
                raise _err(where, f"{o.metric!r} comes from verification, but eval.pairs is empty")
            if (
                cfg.eval.pairs[0] == "synthetic"
                and cfg.data.source == "synthetic"
                and (cfg.data.num_pairs == 0 or cfg.data.holdout_identities < 2)
            ):
                raise _err(
                    where,
                    f"{o.metric!r} comes from verification, but the synthetic set "
                    "has no pairs (data.num_pairs, data.holdout_identities)",
                )
            if o.metric.startswith("tar@far="):
                far = float(o.metric.split("=", 1)[1])
                if not any(math.isclose(far, f, rel_tol=1e-9) for f in cfg.eval.far_targets):
                    raise _err(
                        where,
                        f"{o.metric!r} is not reported: add {far:g} to "
                        f"eval.far_targets (now {list(cfg.eval.far_targets)})",
                    )
    asha = spec.tune.asha
    if asha is not None and not spec.tune.multi_objective:
        for cfg in configs:
            n = len(evaluation_steps(cfg))
            if asha["grace_period"] > n:
                raise _err(
                    "tune.asha.grace_period",
                    f"{asha['grace_period']} exceeds the {n} evaluation(s) a trial reports "
                    f"(train.steps {cfg.train.steps} / train.eval_interval "
                    f"{cfg.train.eval_interval}): ASHA could never stop a trial",
                )
