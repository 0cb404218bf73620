"""One training step's pool bookkeeping in one call: :func:`plan_step` and its result,
:class:`StepSlots` (what the DCP head needs; one pool-actor round trip in Ray runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ffc_ray.pool.index import PoolIndex, as_labels


@dataclass
class StepSlots:
    """Everything the FFC head needs from the pool index for one step (int64 / bool arrays).

    trial_*: pass A (try_assign of the trial gallery, lookup of the trial probes, rolled back);
    commit_*: pass B (assign of the commit gallery, lookup of the commit probes). ``*_new`` marks
    gallery occurrences that started fresh in their slot; probes hold -1 where the identity is
    not in the pool (negatives). ``evictions`` and ``occupancy`` describe the committed state.
    """

    trial_gallery: np.ndarray
    trial_new: np.ndarray
    trial_probe: np.ndarray
    commit_gallery: np.ndarray
    commit_new: np.ndarray
    commit_probe: np.ndarray
    evictions: int
    occupancy: int


def plan_step(
    index: PoolIndex,
    trial_gallery: Any,
    trial_probe: Any,
    commit_gallery: Any,
    commit_probe: Any,
) -> StepSlots:
    """One step's pool bookkeeping in one call (one actor round trip in distributed runs).

    try_assign(trial_gallery) -> lookup(trial_probe) -> rollback -> assign(commit_gallery)
    -> lookup(commit_probe). An empty trial gallery skips the try/rollback (the trial probes are
    then looked up in the current state, which is what a try of nothing would give).
    Labels are validated before the index is touched and the trial is always rolled back, so an
    error (bad label, too many distinct labels) leaves the index as it was.
    """
    tg = as_labels(trial_gallery, "trial_gallery")
    tp = as_labels(trial_probe, "trial_probe")
    cg = as_labels(commit_gallery, "commit_gallery")
    cp = as_labels(commit_probe, "commit_probe")
    if tg.size:
        t_slots, t_new = index.try_assign(tg, return_new=True)
        try:
            t_probe = index.lookup(tp)
        finally:
            index.rollback()
    else:
        t_slots, t_new = np.empty(0, np.int64), np.empty(0, bool)
        t_probe = index.lookup(tp)
    c_slots, c_new = index.assign(cg, return_new=True)
    c_probe = index.lookup(cp)
    return StepSlots(
        trial_gallery=t_slots,
        trial_new=t_new,
        trial_probe=t_probe,
        commit_gallery=c_slots,
        commit_new=c_new,
        commit_probe=c_probe,
        evictions=int(index.evictions_last),
        occupancy=len(index),
    )
