"""The embedded-default demo: synthetic identities -> LMDB store -> a Tune + Optuna FFC sweep.

``ffc-ray demo`` (``make demo``) on a fresh 2-core CPU machine:

1. generates the synthetic training identities into a sharded LMDB store (the same writer as
   ``ffc-ray data import synthetic``) and the held-out verification pairs into an ``.npz``,
   both once, under ``<workdir>/data`` (reused when they already exist);
2. runs ``sweeps/demo.yaml`` on a local Ray (dashboard on: it cleans up stopped trials): 5 FFC
   trials on the tiny backbone at 32 px, Optuna proposing pool size, margin, margin type and
   top-K, the paper's defaults first, ASHA stopping weak trials after the first evaluation;
3. returns the outcome; :mod:`ffc_ray.demo` prints the results table, the best config (ready
   for ``ffc-ray train``) and the ``tensorboard`` command.

Every demo run is a new experiment ``demo-<time>`` under ``<workdir>/sweeps`` (``runs/demo``
by default), so ``make tensorboard`` (logdir ``runs``) shows them all side by side.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from ffc_ray.config import Config

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEMO_SWEEP = REPO / "sweeps" / "demo.yaml"


def demo_data(cfg: Config, data_dir: Path) -> tuple[Path, Path]:
    """The training store and the verification pairs for ``cfg.data`` (made once, then reused).

    Names carry every parameter that changes the content, so a changed sweep never reuses a
    stale store.
    """
    from ffc_ray.data.importers import ImportOptions, import_synthetic
    from ffc_ray.data.pairs import save_verification_set
    from ffc_ray.data.store import StoreError, open_store
    from ffc_ray.data.synthetic import HOLDOUT_FIRST_IDENTITY, make_identities, make_pairs
    from ffc_ray.data.types import VerificationSet

    d = cfg.data
    tag = f"{d.num_identities}x{d.images_per_identity}_{d.image_size}px_seed{d.seed}"
    store = data_dir / f"synthetic_{tag}"
    pairs = data_dir / (
        f"synthetic_pairs_{d.holdout_identities}x{d.images_per_identity}_"
        f"{d.num_pairs}_{cfg.eval.folds}f_{d.image_size}px_seed{d.seed}.npz"
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        open_store(store)
        log.info("reusing the store %s", store)
    except StoreError:
        t0 = time.time()
        opts = ImportOptions(
            image_size=d.image_size,
            encoding="png",
            num_shards=2,
            seed=d.seed,
            overwrite=True,
            progress=False,
        )
        summary = import_synthetic(store, opts, d.num_identities, d.images_per_identity, d.seed)
        log.info(
            "wrote %s (%d images, %d identities) in %.1f s",
            store,
            summary.num_images,
            summary.num_identities,
            time.time() - t0,
        )
    if not pairs.is_file():
        hold = make_identities(
            d.holdout_identities,
            d.images_per_identity,
            d.image_size,
            d.seed,
            first_identity=HOLDOUT_FIRST_IDENTITY,
        )
        li, ri, same, fold = make_pairs(hold.labels, d.num_pairs, d.seed, cfg.eval.folds)
        vset = VerificationSet("synthetic", hold.images[li], hold.images[ri], same, fold)
        save_verification_set(vset, pairs)
        log.info(
            "wrote %d verification pairs on %d held-out identities: %s",
            len(same),
            d.holdout_identities,
            pairs,
        )
    return store, pairs


def run_demo(
    workdir: str | Path = "runs/demo",
    sweep: str | Path | None = None,
    num_cpus: int | None = None,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    quiet: bool = True,
) -> tuple[Any, float]:
    """Data, then the sweep on it; returns the
    :class:`~ffc_ray.ray.sweep.outputs.SweepOutcome` and the seconds spent on data.
    ``quiet``: only the sweep's own progress lines (no Tune tables, no worker output)."""
    from ffc_ray.ray.sweep.run import run_sweep
    from ffc_ray.ray.sweep.spec import load_sweep

    t0 = time.time()
    workdir = Path(workdir).expanduser().resolve()
    sweep = Path(sweep) if sweep else DEMO_SWEEP
    spec = load_sweep(sweep, root=REPO, overrides=overrides)
    store, pairs = demo_data(spec.base, workdir / "data")
    t_data = time.time() - t0
    spec = load_sweep(
        sweep,
        root=REPO,
        overrides={
            **(overrides or {}),
            "data.source": str(store),
            "eval.pairs": [str(pairs)],
            "train.output_dir": str(workdir),
        },
    )
    spec = dataclasses.replace(spec, name=name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    log.info(
        "data ready in %.1f s (%s); sweep %s: %d FFC trials, %d steps each, searching %s",
        t_data,
        store.name,
        spec.name,
        spec.tune.num_samples,
        spec.base.train.steps,
        ", ".join(p.key for p in spec.params),
    )
    outcome = run_sweep(
        spec,
        storage=workdir / "sweeps",
        num_cpus=num_cpus,
        verbose=0 if quiet else 1,
        log_to_driver=not quiet,
    )
    return outcome, t_data
