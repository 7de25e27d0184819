"""Opening a run directory for :class:`reprokit.Run`: start it, or continue the run it holds.

Relaunch = resume: a directory holding an unfinished run of the same recipe (config, seeds,
threads, the user's code and script, reprokit's code, library versions) continues from its newest
checkpoint that verifies; another recipe is refused with the differences unless forced (then the
differences are logged in the manifest's ``resumes``); a finished run exits 0 saying so.

One writer at a time: the directory's :class:`~reprokit.runlock.RunLock` is taken before anything
is read or swept (under torchrun by rank 0 only) and held by the :class:`RunWriter` until it closes;
a second writer is refused naming the holder.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import xxhash
from torch import nn

from reprokit.checkpoint import (
    CHECKPOINTS,
    RNG_KEY,
    STATE_FILE,
    CheckpointError,
    CheckpointMeta,
    clean_temporaries,
)
from reprokit.checkpointreader import check_compatible, list_checkpoints, read_checkpoint
from reprokit.differences import config_differences, recipe_differences
from reprokit.digests import model_digest
from reprokit.distributed import RANK
from reprokit.entrypoint import code_root, entry_point
from reprokit.errors import ConfigError, ReprokitError
from reprokit.ledgerentry import LedgerEntry
from reprokit.overrides import Overrides
from reprokit.provenance import (
    check_parent,
    code_state,
    fingerprint,
    save_code_diff,
    script_manifest,
)
from reprokit.rundir import MANIFEST, RESULT, RunDirError, RunWriter, append_resume, read_json
from reprokit.runlock import RunLock, held
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

    def check_names(self, tracked: Collection[str]) -> None:
        """The relaunch tracks the objects the checkpoint holds, by name: a missing or extra one
        is an error naming it, never skipped."""
        saved_names = list(self.state[POSITION_KEY]["tracked"])
        missing = [n for n in saved_names if n not in tracked]
        extra = [n for n in tracked if n not in saved_names]
        if missing or extra:
            raise ResumeRefused(
                f"{self.checkpoint} holds tracked objects {saved_names}, this run tracks "
                f"{list(tracked)}: " + "; ".join(
                    [*(f"{n!r} is not tracked now" for n in missing),
                     *(f"{n!r} is not in the checkpoint" for n in extra)])
                + "; track the same objects under the same names as the run that wrote it")


def begin_differences(path: Path, stored: Mapping[str, Any], sources: Mapping[str, str],
                      described: Mapping[str, Any], *, force: bool) -> list[str]:
    """What changed since the run started that is known only when its data is (the data digests,
    the code of a built-in run's model/dataset factories); refused unless ``force``."""
    diffs = []
    recorded = _nested(path, stored, "data", "sources")
    if recorded and dict(recorded) != dict(sources):
        diffs += [f"data {k}: {recorded.get(k)} -> {sources.get(k)}" for k in sorted({*recorded, *sources})
                  if recorded.get(k) != sources.get(k)]
    data = described.get("data")
    if data is not None and _nested(path, stored, "data").get("digest") != data.get("digest"):
        diffs.append(f"data digest: {_nested(path, stored, 'data').get('digest')} -> {data.get('digest')}")
    then = {k: _nested(path, stored, "code", "factories", k).get("source_digest")
            for k in _nested(path, stored, "code", "factories")}
    now = {k: v.get("source_digest") for k, v in (described.get("factories") or {}).items()}
    if then != now:
        diffs.append(f"the model/dataset factory's code version: {then} -> {now}")
    if diffs and not force:
        raise ResumeRefused(f"resuming {str(path)!r} would change what the run computes: {'; '.join(diffs)}; "
                            "undo the change, or pass force=True (--force, REPROKIT_FORCE=1) to resume "
                            "anyway and have it recorded")
    return diffs


def _nested(path: Path, manifest: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """``manifest[k1][k2]...``, {} where a level is missing or null; a level that is not a JSON
    object (a forged manifest) is a RunDirError naming the field."""
    value: Any = manifest
    for depth, key in enumerate(keys):
        value = value.get(key) or {}
        if not isinstance(value, dict):
            raise RunDirError(f"{path / MANIFEST}: field {'.'.join(keys[:depth + 1])!r} is "
                              f"{repr(value)[:60]} ({type(value).__name__}); expected an object")
    return cast(dict[str, Any], value)


@dataclass
class Opened:
    manifest: dict[str, Any]
    # a relaunch's holds only the lock (RunWriter.holding) until settle() opens the files at its checkpoint
    writer: RunWriter | None
    ledger: LedgerEntry | None
    resumed: Resumed | None
    fresh: bool  # a new run (not a relaunch)
    differences: list[str]  # recipe changes accepted with force
    skipped: list[tuple[str, str]]  # checkpoints that did not verify, and why


KINDS = ("script", "builtin")
RESUME_POLICIES = ("auto", "never", "required")


def open_run_dir(path: Path, config: dict[str, Any], seeds: SeedRecord, settings: dict[str, Any],
                 env: Overrides, *, force: bool, kind: str = "script", resume: str = "auto",
                 ignore: frozenset[str] = frozenset(), ledger: bool = True,
                 distributed: Mapping[str, Any] | None = None) -> Opened:
    """Start a new run in ``path``, or continue (or refuse) the one it holds.

    ``kind="script"`` identifies a run by the user's script and checkout; ``"builtin"`` (reprokit's
    own trainer) by its config without the ``ignore`` fields and reprokit's code. ``resume``:
    ``"auto"`` continues an unfinished run and exits 0 on a finished one, ``"never"`` refuses a
    directory that holds a run, ``"required"`` refuses one that holds none. ``distributed`` (a
    torchrun rank's world, :mod:`reprokit.runworld`) is recorded; a relaunch at another world size
    is refused.
    """
    if kind not in KINDS or resume not in RESUME_POLICIES:
        raise ConfigError(f"kind {kind!r} / resume {resume!r}: pass one of {KINDS} / {RESUME_POLICIES}")
    lock = _writer_lock(path, resume)  # before any check or sweep: a second writer stops here
    try:
        return _open(path, lock, config, seeds, settings, env, force=force, kind=kind, resume=resume,
                     ignore=ignore, ledger=ledger, distributed=distributed)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _writer_lock(path: Path, resume: str) -> RunLock | None:
    """The run directory's lock, held by this process from now until its writer closes; None under
    torchrun on a rank other than 0 (rank 0 writes the directory and holds it for all)."""
    if os.environ.get(RANK, "0") != "0":
        return None
    if resume == "required" and not path.is_dir():
        return None  # refused below, without creating the directory for it
    return RunLock(path).acquire()


def _open(path: Path, lock: RunLock | None, config: dict[str, Any], seeds: SeedRecord,
          settings: dict[str, Any], env: Overrides, *, force: bool, kind: str, resume: str,
          ignore: frozenset[str], ledger: bool, distributed: Mapping[str, Any] | None = None) -> Opened:
    entry = entry_point()
    code = code_state(code_root(entry)) if kind == "script" else code_state()
    new = script_manifest(config, seeds, code=code, entry=entry.to_dict(), settings=settings,
                          overrides=env.to_dict(), kind=kind, recording=ignore)
    new.update({"distributed": dict(distributed)} if distributed is not None else {})
    if not (path / MANIFEST).is_file():
        if resume == "required":
            raise ResumeRefused(f"{str(path)!r} holds no run to resume (no {MANIFEST}); train it first")
        writer = RunWriter(path, new, lock=lock)
        try:
            save_code_diff(path, code)
        except BaseException:
            writer.close()
            raise
        # the ledger row is started when the run begins, with the data and the parent known
        return Opened(new, writer, None, None, fresh=True, differences=[], skipped=[])
    if resume == "never":
        raise RunDirError(f"run directory {str(path)!r} already holds a run (it has {MANIFEST}); pass a new "
                          "--run-dir, delete the old one, or `reprokit resume` it")
    stored = read_json(path, MANIFEST)
    if (path / RESULT).is_file():
        if resume == "required":
            raise ResumeRefused(f"run {str(path)!r} already finished ({RESULT} exists); nothing to resume")
        result = read_json(path, RESULT)
        message = (f"reprokit: run {str(path)!r} already finished (final digest "
                   f"{result.get('final_digest')}); nothing to do. Pass a new run directory to train again.")
        print(message, file=sys.stderr, flush=True)
        raise RunFinished(message)
    if stored.get("kind", "builtin") != kind:
        raise ResumeRefused(f"{str(path)!r} holds a run of {stored.get('kind', 'builtin')!r} kind, not of "
                            f"{kind!r}; continue it the way it was started, or pass a new run directory")
    _check_world_size(path, stored, distributed or {})
    diffs = recipe_differences(stored, new) if kind == "script" else builtin_differences(stored, new, ignore)
    if diffs and not force and kind == "builtin":
        raise ResumeRefused(
            f"resuming {str(path)!r} would change what the run computes: {'; '.join(diffs)}; undo the "
            "change, or pass force=True (--force) to resume anyway and have it recorded")
    if diffs and not force:
        raise ResumeRefused(
            f"{str(path)!r} holds an unfinished run of another recipe: {'; '.join(diffs)}; undo the change, "
            "pass a new run directory, or pass force=True (REPROKIT_FORCE=1) to resume anyway (recorded)")
    clean_temporaries(path)
    chosen, skipped = newest_valid(path, config=stored["config"], ignore=ignore)
    entry_row = LedgerEntry.open(path, stored, resumed=True) if ledger else None
    resumed = Resumed(chosen[0], chosen[1], chosen[2], skipped, stored, force) if chosen else None
    # the writer cuts the run's files back to the checkpoint's sizes once the checkpoint is settled
    # (a checkpoint of another architecture is passed over when the model is known, at begin); until
    # then a writer with no file open holds the lock
    return Opened(stored, RunWriter.holding(path, lock), entry_row, resumed, fresh=False, differences=diffs,
                  skipped=skipped)


def _check_world_size(path: Path, stored: Mapping[str, Any], distributed: Mapping[str, Any]) -> None:
    """A relaunch at another world size continues a run in reduction mode "canonical" (its bits do
    not depend on the world size; ranks new to the run take rank 0's state) and is refused in
    mode "ddp", whose bits do."""
    before = _nested(path, stored, "distributed")
    then, now = before.get("world_size", 1), distributed.get("world_size", 1)
    if then != now and not before.get("reduction") == distributed.get("reduction") == "canonical":
        raise ResumeRefused(
            f"{str(path)!r} was run at world size {then}, this launch has world size {now}: in reduction "
            "mode 'ddp' the bits depend on the world size, so it resumes at that one only; relaunch it with "
            f"torchrun --nproc-per-node {then} (a run in reduction='canonical' resumes at any valid world "
            "size)")


def fitting(path: Path, chosen: _Chosen | None, architecture: Mapping[str, Any], *, config: Mapping[str, Any],
            ignore: frozenset[str], skipped: list[tuple[str, str]]) -> _Chosen | None:
    """``chosen`` or the newest older checkpoint whose model has ``architecture`` (name -> [dtype,
    shape]); what is passed over goes to ``skipped``."""
    while chosen is not None:
        try:
            check_compatible(chosen[0], path / CHECKPOINTS / chosen[2], config=config,
                             model_state=None, layout=architecture, ignore=ignore)
            return chosen
        except CheckpointError as e:
            skipped.append((chosen[2], str(e)))
        chosen, more = newest_valid(path, below=chosen[0].step, config=config, ignore=ignore)
        skipped.extend(more)
    return None


def settle(path: Path, resumed: Resumed | None, architecture: Mapping[str, Any], *, ignore: frozenset[str],
           differences: list[str], skipped: list[tuple[str, str]], threads: int, world_size: int = 1
           ) -> tuple[Resumed | None, RunWriter]:
    """The checkpoint a relaunch continues from, now that the model is known: the newest that
    verifies and fits its architecture (or none: start over). Opens the writer there and logs the
    resume in the manifest."""
    stored = resumed.stored if resumed is not None else read_json(path, MANIFEST)
    if resumed is not None:
        first = (resumed.meta, resumed.state, resumed.checkpoint)
        chosen = fitting(path, first, architecture, config=stored["config"], ignore=ignore, skipped=skipped)
        resumed = Resumed(chosen[0], chosen[1], chosen[2], skipped, stored, resumed.force) if chosen else None
    # the lock open_run_dir took passes to the writer (rank 0 only; a closed holder: taken again)
    lock = None if os.environ.get(RANK, "0") != "0" else held(path) or RunLock(path).acquire()
    writer = RunWriter(path, stored, truncate_to=resumed.meta.run_files if resumed else {}, lock=lock)
    append_resume(path, {
        "at": _now(), "checkpoint": resumed.checkpoint if resumed else None,
        "from_step": resumed.meta.step if resumed else 0, "skipped": [list(s) for s in skipped],
        "forced": bool(differences), "differences": differences, "threads": threads,
        **({"world_size": world_size} if world_size > 1 or "distributed" in stored else {}),
    })
    for name, why in skipped:
        print(f"reprokit: skipped {name}: {why}", file=sys.stderr, flush=True)
    where = f"{resumed.checkpoint} (step {resumed.meta.step})" if resumed else "step 0 (no checkpoint fits)"
    print(f"reprokit: resuming {str(path)!r} from {where}", file=sys.stderr, flush=True)
    return resumed, writer


def builtin_differences(
    stored: Mapping[str, Any], new: Mapping[str, Any], ignore: frozenset[str]
) -> list[str]:
    """A built-in run's recipe changes: config fields (not how the run is recorded) and reprokit's code."""
    diffs = config_differences(stored.get("config") or {}, new.get("config") or {}, ignore=ignore)
    then = (stored.get("code") or {}).get("reprokit_source")
    now = (new.get("code") or {}).get("reprokit_source")
    if then != now:
        diffs.append(f"reprokit code version: {then} -> {now}")
    return diffs


_Chosen = tuple[CheckpointMeta, dict[str, Any], str]  # meta, state, checkpoint name


def newest_valid(path: Path, *, below: int | None = None, config: Mapping[str, Any] | None = None,
                 ignore: frozenset[str] = frozenset()) -> tuple[_Chosen | None, list[tuple[str, str]]]:
    """The newest checkpoint (older than step ``below``) that verifies, was written by a Run and,
    with ``config``, for that config (the ``ignore`` fields aside), and the ones passed over with why."""
    skipped: list[tuple[str, str]] = []
    for ckpt in list_checkpoints(path):
        if below is not None and int(ckpt.name.split("-")[-1]) >= below:
            continue
        try:
            meta, state = read_checkpoint(ckpt)
            if config is not None:
                check_compatible(meta, ckpt, config=config, model_state=None, ignore=ignore)
        except CheckpointError as e:
            skipped.append((ckpt.name, str(e)))
            continue
        if POSITION_KEY not in state or TRACKED_KEY not in state or RNG_KEY not in state:
            skipped.append((ckpt.name, "not written by reprokit.Run (no position or tracked state)"))
            continue
        problem = _position_problem(state)
        if problem is not None:
            skipped.append((ckpt.name, f"{ckpt / STATE_FILE}: {problem}; the checkpoint is damaged"))
            continue
        return (meta, state, ckpt.name), skipped
    return None, skipped


def _position_problem(state: Mapping[str, Any]) -> str | None:
    """What is wrong with a checkpoint's position and tracked state, if anything (their types)."""
    position, tracked = state[POSITION_KEY], state[TRACKED_KEY]
    if not isinstance(position, dict) or not isinstance(tracked, dict):
        return f"position {type(position).__name__} / tracked {type(tracked).__name__}, expected dicts"
    for key, kind in (("tracked", list), ("modules", list), ("loaders", dict)):
        if not isinstance(position.get(key), kind):
            return f"position[{key!r}] is {repr(position.get(key))[:60]}, expected a {kind.__name__}"
    names = [*position["tracked"], *position["modules"], *position["loaders"]]
    if not all(isinstance(n, str) for n in names):
        return f"position names {names[:5]} are not all strings"
    return None


def record_begin(writer: RunWriter, manifest: dict[str, Any], sources: dict[str, str],
                 tracked: dict[str, str], described: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest completed before the first step: data digests (or the data entry a client
    described), the parent, the factories, the tracked objects and the fingerprint."""
    h = xxhash.xxh3_128()
    for key in sorted(sources):
        h.update(f"{key}={sources[key]}\n".encode())
    data = described.get("data")
    data = dict(data) if data is not None else {"digest": h.hexdigest() if sources else None}
    data["sources"] = sources
    manifest = {**manifest, "data": data, "tracked": tracked,
                "lineage": {"parent": check_parent(described.get("parent"))}}
    if described.get("factories"):
        manifest["code"] = {**manifest["code"], "factories": dict(described["factories"])}
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
        _load(path, *next(iter(modules.items())), model_state)
    else:
        for name, module in modules.items():
            prefix = f"{name}."
            _load(path, name, module, {k.removeprefix(prefix): v for k, v in model_state.items()
                                       if k.startswith(prefix)})
    for name, obj in tracked.items():
        if not isinstance(obj, nn.Module):
            if not isinstance(others, dict) or name not in others:
                raise CheckpointError(f"{path}: holds no state for the tracked object {name!r}")
            _load(path, name, obj, others[name])
    state = next(iter(modules.values())).state_dict() if len(modules) == 1 else {
        f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    if model_digest(state) != meta.model_digest:
        raise CheckpointError(f"{path}: the loaded weights do not match the digest the checkpoint recorded")


def _load(path: Path, name: str, obj: Any, state: Any) -> None:
    try:
        obj.load_state_dict(state)
    except Exception as e:  # a damaged or forged state: what load_state_dict raises varies with it
        raise CheckpointError(f"{path}: the state of {name!r} does not load into it "
                              f"({type(e).__name__}: {str(e).strip()[:200]})") from e


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
