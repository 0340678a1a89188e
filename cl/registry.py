"""Registries of strategies, scenarios and backbones, keyed by short lowercase names (timm style).

Registration is a decorator; a duplicate name raises; an unknown name suggests the closest ones. Modules in the
``strategies`` and ``scenarios`` packages are imported on first lookup, so a new file registers itself without
touching any other file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from cl.errors import ConfigError, closest

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map with lazy discovery of the modules that register into it."""

    def __init__(self, kind: str, packages: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._packages = packages
        self._entries: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name.lower()
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = obj
            return obj

        return deco

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for pkg_name in self._packages:
            pkg = importlib.import_module(pkg_name)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{pkg_name}.{info.name}")

    def get(self, name: str) -> T:
        self._discover()
        key = str(name).lower()
        if key not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{closest(key, self._entries)}; `cl list` shows every registered name"
            )
        return self._entries[key]

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._discover()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._discover()
        return str(name).lower() in self._entries


STRATEGIES: Registry[Any] = Registry("strategy", ("strategies",))
SCENARIOS: Registry[Any] = Registry("scenario", ("scenarios",))
BACKBONES: Registry[Any] = Registry("backbone", ("cl.backbones",))

register_strategy = STRATEGIES.register
register_scenario = SCENARIOS.register
register_backbone = BACKBONES.register
