"""Name -> constructor registries for backbones, margins and heads.

Each built-in name is declared here with the module that defines it; that module registers
the constructor with a decorator when it is imported, which happens on the name's first
:meth:`Registry.get`. So the allowed names are known without importing torch (the config
validates against them at start-up), and importing ``ffc_ray`` does no work. Code outside
the package may register more names with the same decorator. An unknown name lists the
known ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class Registry:
    def __init__(self, kind: str, builtin: Mapping[str, str]) -> None:
        self.kind = kind
        self.builtin = dict(builtin)  # name -> module whose import registers it
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj  # type: ignore[assignment]
            return obj

        return deco

    def names(self) -> list[str]:
        """Every known name: the built-ins (nothing imported) and those registered since."""
        return sorted(set(self.builtin) | set(self._entries))

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries and name in self.builtin:
            importlib.import_module(self.builtin[name])
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names())
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)


def _declare(module: str, *names: str) -> dict[str, str]:
    return dict.fromkeys(names, module)


BACKBONES = Registry(
    "backbone",
    {
        **_declare("ffc_ray.models.iresnet", "iresnet18", "iresnet34", "iresnet50", "iresnet100"),
        **_declare("ffc_ray.models.mobilefacenet", "mobilefacenet"),
        **_declare("ffc_ray.models.vargfacenet", "vargfacenet"),
        **_declare("ffc_ray.models.tiny", "tiny"),
    },
)
MARGINS = Registry(
    "margin",
    _declare(
        "ffc_ray.heads.margins",
        "softmax",
        "arcface",
        "cosface",
        "am",
        "sphereface",
        "lsoftmax",
        "combined",
        "curricularface",
        "magface",
        "adaptiveface",
    ),
)
HEADS = Registry(
    "head",
    {
        **_declare("ffc_ray.heads.ffc", "ffc"),
        **_declare("ffc_ray.heads.fc", "fc"),
        **_declare("ffc_ray.heads.partial_fc", "partial_fc"),
        **_declare("ffc_ray.heads.triplet", "triplet"),
    },
)
