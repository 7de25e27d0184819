"""Differences between two configs or two manifests: one readable line per config field, a row per
manifest leaf, or the recipe entries a relaunch must find unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from reprokit.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

# keys that differ between any two runs, so comparing them says nothing about the recipe
VOLATILE_KEYS = frozenset({"created", "run_id", "fingerprint"})


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


def manifest_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> pd.DataFrame:
    """Every leaf two manifests disagree on, as rows ``key`` (dotted path), ``a``, ``b``.

    Run id, creation time and fingerprint are left out (they always differ, or differ exactly
    when a row does). Packages are compared one by one (``environment.packages.numpy``); a key
    present in one manifest only has ``None`` on the other side.
    """
    import pandas as pd  # here: config.py imports this module, and pandas is slow to import

    flat_a, flat_b = flatten(a), flatten(b)
    rows = [(key, flat_a.get(key), flat_b.get(key)) for key in sorted(flat_a.keys() | flat_b.keys())
            if key.split(".")[0] not in VOLATILE_KEYS and flat_a.get(key) != flat_b.get(key)]
    return pd.DataFrame(rows, columns=["key", "a", "b"], dtype=object)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A manifest (or any JSON value) as ``{dotted.path: leaf}``, installed packages by name."""
    if prefix == "environment.packages" and isinstance(value, list):
        value = {name: version for name, _, version in (str(p).partition("==") for p in value)}
    if isinstance(value, Mapping) and value:
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list | tuple) and value:
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else key))
    return flat


# what must be equal for a relaunch to continue a user's run: the recipe, not how it is recorded
_RECIPE_KEYS = ("config", "seeding.seed", "seeding.sources", "seeding.deterministic", "seeding.threads",
                "code.commit", "code.diff_digest", "code.reprokit_source", "entry.script_digest",
                "entry.module", "entry.argv", "environment.python", "environment.torch",
                "environment.numpy", "environment.packages_digest", "distributed.world_size",
                "distributed.reduction", "distributed.backend", "distributed.micro_batches")


def recipe_differences(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every recipe entry of two script manifests that differs.

    ``entry.argv[0]`` (how the script was named on the command line) does not count.
    """
    flat_a, flat_b = flatten(stored), flatten(new)
    # in canonical mode the world size decides no bit (as in reprokit.provenance.fingerprint)
    canonical = flat_a.get("distributed.reduction") == flat_b.get("distributed.reduction") == "canonical"
    free = {"entry.argv.0", *(("distributed.world_size", "distributed.backend") if canonical else ())}
    out = []
    for key in sorted(flat_a.keys() | flat_b.keys()):
        if key in free or not any(key == k or key.startswith(f"{k}.") for k in _RECIPE_KEYS):
            continue
        if not _same(flat_a.get(key), flat_b.get(key)):
            out.append(f"{key}: {flat_a.get(key)!r} -> {flat_b.get(key)!r}")
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON kind, at every level: ``True``, ``1`` and ``1.0`` are three recipes
    (a forged or older manifest's field of another type is a difference, not a match)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return _kind(a) is _kind(b) and bool(a == b)


def _kind(value: Any) -> type:  # bool before int: a bool is an int; a str subclass (TorchVersion) a str
    return next((kind for kind in (bool, int, float, str) if isinstance(value, kind)), type(value))
