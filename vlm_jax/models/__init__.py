"""Systems: one file per model family, registered under `config.model.name`.

A system file defines a `System` subclass decorated with `@register("name")`;
every module in this package is imported on first lookup, so adding a system
means adding one file here and one config in `configs/`.
"""

from __future__ import annotations

import importlib
import pkgutil

from vlm_jax.models.base import System

_REGISTRY: dict[str, type[System]] = {}
_LOADED = False


def register(name: str):
    """Class decorator: makes a `System` buildable as `config.model.name = name`."""

    def wrap(cls: type[System]) -> type[System]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"two systems are registered as {name!r}.")
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


def names() -> list[str]:
    """All registered system names."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[System]:
    """The `System` class registered as `name`."""
    from vlm_jax.errors import ConfigError

    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(f"model.name {name!r} is not a known system; known: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def build(config) -> System:
    """The system for a full config (uses `config.model` and `config.data`)."""
    return get(config.model.name)(config)
