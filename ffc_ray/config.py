"""Typed, frozen configuration for every part of ffc_ray.

Config flows one way: YAML -> :class:`Config` (validated) -> plain dict (to Ray) -> :class:`Config`
in the worker. Dotted overrides (``head.margin=0.4``) address any field. An unknown key is an
error that names the full dotted key; a bad value is an error that names the field.

Defaults follow the official FFC code (``tiandunx/FFC``: s=32, m=0.5, EMA 0.99, K=2 rows per
identity, SGD lr 0.1 momentum 0.9 nesterov, weight decay 1e-4) scaled down where a CPU needs it
(image size, batch, steps).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ffc_ray import registry


class ConfigError(ValueError):
    """A configuration problem; the message names the offending dotted field."""


def check_name(name: Any, what: str) -> str:
    """A run or sweep name: it names a folder, so letters, digits, '.', '_' and '-' only,
    starting with a letter or digit (no '/', no '.' or '..')."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(
            f"{what} {name!r}: use letters, digits, '.', '_' or '-', starting with a letter "
            "or digit"
        )
    return name


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"config field '{key}': {msg}")


CONFIG_FILE = "config.yaml"  # the resolved config in a run folder and in each checkpoint


@dataclass(frozen=True)
class DataConfig:
    """Where training images come from and how a step's dual-loader batch is shaped.

    ``source`` is ``"synthetic"`` (generated in memory, see :mod:`ffc_ray.data.synthetic`) or the
    path of a store written by ``ffc-ray data import`` (sharded LMDB).
    Per step and worker: an instance batch of ``instance_batch`` images (split into halves I, II)
    and an identity batch of ``identity_batch`` identities (two images each, III and IV); the views
    are x = I + III and y = II + IV (the paper's table 5 varies the instance : identity ratio).
    """

    source: str = "synthetic"
    num_identities: int = 1000  # synthetic: training identities
    images_per_identity: int = 8  # synthetic
    holdout_identities: int = 200  # synthetic: identities never trained on, for verification
    num_pairs: int = 1000  # synthetic verification pairs on the held-out identities
    image_size: int = 64
    instance_batch: int = 64
    identity_batch: int = 32
    flip: bool = True
    seed: int = 0
    read_cpus: float = 0.25  # Ray Data: CPU fraction per read / decode task (2-core machines)
    # store sources in Ray Train: "ray_data" streams the LMDB shards through Ray Data read /
    # decode tasks into each worker (uint8 through the object store, normalised on the worker's
    # device); "reader" decodes in the worker process itself (same rows, same values)
    loader: str = "ray_data"
    # logical data shards of a Ray Train run (null: one per worker). More shards than workers
    # emulates that many data-parallel workers on fewer: each worker concatenates its shards'
    # batches and forwards each shard's block alone (BatchNorm per block), so a 2-shard run on
    # one worker reproduces a 2-worker run (ffc head); the data order depends on the shards
    shards: int | None = None

    @property
    def view_batch(self) -> int:
        """Images per view (x or y) per worker: I + III."""
        return self.instance_batch // 2 + self.identity_batch


@dataclass(frozen=True)
class ModelConfig:
    """Backbone (see :mod:`ffc_ray.registry`); it returns the raw (unnormalised) embedding."""

    backbone: str = "mobilefacenet"
    embedding_dim: int = 512
    dropout: float = 0.0


