"""Registries of strategies, scenarios and backbones, keyed by short lowercase names (timm style).

Registration is a decorator; a duplicate name raises; an unknown name suggests the closest ones. Entries come
from four places, and ``cl list`` says which for each:

* built-in: modules in the ``strategies`` and ``scenarios`` packages (and ``cl.backbones``) are imported on first
  lookup, so a new file registers itself without touching any other file;
* ``imports=[mylab.methods]``: the user's modules, imported before the config is built (:func:`import_modules`);
* the ``cl.plugins`` entry-point group: installed packages whose modules register on import;
* an import path used as the name (``strategy=mylab.methods:MyStrategy``): the object itself, no registration.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import pkgutil
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from cl.errors import ConfigError, closest

T = TypeVar("T")

ENTRY_POINT_GROUP = "cl.plugins"
#: ``package.module:Attr`` (the form entry points use); ``Attr`` may be dotted (``Outer.Inner``)
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: module name -> where it came from (``imports=``, an entry point, an import path); built-ins are not listed
_ORIGINS: dict[str, str] = {}
_BUILTIN_PREFIXES = ("strategies.", "scenarios.", "cl.")
_plugins_loaded = False


def is_import_path(name: object) -> bool:
    """True for ``module.sub:Attr``, the form that names an object by import path instead of a registered name."""
    return isinstance(name, str) and bool(_IMPORT_PATH.match(name))


def _ensure_cwd_on_path() -> None:
    # `python -m cl` puts the working directory on sys.path but the `cl` console script does not; a user's own
    # module next to their config should import the same way under both (and in DDP ranks, which use `-m cl`).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def import_module(module: str, origin: str) -> Any:
    """Import a user's module, recording ``origin`` for ``cl list``; a failure is one :class:`ConfigError` line."""
    _ensure_cwd_on_path()
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = f"no module named '{err.name}'" if err.name else str(err)
        raise ConfigError(f"{origin}: cannot import '{module}': {missing} (is it on PYTHONPATH or in the working "
                          "directory?)") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing: name it, in one line
        raise ConfigError(f"{origin}: importing '{module}' failed: {type(err).__name__}: {err}") from None
    _ORIGINS.setdefault(module, origin)
    return mod


def import_modules(modules: Iterable[str]) -> None:
    """Import the ``imports=`` modules so their decorators register strategies, scenarios, backbones, callbacks."""
    for module in modules:
        module = str(module).strip()
        if not re.match(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$", module):
            raise ConfigError(f"imports: '{module}' is not a module name (for example mylab.methods)")
        import_module(module, "imports=")


def load_object(path: str, what: str) -> Any:
    """The object named by ``module.sub:Attr``; a missing module or attribute is one :class:`ConfigError` line."""
    module, _, attr = path.partition(":")
    obj = import_module(module, f"{what} '{path}'")
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"{what} '{path}': '{module}' has no attribute '{part}'{closest(part, public)}")
        obj = getattr(obj, part)
    return obj


def load_entry_points() -> None:
    """Import every module of the ``cl.plugins`` entry-point group once (installed packages registering entries).

    A plugin that fails to import is reported on one line and skipped, so a broken package elsewhere in the
    environment does not stop every run.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None)
        origin = f"entry point '{ep.name}'" + (f" of {dist}" if dist else "")
        module = ep.value.split(":", 1)[0].strip()
        try:
            ep.load()
        except Exception as err:  # noqa: BLE001
            logging.getLogger("cl.registry").warning("cl: plugin %s failed to import (%s: %s); skipped", origin,
                                                     type(err).__name__, err)
            continue
        _ORIGINS.setdefault(module, origin)


class Registry(Generic[T]):
    """A name -> object map with lazy discovery of the modules that register into it.

    Args:
        kind: what the entries are, for messages (``strategy``).
        packages: packages whose modules are imported on first lookup (the built-ins).
        base: ``module:Class`` every entry named by import path must subclass (checked on load).
    """

    def __init__(self, kind: str, packages: tuple[str, ...] = (), base: str | None = None) -> None:
        self.kind = kind
        self._packages = packages
        self._base = base
        self._entries: dict[str, T] = {}
        self._by_path: dict[str, T] = {}  # loaded by import path: usable everywhere, not listed as names
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
        load_entry_points()

    def _load_path(self, path: str) -> T:
        if path not in self._by_path:
            obj = load_object(path, self.kind)
            if self._base is not None:
                base = load_object(self._base, "base class")
                if not (isinstance(obj, type) and issubclass(obj, base)):
                    raise ConfigError(f"{self.kind} '{path}' is {_describe(obj)}, not a subclass of "
                                      f"{base.__module__}.{base.__qualname__}")
            self._by_path[path] = obj
        return self._by_path[path]

    def get(self, name: str) -> T:
        self._discover()
        key = str(name).lower()
        if key in self._entries:
            return self._entries[key]
        if is_import_path(name):
            return self._load_path(str(name))
        raise ConfigError(
            f"unknown {self.kind} '{name}'{closest(key, self._entries)}; `cl list` shows every registered name "
            "(or give an import path, module:Class)"
        )

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._discover()
        return sorted(self._entries.items())

    def origin(self, name: str) -> str:
        """Where an entry comes from: ``built-in``, ``imports=``, ``entry point 'x' of pkg`` or its module."""
        obj = self.get(name)
        module = getattr(obj, "__module__", "") or ""
        if module in _ORIGINS:
            return f"{_ORIGINS[module]} ({module})"
        if module.startswith(_BUILTIN_PREFIXES) or module in ("strategies", "scenarios", "cl"):
            return "built-in"
        return f"module {module}"

    def __contains__(self, name: object) -> bool:
        self._discover()
        return str(name).lower() in self._entries


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    kind = type(obj).__name__
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


STRATEGIES: Registry[Any] = Registry("strategy", ("strategies",), base="cl.strategy:CLStrategy")
SCENARIOS: Registry[Any] = Registry("scenario", ("scenarios",), base="scenarios.base:ScenarioBuilder")
BACKBONES: Registry[Any] = Registry("backbone", ("cl.backbones",), base="cl.backbones.base:BackboneBuilder")

register_strategy = STRATEGIES.register
register_scenario = SCENARIOS.register
register_backbone = BACKBONES.register
