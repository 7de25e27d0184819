"""Provenance: what produced a run, written to manifest.json before the first step.

The manifest records the config, every seeding knob, the data, the environment (versions, CPU,
threads, environment variables, installed packages), the code (git commit, branch, dirty diff)
and the lineage (the parent model a fine-tune starts from). Its ``fingerprint`` is one digest
over what decides the bits (config, code, data, environment, parent), so "same recipe?" is one
equality, and :func:`reprokit.differences.manifest_differences` says why two runs are not the same
recipe. The code entry comes from :mod:`reprokit.checkout`, whose names are re-exported here.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import re
import sys
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xxhash

from reprokit import __version__, untrusted
from reprokit.checkout import CODE_DIFF as CODE_DIFF
from reprokit.checkout import NOT_A_CHECKOUT as NOT_A_CHECKOUT
from reprokit.checkout import CodeState as CodeState
from reprokit.checkout import code_state as code_state
from reprokit.checkout import save_code_diff as save_code_diff
from reprokit.differences import flatten
from reprokit.digests import source_digest, tensor_digest
from reprokit.errors import ConfigError, ReprokitError
from reprokit.seeding import SeedRecord, capture_rng_state

MANIFEST_VERSION = 2
# environment variables that change the bits or which device runs; REPROKIT_* are added by prefix
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED",
            "CUDA_VISIBLE_DEVICES")
# environment entries that can change the bits; variables are left out because REPROKIT_PROGRESS
# or REPROKIT_LEDGER differ between machines without changing a bit
_FINGERPRINT_ENVIRONMENT = ("python", "torch", "torchvision", "numpy", "platform", "cpu", "threads",
                            "interop_threads", "packages_digest")


class ProvenanceError(ReprokitError, ValueError):
    """A manifest or a lineage entry is missing something it needs."""


@functools.cache
def installed_packages() -> tuple[str, ...]:
    """``name==version`` of every installed distribution, names normalised (PEP 503), sorted.
    Cached: the scan reads every distribution's metadata, and a reinstall would not change the
    modules already imported."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # a broken install can leave metadata without a name
            found.add(f"{re.sub(r'[-_.]+', '-', name).lower()}=={dist.version}")
    return tuple(sorted(found))


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else ``platform.processor()``, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Versions, platform, CPU, threads, relevant environment variables and installed packages."""
    packages = installed_packages()
    try:
        torchvision: str | None = importlib.metadata.version("torchvision")  # no import: it is slow
    except importlib.metadata.PackageNotFoundError:
        torchvision = None
    return {
        "python": sys.version.split()[0],
        "reprokit": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "variables": {k: v for k, v in sorted(os.environ.items())
                      if k in ENV_VARS or k.startswith("REPROKIT_")},
        "packages": list(packages),
        "packages_digest": xxhash.xxh3_128_hexdigest("\n".join(packages).encode()),
    }


def build_manifest(
    config: Any,
    seeds: SeedRecord,
    data: Any,
    *,
    parent: Mapping[str, Any] | None = None,
    repo_dir: Path | None = None,
    code: CodeState | None = None,
    factories: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a run about to start; call it right before the first step.

    Args:
        config: the run's config: a mapping, or an object with ``to_dict()`` (a TrainConfig, whose
            ``recording_fields()`` — fields that change no bit — the fingerprint leaves out).
        seeds: what seeding set.
        data: the manifest's data entry (a mapping with a ``digest``), or a dataset bundle with
            ``name``, ``task``, ``x_train``, ``x_val`` and ``digest`` (the built-in data).
        parent: the model this run starts from, ``{"digest": ..., "run_id": ...}`` (run_id and
            further keys optional); ``None`` when training from scratch.
        repo_dir: where to look for the git checkout (see :func:`code_state`).
        code: a :func:`code_state` taken by the caller, who then saves its diff with
            :func:`save_code_diff`: one look at the checkout, so manifest and ``code.diff`` agree.
        factories: the user's model/dataset factories the config names, with their source digests.
    """
    if code is not None and repo_dir is not None:
        raise ProvenanceError(
            f"build_manifest got both code and repo_dir={str(repo_dir)!r}; pass only code, which "
            "already names its checkout"
        )
    code = code if code is not None else code_state(repo_dir)
    config_dict = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    check_recordable(config_dict)
    recording = config.recording_fields() if hasattr(config, "recording_fields") else frozenset()
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "run_id": uuid.uuid4().hex,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config_dict,
        "recording_fields": sorted(recording),
        "seeding": seeds.to_dict(),
        # the global RNGs as the run starts (in train: after seeding and model initialisation)
        "rng_state_digest": _rng_state_digest(),
        "data": data_entry(data, config_dict),
        "environment": environment(),
        "code": {**code.to_dict(), "reprokit_source": source_digest(),
                 **({"factories": dict(factories)} if factories else {})},
        "lineage": {"parent": check_parent(parent)},
    }
    manifest["fingerprint"] = fingerprint(manifest)
    return manifest