@dataclass(frozen=True)
class HeadConfig:
    """Classifier head and its margin.

    ``type``: ffc | fc | partial_fc | triplet. ``margin_type``: arcface | cosface | am |
    sphereface | combined | curricularface | magface | lsoftmax | adaptiveface | softmax.
    ``margin`` is the margin of the chosen type (ArcFace additive angle, CosFace/AM subtractive
    cosine, SphereFace multiplicative integer); ``combined`` uses ``m1, m2, m3``:
    cos(m1 * theta + m2) - m3. ``margin_kwargs`` carries type-specific extras (e.g. MagFace bounds)
    and is validated by the margin's constructor.
    """

    type: str = "ffc"
    # replicated: every worker holds all class rows / pool slots; sharded: worker r of W holds a
    # contiguous 1/W of them and the softmax runs across workers (ffc, fc, partial_fc)
    parallel: str = "replicated"
    margin_type: str = "arcface"
    margin: float = 0.5
    scale: float = 32.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    easy_margin: bool = False
    margin_kwargs: Mapping[str, float] = field(default_factory=dict)
    # ffc
    top_k: int | None = None  # None: min(max(int(0.0002 * C), 3), 10) as in the official code
    k_per_id: int = 2  # K feature rows per pool identity, written as a ring
    k_mode: str = "ring"  # ring (official: one logit set per row) | mean (paper eq. 8)
    neg_loss: str = "topk"  # topk (official) | mean_cos (paper eq. 10)
    symmetric: bool = True  # two passes (trial + commit); false keeps the commit pass only
    # partial_fc
    sample_rate: float = 0.1
    # triplet
    triplet_margin: float = 0.2

    def resolved_top_k(self, capacity: int) -> int:
        """Hard negatives per out-of-pool probe: explicit, or the official rule."""
        if self.top_k is not None:
            return min(self.top_k, capacity)
        return min(max(int(capacity * 0.0002), 3), 10, capacity)


@dataclass(frozen=True)
class PoolConfig:
    """Dynamic Class Pool: C identities, LRU or FIFO (paper eq. 7), G-Net momentum."""

    fraction: float = 0.1
    capacity: int | None = None  # absolute C; overrides fraction
    policy: str = "lru"
    momentum: float = 0.99  # G-Net <- m * G-Net + (1 - m) * P-Net
    ema_buffers: bool = False  # also EMA BatchNorm running stats (official: parameters only)

    def resolved_capacity(self, num_identities: int) -> int:
        """C for a training set of ``num_identities`` identities."""
        if self.capacity is not None:
            return self.capacity
        return max(1, int(round(self.fraction * num_identities)))


@dataclass(frozen=True)
class OptimConfig:
    """SGD as the official FFC code, with multistep or warmup + cosine schedules."""

    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "multistep"  # multistep | cosine | constant
    # fractions of the total steps (official: epochs 8, 14, 17 of 19)
    milestones: tuple[float, ...] = (0.42, 0.74, 0.9)
    gamma: float = 0.1
    warmup_steps: int = 0
    min_lr: float = 1e-5
    grad_clip: float | None = 5.0


@dataclass(frozen=True)
class TrainConfig:
    """The training run itself."""

    steps: int = 300
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 on CUDA when supported, else fp16; off on CPU | off | bf16 | fp16
    amp: str = "auto"
    # parameters and arithmetic: float32 | float64 (numerical checks only, e.g. the data-parallel
    # equivalence test; amp is off in float64)
    dtype: str = "float32"
    log_interval: int = 20
    eval_interval: int = 100
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    output_dir: str = "runs"
    name: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    """Verification: LFW-style 10 folds, threshold chosen on the other nine."""

    pairs: tuple[str, ...] = ("synthetic",)  # "synthetic" or paths of verification sets
    folds: int = 10
    flip: bool = False
    batch_size: int = 256
    far_targets: tuple[float, ...] = (1e-3, 1e-4)


