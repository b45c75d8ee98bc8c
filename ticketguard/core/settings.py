"""Settings fields that carry their own help: a settings dataclass states each setting once, and the command
line (``ticketguard.cli.settings``) is generated from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, field
from typing import Any


def setting(
    default: Any = MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    metavar: str | None = None,
    percent: bool = False,
) -> Any:
    """A dataclass field with its one-line ``help``; ``factory`` makes a fresh default for each instance, as
    ``default_factory`` does, ``metavar`` names the value in help texts, and ``percent`` says the field holds a
    fraction that people read and give in percent."""
    metadata = {"help": help, "metavar": metavar, "percent": percent}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)

