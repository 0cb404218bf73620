"""Verification sets of a training config (``eval.pairs``): find, load and evaluate them.

``"synthetic"`` is the held-out synthetic identities; any other entry is a verification file
(``.npz`` from ``ffc-ray data pairs`` or an InsightFace ``.bin``), local or at a URI (copied to
this node's cache first).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ffc_ray import storage
from ffc_ray.config import Config, ConfigError
from ffc_ray.data.types import VerificationSet

if TYPE_CHECKING:  # the sweep preflight checks eval sets without loading torch
    from ffc_ray.engine.trainer import Trainer

SCORE_KEY = "score"  # accuracy on the first eval.pairs set; the checkpoint ranking attribute


def load_eval_sets(cfg: Config) -> list[VerificationSet]:
    """``eval.pairs``: "synthetic" = held-out synthetic identities; else a verification file."""
    out = []
    for i, spec in enumerate(cfg.eval.pairs):
        if spec == "synthetic":
            if cfg.data.source != "synthetic":
                raise ConfigError(
                    f"config field 'eval.pairs[{i}]': 'synthetic' needs "
                    "data.source: synthetic (the held-out synthetic identities)"
                )
            from ffc_ray.data.synthetic import synthetic_split

            out.append(synthetic_split(cfg.data, num_folds=cfg.eval.folds)[1])
        else:
            from ffc_ray.data.pairs import load_pairs

            vset = load_pairs(_local_pairs(spec, i), image_size=cfg.data.image_size)
            if vset.left.shape[1] != cfg.data.image_size:
                raise ConfigError(
                    f"config field 'eval.pairs[{i}]': {spec} holds "
                    f"{vset.left.shape[1]}px images, data.image_size is "
                    f"{cfg.data.image_size}"
                )
            out.append(vset)
    return out


def _local_pairs(spec: str, i: int) -> str | Path:
    """A verification file's local path: a URI is copied to this node's cache first."""
    if not storage.is_uri(spec):
        return spec
    try:
        return storage.cached_file(spec)
    except storage.StorageError as exc:
        raise ConfigError(f"config field 'eval.pairs[{i}]': {exc}") from exc


def check_eval_sets(cfg: Config) -> None:
    """Fail before training when an ``eval.pairs`` entry cannot be found."""
    for i, spec in enumerate(cfg.eval.pairs):
        if spec == "synthetic":
            if cfg.data.source != "synthetic":
                raise ConfigError(
                    f"config field 'eval.pairs[{i}]': 'synthetic' needs data.source: synthetic"
                )
        elif storage.is_uri(spec):
            if not spec.split("?")[0].endswith((".npz", ".bin")):
                raise ConfigError(
                    f"config field 'eval.pairs[{i}]': {spec}: a verification set at a URI "
                    "must be one .npz (ffc-ray data pairs) or .bin file"
                )
            try:
                found = storage.is_file(spec)
            except storage.StorageError as exc:
                raise ConfigError(f"config field 'eval.pairs[{i}]': {exc}") from exc
            if not found:
                raise ConfigError(
                    f"config field 'eval.pairs[{i}]': {spec} does not exist (or this node's "
                    "credentials may not read it)"
                )
        elif not Path(spec).exists():
            raise ConfigError(
                f"config field 'eval.pairs[{i}]': {spec} does not exist "
                "(write one with `ffc-ray data pairs`)"
            )


def evaluate_sets(
    trainer: Trainer, vsets: list[VerificationSet], cfg: Config
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Verification on every set: flat metrics ``<set>/<metric>`` and the full results."""
    from ffc_ray.eval.verification import evaluate

    flat: dict[str, float] = {}
    full: dict[str, dict[str, Any]] = {}
    for vset in vsets:
        if len(vset) == 0:
            continue
        res = evaluate(
            lambda imgs: trainer.embed(imgs),
            vset,
            flip=cfg.eval.flip,
            batch_size=cfg.eval.batch_size,
            far_targets=tuple(cfg.eval.far_targets),
        )
        full[vset.name] = res
        for key, value in res.items():
            if isinstance(value, (int, float, np.floating, np.integer)):
                flat[f"{vset.name}/{key}"] = float(value)
    if vsets and f"{vsets[0].name}/accuracy" in flat:
        flat[SCORE_KEY] = flat[f"{vsets[0].name}/accuracy"]
    return flat, full