@dataclass(frozen=True)
class RayConfig:
    """Ray Train scaling; ``num_workers=0`` runs Ray Train's in-process local mode."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    address: str | None = None
    storage_path: str | None = None  # default: <train.output_dir> made absolute
    max_failures: int = 1


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        validate(self)

    # ---- conversions ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-safe dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Config:
        return _build(cls, d or {}, prefix="")

    def with_overrides(self, overrides: Mapping[str, Any] | Iterable[str]) -> Config:
        """A copy with dotted overrides: ``{"head.margin": 0.4}`` or ``["head.margin=0.4"]``."""
        d = self.to_dict()
        for key, value in _parse_overrides(overrides).items():
            _set_dotted(d, key, value)
        return Config.from_dict(d)

    def get(self, dotted: str) -> Any:
        obj: Any = self
        for part in dotted.split("."):
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in fields(obj)}:
                raise _err(dotted, "unknown key")
            obj = getattr(obj, part)
        return obj

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ---- derived values ------------------------------------------------------------------
    def pool_capacity(self, num_identities: int) -> int:
        return self.pool.resolved_capacity(num_identities)

    def distinct_ids_per_step(self) -> int:
        """Upper bound of distinct gallery identities one step inserts (all workers)."""
        return self.data.view_batch * self.num_data_shards

    @property
    def num_data_shards(self) -> int:
        """Logical data shards of a run: ``data.shards``, by default one per worker."""
        return self.data.shards or max(1, self.ray.num_workers)

    @property
    def has_pool(self) -> bool:
        """The DCP head: a pool index (in Ray, the pool actor) and a G-Net."""
        return self.head.type == "ffc"

    def check_pool_fits(self, num_identities: int) -> int:
        """Validate C against the training set; return C. Called before training starts."""
        cap = self.pool_capacity(num_identities)
        where = "pool.capacity" if self.pool.capacity is not None else "pool.fraction"
        if self.has_pool:
            need = min(self.distinct_ids_per_step(), num_identities)
            if cap < need:
                raise _err(
                    where,
                    f"pool of {cap} slots is smaller than the up to {need} distinct identities "
                    f"one step inserts (data.instance_batch/2 + data.identity_batch = "
                    f"{self.data.view_batch} per shard x {self.num_data_shards} data shards); "
                    "raise the pool size or lower the batch",
                )
        return cap


# ------------------------------------------------------------------------------------------
# validation


#: fields whose allowed values are the names of a registry (known without importing torch)
_REGISTRY_FIELDS = {
    "head.type": registry.HEADS,
    "head.margin_type": registry.MARGINS,
    "model.backbone": registry.BACKBONES,
}

#: Margins a class-sharded head supports: the non-target columns are ``scale * cos`` and nothing
#: is a statistic of the batch or per class (CurricularFace's running t, MagFace's and
#: AdaptiveFace's regularisers and L-Softmax's weight norms would each need their own reduction).
SHARDABLE_MARGINS = ("softmax", "arcface", "cosface", "am", "combined", "sphereface")

_CHOICES = {
    "head.parallel": ("replicated", "sharded"),
    "head.k_mode": ("ring", "mean"),
    "head.neg_loss": ("topk", "mean_cos"),
    "pool.policy": ("lru", "fifo"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("multistep", "cosine", "constant"),
    "train.amp": ("auto", "off", "bf16", "fp16"),
    "train.dtype": ("float32", "float64"),
}


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first bad field: names from the registries and
    fixed choices, then each field's range, then the rules between fields."""
    choices = {key: reg.names() for key, reg in _REGISTRY_FIELDS.items()}
    for key, allowed in {**choices, **_CHOICES}.items():
        value = cfg.get(key)
        if value not in allowed:
            raise _err(key, f"{value!r} is not one of {', '.join(allowed)}")
    for ok, key, msg in _range_checks(cfg):
        if not ok:
            raise _err(key, msg)
    _check_rules(cfg)


