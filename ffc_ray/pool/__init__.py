"""Dynamic Class Pool bookkeeping: the label -> slot index (no Ray here; see ``actor.py``)."""

from ffc_ray.pool.index import PoolIndex
from ffc_ray.pool.plan import StepSlots, plan_step

__all__ = ["PoolIndex", "StepSlots", "plan_step"]
