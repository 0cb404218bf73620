"""Classifier heads (registry ``HEADS``) and margins (registry ``MARGINS``).

Importing this package registers every head and margin (``ffc``, ``fc``, ``partial_fc``,
``triplet``; the names are declared in :mod:`ffc_ray.registry`). Build one with
:func:`build_head`.
"""

from __future__ import annotations

from ffc_ray.config import Config
from ffc_ray.registry import HEADS

from . import ffc, margins  # noqa: F401 - registers
from .base import Head, HeadOutput, PlainStep, StepContext
from .fc import FullFC
from .ffc import FFCHead
from .margins import Margin, build_margin
from .partial_fc import PartialFC
from .triplet import TripletHead


def build_head(cfg: Config, num_classes: int) -> Head:
    """The head named by ``cfg.head.type`` for a training set of ``num_classes`` identities."""
    return HEADS.get(cfg.head.type).from_config(cfg, num_classes)


__all__ = [
    "FFCHead",
    "FullFC",
    "Head",
    "HeadOutput",
    "Margin",
    "PartialFC",
    "PlainStep",
    "StepContext",
    "TripletHead",
    "build_head",
    "build_margin",
    "margins",
]