def _range_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    """(holds, field, message) for every field with a range."""
    d, h, p, o, t, e, r = cfg.data, cfg.head, cfg.pool, cfg.optim, cfg.train, cfg.eval, cfg.ray
    return [
        (
            d.image_size > 0 and d.image_size % 16 == 0,
            "data.image_size",
            f"{d.image_size} is not a positive multiple of 16 (112 standard; 64 or 48 on CPU)",
        ),
        (d.num_identities >= 2, "data.num_identities", "needs at least 2 identities"),
        (d.images_per_identity >= 2, "data.images_per_identity", "needs at least 2 images"),
        (d.holdout_identities >= 0, "data.holdout_identities", "must be >= 0"),
        (d.num_pairs >= 0, "data.num_pairs", "must be >= 0"),
        (
            d.instance_batch >= 0 and d.instance_batch % 2 == 0,
            "data.instance_batch",
            "must be an even number >= 0 (split into halves I and II)",
        ),
        (d.identity_batch >= 0, "data.identity_batch", "must be >= 0"),
        (d.view_batch >= 2, "data.identity_batch", "a view needs at least 2 images per step"),
        (0 < d.read_cpus <= 16, "data.read_cpus", "must be in (0, 16]"),
        (d.loader in ("ray_data", "reader"), "data.loader", "must be 'ray_data' or 'reader'"),
        (cfg.model.embedding_dim > 0, "model.embedding_dim", "must be > 0"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
        (h.margin >= 0, "head.margin", f"{h.margin} is negative"),
        (h.scale > 0, "head.scale", f"{h.scale} must be > 0"),
        (h.m1 > 0, "head.m1", "must be > 0"),
        (h.m2 >= 0, "head.m2", "must be >= 0"),
        (h.m3 >= 0, "head.m3", "must be >= 0"),
        (h.top_k is None or h.top_k >= 1, "head.top_k", f"{h.top_k} must be >= 1"),
        (h.k_per_id >= 1, "head.k_per_id", "must be >= 1"),
        (0 < h.sample_rate <= 1, "head.sample_rate", f"{h.sample_rate} must be in (0, 1]"),
        (h.triplet_margin >= 0, "head.triplet_margin", "must be >= 0"),
        (0 < p.fraction <= 1, "pool.fraction", f"{p.fraction} is outside (0, 1]"),
        (p.capacity is None or p.capacity >= 1, "pool.capacity", "must be >= 1"),
        (0 <= p.momentum < 1, "pool.momentum", "must be in [0, 1)"),
        (o.lr > 0, "optim.lr", "must be > 0"),
        (0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)"),
        (o.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
        (
            all(0 < m < 1 for m in o.milestones),
            "optim.milestones",
            "are fractions of the total steps, each in (0, 1)",
        ),
        (list(o.milestones) == sorted(o.milestones), "optim.milestones", "must be increasing"),
        (0 < o.gamma <= 1, "optim.gamma", "must be in (0, 1]"),
        (o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
        (o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", "must be > 0 or null"),
        (t.steps >= 1, "train.steps", "must be >= 1"),
        (
            o.warmup_steps < t.steps or o.warmup_steps == 0,
            "optim.warmup_steps",
            "must be smaller than train.steps",
        ),
        (t.log_interval >= 1, "train.log_interval", "must be >= 1"),
        (t.eval_interval >= 1, "train.eval_interval", "must be >= 1"),
        (t.checkpoint_interval >= 1, "train.checkpoint_interval", "must be >= 1"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1"),
        (
            t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
            "train.device",
            f"{t.device!r} is not auto, cpu, cuda or cuda:N",
        ),
        (e.folds >= 2, "eval.folds", "must be >= 2"),
        (e.batch_size >= 1, "eval.batch_size", "must be >= 1"),
        (all(0 < f < 1 for f in e.far_targets), "eval.far_targets", "each must be in (0, 1)"),
        (r.num_workers >= 0, "ray.num_workers", "must be >= 0 (0 = in-process local mode)"),
        (r.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0"),
        (r.max_failures >= -1, "ray.max_failures", "must be >= -1 (-1 = unlimited)"),
    ]


def _check_rules(cfg: Config) -> None:
    """The rules between fields, and locations that must parse."""
    d, h, e, r = cfg.data, cfg.head, cfg.eval, cfg.ray
    if h.type == "partial_fc" and r.num_workers > 1 and h.parallel != "sharded":
        raise _err(
            "head.parallel",
            "partial_fc on several workers runs sharded (replicated, the per-worker sampled "
            "rows would diverge); set head.parallel: sharded or ray.num_workers: 1",
        )
    if h.parallel == "sharded" and h.type not in ("ffc", "fc", "partial_fc"):
        raise _err(
            "head.parallel", f"sharded is implemented for ffc, fc and partial_fc, not {h.type}"
        )
    if h.parallel == "sharded" and h.margin_type not in SHARDABLE_MARGINS:
        raise _err(
            "head.margin_type",
            f"{h.margin_type} cannot run on a sharded head (one of {', '.join(SHARDABLE_MARGINS)})",
        )
    workers = max(1, r.num_workers)
    if d.shards is not None and (d.shards < workers or d.shards % workers):
        raise _err("data.shards", f"{d.shards} is not a multiple of the {workers} worker(s)")
    if d.shards is not None and d.shards > workers and h.type != "ffc":
        raise _err("data.shards", "more shards than workers (data-parallel emulation): ffc only")
    # L-Softmax needs unnormalised class weights and AdaptiveFace learns one margin per fixed
    # class; a pool slot changes identity, so neither works on the FFC pool (nor Partial FC)
    if h.margin_type in ("lsoftmax", "adaptiveface") and h.type != "fc":
        raise _err(
            "head.margin_type", f"{h.margin_type} needs learned class weights: head.type fc only"
        )
    if h.margin_type in ("sphereface", "lsoftmax") and round(h.margin) < 1:
        raise _err(
            "head.margin", f"{h.margin_type} takes an integer multiplicative margin >= 1 (e.g. 4)"
        )
    _check_location("ray.storage_path", r.storage_path)
    _check_location("data.source", d.source)
    for i, spec in enumerate(e.pairs):
        _check_location(f"eval.pairs[{i}]", spec)
    if d.source == "synthetic" and d.identity_batch > d.num_identities:
        raise _err(
            "data.identity_batch", f"{d.identity_batch} exceeds the {d.num_identities} identities"
        )


_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://(.*)$")


def _check_location(key: str, value: str | None) -> None:
    """A path or a URI (``s3://bucket/x``, ``gs://...``, ``file:///abs``; resolved later by
    :mod:`ffc_ray.storage` through pyarrow): URIs need something after ``scheme://``, and
    ``file://`` URIs an absolute path."""
    if not value:
        return
    m = _URI.match(value)
    if m is None:
        if "://" in value:
            raise _err(key, f"{value!r}: malformed URI (expected scheme://...)")
        return
    sch, rest = m.group(1).lower(), m.group(2)
    if not rest.strip("/"):
        raise _err(key, f"{value!r}: the URI names no bucket or path")
    if sch == "file" and not rest.startswith("/"):
        raise _err(key, f"{value!r}: file URIs need an absolute path (file:///abs/path)")
    if any(c.isspace() for c in value):
        raise _err(key, f"{value!r}: a URI must not contain spaces")


# ------------------------------------------------------------------------------------------
# building from dicts with type checks


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(key: str, tp: Any, value: Any) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise _err(key, "must not be null")
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _err(key, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _err(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _err(key, f"expected a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        (inner, *_rest) = typing.get_args(tp)
        return tuple(_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _err(key, f"expected a mapping, got {value!r}")
        return dict(value)
    raise _err(key, f"unsupported type {tp}")  # pragma: no cover - a bug in this module


def _build(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise _err(prefix.rstrip(".") or "<root>", f"expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in d:
        if key not in known:
            raise _err(prefix + str(key), f"unknown key (known: {', '.join(known)})")
    kwargs: dict[str, Any] = {}
    sections = {}
    for name in known:
        if name not in d:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            sections[name] = _build(tp, d[name], prefix + name + ".")
        else:
            kwargs[name] = _coerce(prefix + name, tp, d[name])
    if cls is Config:
        # validate once, on the whole config (sections alone can't see each other)
        return Config(**sections, **kwargs)
    return cls(**sections, **kwargs)


def _parse_overrides(overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. head.margin=0.4)"
            )
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = d
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise _err(".".join(parts[: i + 1]), "unknown key")
        node = node[part]
    if not isinstance(node, dict) or parts[-1] not in node:
        raise _err(key, "unknown key")
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> Config:
    """Read a YAML training config (``None``: the defaults) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    for key, value in _parse_overrides(overrides).items():
        base = Config().to_dict()
        _set_dotted(base, key, value)  # raises for unknown keys, naming them
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # an empty section (`data:`) takes the override
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                section = ".".join(parts[: i + 1])
                raise _err(section, f"expected a mapping, got {node!r} (overriding {key})")
        node[parts[-1]] = value
    return Config.from_dict(data)
