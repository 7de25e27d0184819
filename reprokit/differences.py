"""Differences between two config mappings, one readable line per field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reprokit.errors import ConfigError


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], *,
                       ignore: frozenset[str] = frozenset()) -> list[str]:
    """``"field: a -> b"`` for every field two config mappings disagree on, ``ignore`` left out.
    A config that is not a mapping (a forged manifest's or checkpoint's) is a ConfigError."""
    for side, config in (("first", a), ("second", b)):
        if not isinstance(config, Mapping):
            raise ConfigError(f"the {side} config is {str(config)[:60]!r} ({type(config).__name__}), not a "
                              "mapping of field names to values; the run directory it came from is damaged")
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]
