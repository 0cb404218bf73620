"""One preflight: the checks that need more than one config field, the data or the cluster.

Single fields (ranges, and names that come from :mod:`ffc_ray.registry`) and rules between
fields of the config alone are checked whenever a :class:`~ffc_ray.config.Config` is built
(:func:`ffc_ray.config.validate`). What is left needs more, and runs here, once, before a run
or a sweep starts (training drivers, the sweep's preflight, the single-process loop):

* the pool must hold the distinct identities one step inserts (needs the training data's
  identity count);
* every ``eval.pairs`` entry must exist and suit the data source (needs the files);
* Ray Data's read tasks must find a CPU next to the training workers (needs the cluster).

Every error is a :class:`~ffc_ray.config.ConfigError` naming the field to change.
"""

from __future__ import annotations

from ffc_ray.config import Config, ConfigError
from ffc_ray.eval.sets import check_eval_sets


def check_run(cfg: Config, num_classes: int | None = None, check_store: bool = True) -> int:
    """The checks a run needs before it starts; returns the pool capacity (slots).

    ``num_classes``: the training identities, read from ``data.source`` when not given.
    ``check_store``: walk the store's keys (off where the caller already walked that store).
    """
    if num_classes is None:
        from ffc_ray.data.source import num_training_classes  # opens the store (torch)

        num_classes = num_training_classes(cfg)
    if check_store and cfg.data.source != "synthetic":
        check_store_readable(cfg)
    capacity = cfg.check_pool_fits(num_classes)
    check_eval_sets(cfg)
    return capacity


def check_store_readable(cfg: Config) -> None:
    """Walk the training store's keys before any worker starts: a damaged shard is named here,
    not after Ray has started and failed its workers."""
    from ffc_ray.data.source import open_train_store
    from ffc_ray.data.store import StoreError

    try:
        open_train_store(cfg).check_readable()
    except StoreError as exc:
        raise ConfigError(f"config field 'data.source': {exc}") from None


def check_data_cpus(
    cfg: Config,
    cluster_cpus: float,
    concurrent_runs: int = 1,
    per_run_extra_cpus: float = 0.0,
) -> None:
    """Raise if Ray Data's read / decode tasks could never get a CPU next to the workers.

    With ``data.loader: ray_data`` each worker streams its store through tasks of
    ``data.read_cpus`` CPU; if the training workers (times the runs that share the cluster,
    e.g. concurrent sweep trials, plus their drivers) hold every one of the ``cluster_cpus``,
    those tasks wait forever and the run hangs (docs/reference.md 3.3).
    """
    d, r = cfg.data, cfg.ray
    if d.source == "synthetic" or d.loader != "ray_data":
        return
    held = concurrent_runs * (r.num_workers * r.cpus_per_worker + per_run_extra_cpus)
    if held + d.read_cpus > cluster_cpus + 1e-9:
        raise ConfigError(
            f"config field 'data.read_cpus': Ray Data read tasks need {d.read_cpus} CPU next to "
            f"{held:g} CPU held by training ({concurrent_runs} run(s) x ({r.num_workers} "
            f"worker(s) x ray.cpus_per_worker {r.cpus_per_worker:g} + {per_run_extra_cpus:g})) "
            f"on a cluster of {cluster_cpus:g} CPUs: they would wait forever. Lower "
            "ray.cpus_per_worker or data.read_cpus, or set data.loader: reader"
        )
