"""Differences between two config mappings, one readable line per field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], *,
                       ignore: frozenset[str] = frozenset()) -> list[str]:
    """``"field: a -> b"`` for every field two config mappings disagree on, ``ignore`` left out."""
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]
