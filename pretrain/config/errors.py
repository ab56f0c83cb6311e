"""One-line configuration errors and the checks that raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration: the message is one line and names the field."""


def require(cond: bool, name: str, msg: str) -> None:
    """Raise ``ConfigError("<name>: <msg>")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def require_choice(value: str, name: str, choices: set | tuple) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is one of ``choices``."""
    require(value in choices, name, f"{value!r} is not one of {sorted(choices)}")
