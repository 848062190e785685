"""Systems: one file per model family, registered under `config.model.name`.

A system file defines a `System` subclass decorated with `@register("name")`;
every module in this package is imported on first lookup, so adding a system
means adding one file here and one config in `configs/`.
"""

from __future__ import annotations

from vlm_jax.errors import ConfigError
from vlm_jax.models.base import System
from vlm_jax.registry import Registry

SYSTEMS = Registry(__name__, "system")
register = SYSTEMS.register  # class decorator: @register("name") makes a System buildable as model.name = name


def names() -> list[str]:
    """All registered system names."""
    return list(SYSTEMS.entries())


def get(name: str) -> type[System]:
    """The `System` class registered as `name`."""
    systems = SYSTEMS.entries()
    if name not in systems:
        raise ConfigError(f"model.name {name!r} is not a known system; known: {', '.join(systems)}.")
    return systems[name]


def build(config) -> System:
    """The system for a full config (uses `config.model` and `config.data`)."""
    return get(config.model.name)(config)