def check_recordable(config: Mapping[str, Any]) -> None:
    """Refuse (ConfigError) a config that JSON could hold but reprokit could not read back from the
    manifest: a key that is not a str, nesting deeper than the manifest's readers take
    (:data:`reprokit.untrusted.MAX_JSON_DEPTH`, the manifest itself being one level), or an int of
    more digits than Python converts (``sys.get_int_max_str_digits()``)."""
    limit = untrusted.MAX_JSON_DEPTH - 1
    stack: list[tuple[tuple[Any, ...], Any]] = [((), config)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, Mapping | list | tuple):
            if len(path) >= limit:
                raise ConfigError(f"{_where(path)} is nested {len(path) + 1} levels deep, deeper than the "
                                  f"{limit} a manifest holds; flatten the config")
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            for key, item in items:
                if isinstance(value, Mapping) and not isinstance(key, str):
                    raise ConfigError(f"{_where(path)} has the key {key!r} ({type(key).__name__}); a "
                                      "manifest's keys are strings: pass str keys")
                stack.append(((*path, key), item))
        elif isinstance(value, int) and not isinstance(value, bool) and not _printable(value):
            raise ConfigError(f"{_where(path)} is an int of {value.bit_length()} bits, more than the "
                              f"{sys.get_int_max_str_digits()} digits JSON readers convert; record it as "
                              "a str")


def _where(path: tuple[Any, ...]) -> str:  # config['a'][0]: the first levels of a config entry
    shown = "".join(f"[{k}]" if isinstance(k, int) else f"[{str(k)[:40]!r}]" for k in path[:4])
    return f"config{shown}{'...' if len(path) > 4 else ''}"


def _printable(value: int) -> bool:
    try:
        str(value)
    except ValueError:  # https://docs.python.org/3/library/stdtypes.html#int-max-str-digits
        return False
    return True


