"""A name -> object table filled by decorators in the modules of one package (systems, checkpoint converters).

Every module of the package is imported on the first lookup, so adding an
entry means adding one module that decorates its class or function.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable


class Registry:
    """Entries of package `package`, registered with `register(*keys)`; `what` names them in errors."""

    def __init__(self, package: str, what: str):
        self.package, self.what = package, what
        self._entries: dict[str, Any] = {}
        self._loaded = False

    def register(self, *keys: str) -> Callable[[Any], Any]:
        """Decorator: makes the decorated object the entry of each of `keys` (a key taken by another is refused)."""

        def wrap(obj: Any) -> Any:
            for key in keys:
                if key in self._entries and self._entries[key] is not obj:
                    raise ValueError(f"two {self.what}s are registered for {key!r}.")
                self._entries[key] = obj
            return obj

        return wrap

    def entries(self) -> dict[str, Any]:
        """Every key (sorted) and its entry, once all the package's modules are imported."""
        if not self._loaded:
            for info in pkgutil.iter_modules(importlib.import_module(self.package).__path__):
                importlib.import_module(f"{self.package}.{info.name}")
            self._loaded = True
        return dict(sorted(self._entries.items()))
