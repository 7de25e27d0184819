"""Opening a run directory for :class:`reprokit.Run`: start it, or continue the run it holds.

Relaunch = resume: a directory holding an unfinished run of the same recipe (config, seeds,
threads, the user's code and script, reprokit's code, library versions) continues from its newest
checkpoint that verifies; another recipe is refused with the differences unless forced (then the
differences are logged in the manifest's ``resumes``); a finished run exits 0 saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn

from reprokit.checkpoint import (
    RNG_KEY,
    CheckpointError,
    CheckpointMeta,
    architecture,
    clean_temporaries,
    list_checkpoints,
    read_checkpoint,
)
from reprokit.digests import model_digest
from reprokit.entrypoint import code_root, entry_point
from reprokit.errors import ConfigError, ReprokitError
from reprokit.ledger import LedgerEntry
from reprokit.overrides import Overrides
from reprokit.provenance import code_state, fingerprint, recipe_differences, save_code_diff, script_manifest
from reprokit.rundir import MANIFEST, RESULT, RunWriter, append_resume, read_json
from reprokit.seeding import SeedRecord

TRACKED_KEY = "tracked"  # state.pt: the tracked objects that are not modules, by name
POSITION_KEY = "position"  # state.pt: loader positions, the module and tracked names


class ResumeRefused(ReprokitError):
    """A run directory holds a run that this process must not continue as asked."""


class RunFinished(SystemExit):
    """Raised by ``Run(...)`` on a run directory whose run already finished: exit status 0."""

    def __init__(self, message: str) -> None:
        super().__init__(0)
        self.message = message


@dataclass
class Resumed:
    """The checkpoint a relaunch continues from."""

    meta: CheckpointMeta
    state: dict[str, Any]
    checkpoint: str
    skipped: list[tuple[str, str]]
    stored: dict[str, Any]  # the manifest as first written
    force: bool

    def check_begin(self, run: Any, sources: Mapping[str, str]) -> None:
        """Before the first resumed step: the same data and the same tracked names and shapes."""
        recorded = (self.stored.get("data") or {}).get("sources") or {}
        if recorded and dict(recorded) != dict(sources):
            diffs = [f"{k}: {recorded.get(k)} -> {sources.get(k)}" for k in sorted({*recorded, *sources})
                     if recorded.get(k) != sources.get(k)]
            if not self.force:
                raise ResumeRefused(f"resuming {str(run.path)!r}: the data changed ({'; '.join(diffs)}); "
                                    "restore the data, or pass force=True (REPROKIT_FORCE=1) to resume "
                                    "anyway")
            append_resume(run.path, {"at": _now(), "forced": True, "differences": diffs})
        saved_names = list(self.state["position"]["tracked"])
        missing = [n for n in saved_names if n not in run._tracked]
        extra = [n for n in run._tracked if n not in saved_names]
        if missing or extra:
            raise ResumeRefused(
                f"{self.checkpoint} holds tracked objects {saved_names}, this run tracks "
                f"{list(run._tracked)}: " + "; ".join(
                    [*(f"{n!r} is not tracked now" for n in missing),
                     *(f"{n!r} is not in the checkpoint" for n in extra)])
                + "; track the same objects under the same names as the run that wrote it")
        have = architecture(run._module_state())
        if have != self.meta.architecture:
            recorded_arch = self.meta.architecture
            names = sorted(n for n in {*have, *recorded_arch} if have.get(n) != recorded_arch.get(n))
            shown = ", ".join(f"{n} (checkpoint {self.meta.architecture.get(n)}, model {have.get(n)})"
                              for n in names[:3])
            raise ResumeRefused(f"{self.checkpoint}: the tracked model differs from the one the checkpoint "
                                f"holds in {len(names)} tensor(s): {shown}")


@dataclass
class Opened:
    manifest: dict[str, Any]
    writer: RunWriter
    ledger: LedgerEntry | None
    resumed: Resumed | None
    fresh: bool  # a new run (not a relaunch)


def open_run_dir(path: Path, config: dict[str, Any], seeds: SeedRecord, settings: dict[str, Any],
                 env: Overrides, *, force: bool) -> Opened:
    """Start a new run in ``path``, or continue (or refuse) the one it holds."""
    entry = entry_point()
    code = code_state(code_root(entry))
    new = script_manifest(config, seeds, code=code, entry=entry.to_dict(), settings=settings,
                          overrides=env.to_dict())
    if not (path / MANIFEST).is_file():
        writer = RunWriter(path, new)
        save_code_diff(path, code)
        return Opened(new, writer, LedgerEntry.open(path, new), None, fresh=True)
    stored = read_json(path, MANIFEST)
    if (path / RESULT).is_file():
        result = read_json(path, RESULT)
        message = (f"reprokit: run {str(path)!r} already finished (final digest "
                   f"{result.get('final_digest')}); nothing to do. Pass a new run directory to train again.")
        print(message, file=sys.stderr, flush=True)
        raise RunFinished(message)
    if stored.get("kind") != "script":
        raise ResumeRefused(f"{str(path)!r} holds a run of reprokit's built-in trainer, not of a script; "
                            "continue it with `reprokit resume`, or pass a new run directory")
    diffs = recipe_differences(stored, new)
    if diffs and not force:
        raise ResumeRefused(
            f"{str(path)!r} holds an unfinished run of another recipe: {'; '.join(diffs)}; undo the change, "
            "pass a new run directory, or pass force=True (REPROKIT_FORCE=1) to resume anyway (recorded)")
    clean_temporaries(path)
    chosen, skipped = _newest_valid(path)
    writer = RunWriter(path, stored, truncate_to=chosen[0].run_files if chosen else {})
    append_resume(path, {
        "at": _now(), "checkpoint": chosen[2] if chosen else None,
        "from_step": chosen[0].step if chosen else 0, "skipped": [list(s) for s in skipped],
        "forced": bool(diffs), "differences": diffs, "threads": seeds.threads,
    })
    for name, why in skipped:
        print(f"reprokit: skipped {name}: {why}", file=sys.stderr, flush=True)
    where = f"{chosen[2]} (step {chosen[0].step})" if chosen else "step 0 (no checkpoint verifies)"
    print(f"reprokit: resuming {str(path)!r} from {where}", file=sys.stderr, flush=True)
    ledger = LedgerEntry.open(path, stored, resumed=True)
    resumed = Resumed(chosen[0], chosen[1], chosen[2], skipped, stored, force) if chosen else None
    return Opened(stored, writer, ledger, resumed, fresh=False)


_Chosen = tuple[CheckpointMeta, dict[str, Any], str]  # meta, state, checkpoint name


def _newest_valid(path: Path) -> tuple[_Chosen | None, list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    for ckpt in list_checkpoints(path):
        try:
            meta, state = read_checkpoint(ckpt)
        except CheckpointError as e:
            skipped.append((ckpt.name, str(e)))
            continue
        if POSITION_KEY not in state or TRACKED_KEY not in state or RNG_KEY not in state:
            skipped.append((ckpt.name, "not written by reprokit.Run (no position or tracked state)"))
            continue
        return (meta, state, ckpt.name), skipped
    return None, skipped


def record_begin(writer: RunWriter, manifest: dict[str, Any], sources: dict[str, str],
                 tracked: dict[str, str]) -> dict[str, Any]:
    """The manifest completed before the first step: data digests, tracked objects, fingerprint."""
    h = xxhash.xxh3_128()
    for key in sorted(sources):
        h.update(f"{key}={sources[key]}\n".encode())
    manifest = {**manifest, "data": {"digest": h.hexdigest() if sources else None, "sources": sources},
                "tracked": tracked}
    manifest["fingerprint"] = fingerprint(manifest)
    writer.rewrite_manifest(manifest)
    return manifest


def restore_tracked(tracked: dict[str, Any], model_state: dict[str, torch.Tensor], others: dict[str, Any],
                    module_names: list[str], meta: CheckpointMeta, path: Path) -> None:
    """Load every tracked object's state from a checkpoint, by name, and check the weights' digest."""
    modules = {n: o for n, o in tracked.items() if isinstance(o, nn.Module)}
    if list(modules) != list(module_names):
        raise ResumeRefused(f"the checkpoint holds modules {module_names}, this run tracks {list(modules)}")
    if len(modules) == 1:
        next(iter(modules.values())).load_state_dict(model_state)
    else:
        for name, module in modules.items():
            prefix = f"{name}."
            module.load_state_dict({k.removeprefix(prefix): v for k, v in model_state.items()
                                    if k.startswith(prefix)})
    for name, obj in tracked.items():
        if not isinstance(obj, nn.Module):
            obj.load_state_dict(others[name])
    state = next(iter(modules.values())).state_dict() if len(modules) == 1 else {
        f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    if model_digest(state) != meta.model_digest:
        raise CheckpointError(f"{path}: the loaded weights do not match the digest the checkpoint recorded")


def config_mapping(config: Any) -> dict[str, Any]:
    """A user's config as a JSON-ready dict: a mapping, a dataclass or an ``argparse.Namespace``."""
    if config is None:
        return {}
    if isinstance(config, argparse.Namespace):
        raw: Any = vars(config)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        raw = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raise ConfigError(f"config of type {type(config).__name__} is not a mapping, dataclass or "
                          "argparse.Namespace; pass config=vars(args) or a dict")
    return {str(k): _jsonable(f"config[{k!r}]", v) for k, v in raw.items()}


def _jsonable(where: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, Path | torch.device | torch.dtype):
        return str(value)
    if isinstance(value, enum.Enum):
        return _jsonable(where, value.value)
    if isinstance(value, list | tuple):
        return [_jsonable(f"{where}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(f"{where}[{k!r}]", v) for k, v in value.items()}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} = {value!r} ({type(value).__name__}) cannot be recorded in the manifest; "
                          "pass numbers, strings, booleans, lists or dicts") from None
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