def data_entry(data: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(data, Mapping):
        return dict(data)
    return {
        "name": data.name,
        "task": data.task,
        "split": {"split_seed": config.get("split_seed"), "val_fraction": config.get("val_fraction")},
        "train_size": len(data.x_train),
        "val_size": len(data.x_val),
        "digest": data.digest,
    }


def check_parent(parent: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if parent is None:
        return None
    if not isinstance(parent, Mapping) or not isinstance(parent.get("digest"), str):
        raise ProvenanceError(
            f"parent {parent!r} has no 'digest' string; pass {{'digest': model_digest(parent_state), "
            "'run_id': parent_run_id}"
        )
    try:
        json.dumps(dict(parent))
    except (TypeError, ValueError) as e:
        raise ProvenanceError(
            f"parent {parent!r} is not JSON-serialisable ({e}); pass strings and numbers"
        ) from e
    return dict(parent)


def _rng_state_digest() -> str:
    h = xxhash.xxh3_128()

    def feed(path: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                feed(f"{path}.{key}", value[key])
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                feed(f"{path}.{i}", item)
        elif isinstance(value, torch.Tensor):
            h.update(tensor_digest(path, value).encode())
        else:
            h.update(f"{path}={value!r}\n".encode())

    feed("rng", capture_rng_state().to_dict())
    return h.hexdigest()


def fingerprint(manifest: Mapping[str, Any]) -> str:
    """One xxh3-128 digest over what decides a run's bits: equal fingerprints, same recipe.

    Covered: the config without its recording fields (checkpoint and evaluation cadence change no
    bit), the seeding record, the code (commit, diff digest, reprokit's source digest), the data
    digest, the environment entries in ``_FINGERPRINT_ENVIRONMENT``, the parent's digest, and under
    torchrun the world size, reduction and backend (in canonical mode the reduction and the
    micro-batch count, at any world size).
    Left out: run id, timestamps, branch, untracked-file count and environment variables.
    """
    try:
        env, code = manifest["environment"], manifest["code"]
        parent = manifest["lineage"]["parent"]
        recipe = {
            "config": {k: v for k, v in manifest["config"].items()
                       if k not in manifest.get("recording_fields", ())},
            "seeding": manifest["seeding"],
            "code": {k: code.get(k) for k in ("commit", "diff_digest", "reprokit_source", "factories")},
            "data": manifest["data"]["digest"],
            "environment": {k: env.get(k) for k in _FINGERPRINT_ENVIRONMENT},
            "parent": parent["digest"] if parent else None,
        }
        distributed = manifest.get("distributed")
        if distributed:  # under torchrun the world size and the reduction decide the bits too
            # canonical mode: the micro-batch count does, the world size does not
            keys = (("reduction", "micro_batches") if distributed.get("reduction") == "canonical"
                    else ("world_size", "reduction", "backend"))
            recipe["distributed"] = {k: distributed.get(k) for k in keys}
    except (KeyError, TypeError, AttributeError) as e:
        raise ProvenanceError(
            f"manifest has no {e} entry, so it has no fingerprint; it predates manifest version "
            f"{MANIFEST_VERSION}: rerun with this reprokit to get a full manifest"
        ) from e
    return xxhash.xxh3_128_hexdigest(json.dumps(recipe, sort_keys=True).encode())


def manifest_table(manifest: Mapping[str, Any]) -> pd.DataFrame:
    """A manifest to read rather than parse: rows ``section``, ``field``, ``value``, one per leaf,
    with the package list summarised by its count and digest (``manifest_differences`` lists
    packages one by one when two manifests disagree)."""
    rows = []
    for key, value in flatten(manifest).items():
        section, _, name = key.partition(".")
        if key.startswith("environment.packages."):
            continue
        rows.append((section, name or section, value))
    packages = (manifest.get("environment") or {}).get("packages")
    if isinstance(packages, list):
        rows.append(("environment", "packages", f"{len(packages)} installed (digest below)"))
    order = {s: i for i, s in enumerate(("run_id", "fingerprint", "created", "config", "seeding", "data",
                                         "code", "environment", "lineage"))}
    rows.sort(key=lambda r: (order.get(r[0], len(order)), r[1]))
    return pd.DataFrame(rows, columns=["section", "field", "value"], dtype=object)


def script_manifest(
    config: Mapping[str, Any],
    seeds: SeedRecord,
    *,
    code: CodeState,
    entry: Mapping[str, Any],
    settings: Mapping[str, Any],
    overrides: Mapping[str, Any],
    kind: str = "script",
    recording: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The manifest of a run of a user's own loop (``reprokit.Run``), before its data is known.

    ``config`` is the user's (any JSON mapping), ``code`` the checkout holding the entry script,
    ``entry`` how the process was started, ``settings`` how the run is recorded (digests, trace,
    checkpoints: they change no bit) and ``overrides`` the ``REPROKIT_*`` variables in force. The
    data section and the tracked objects are added before the first step, with the fingerprint.
    """
    check_recordable(config)
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "kind": kind,
        "run_id": uuid.uuid4().hex,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": dict(config),
        "recording_fields": sorted(recording),
        "settings": dict(settings),
        "seeding": seeds.to_dict(),
        "rng_state_digest": _rng_state_digest(),
        "data": {"digest": None, "sources": {}},
        "environment": environment(),
        "code": {**code.to_dict(), "reprokit_source": source_digest(), "reprokit_version": __version__},
        "entry": dict(entry),
        "overrides": dict(overrides),
        "lineage": {"parent": None},
    }
    manifest["fingerprint"] = fingerprint(manifest)
    return manifest
