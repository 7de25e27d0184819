"""Distributed checkpoints through torch.distributed.checkpoint (DCP), verified before DCP reads a byte.

    ROOT/step-0000020/__R_N.distcp, .metadata  rank R's shards and DCP's plan (a pickle), by dcp.save
    ROOT/step-0000020/contents.json            size + xxh3-128 per file; step, world size, recipe; own digest
    ROOT/latest                                the commit point: the newest committed folder's name

Why: DCP checks no content (a flipped bit can load silently as another state), unpickles ``.metadata``,
overwrites by default (a crash while re-saving leaves a torn folder that loads), and raises
``CheckpointException``, a ``BaseException`` (torch/distributed/checkpoint/filesystem.py, api.py).
Rank 0 decides what to write and what to load and broadcasts it: all ranks agree or all raise.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, overload

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint import state_dict_loader
from torch.distributed.checkpoint import state_dict_saver as saver
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from reprokit.checkpoint import CheckpointError
from reprokit.digests import combine_digests, tensor_digest
from reprokit.errors import ConfigError
from reprokit.faults import kill_self
from reprokit.fsio import file_digest
from reprokit.rundir import _fsync_dir, atomic_write_bytes

CONTENTS = "contents.json"
LATEST = "latest"
METADATA = ".metadata"  # DCP's name for the plan (filesystem._metadata_fn)
MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"  # keys of model_state(): writer and reader cannot disagree
FORMAT_VERSION = 1
# integrity, not authorship: whoever can rewrite a shard can rewrite contents.json too, so a cryptographic
ALGORITHM = "xxh3_128"  # digest would only be slower; fsio.file_digest hashes at memory speed
CRASH_ENV = "REPROKIT_DCP_CRASH"  # fault injection: SIGKILL at one of CRASH_POINTS of every save
CRASH_POINTS = ("after-save", "after-contents")  # after dcp.save / after contents.json, before latest
_STEP = re.compile(r"step-(\d{7,})")
_SHARD = re.compile(r"__(\d+)_\d+\.distcp")  # filesystem.py: f"__{rank}_{n}.distcp" (one per rank and bucket)
T = TypeVar("T")


@dataclass(frozen=True)
class Contents:
    """What a committed step folder says about itself (contents.json)."""

    step: int
    world_size: int
    recipe_digest: str
    files: dict[str, tuple[int, str]]  # file name -> (bytes, xxh3-128 hex)


class Loaded(NamedTuple):
    """The checkpoint :func:`load_latest` loaded."""

    step: int
    folder: Path


@dataclass(frozen=True)
class PendingSave:
    """An async save in flight. Every rank must call :meth:`result` (the commit is collective),
    and before the next save: DCP is still writing the staged copy until then."""

    folder: Path
    _future: Future[Any]
    _commit: Callable[[], Path]

    def result(self) -> Path:
        """Wait for DCP's writes, then commit; returns the committed folder."""
        _dcp(self._future.result, self.folder, "async_save")
        return self._commit()


@overload
def save(root: Path, step: int, state: dict[str, Any], *, world_size: int, recipe_digest: str,
         keep_last: int | None, async_save: Literal[False] = ...) -> Path: ...
@overload
def save(root: Path, step: int, state: dict[str, Any], *, world_size: int, recipe_digest: str,
         keep_last: int | None, async_save: Literal[True]) -> PendingSave: ...
def save(root: Path, step: int, state: dict[str, Any], *, world_size: int, recipe_digest: str,
         keep_last: int | None, async_save: bool = False) -> Path | PendingSave:
    """Save ``state`` (a DCP state dict, e.g. :func:`model_state`) as ``root/step-NNNNNNN``; commit it.

    On every rank, or in one process without a group; ``world_size`` is checked and recorded; keeps
    ``keep_last`` committed folders (``None``: all); ``async_save``: :meth:`PendingSave.result` commits.
    :class:`CheckpointError` if the step is committed already, or DCP or the commit failed."""
    _check_args(step, world_size, keep_last)
    folder = _agree(lambda: _prepare(root, step))
    writer = FileSystemWriter(folder, sync_files=True, overwrite=False)  # fsync each file; never overwrite

    def commit() -> Path:
        _crash_if("after-save")
        contents = Contents(step, world_size, recipe_digest, _gather_records(folder))
        _agree(lambda: _commit(root, folder, contents, keep_last))
        return folder

    alone = not _grouped()
    if async_save:
        handle = _dcp(lambda: saver.async_save(state, storage_writer=writer, no_dist=alone), folder, "save")
        future = handle.upload_completion if isinstance(handle, saver.AsyncSaveResponse) else handle
        return PendingSave(folder, future, commit)
    _dcp(lambda: saver.save(state, storage_writer=writer, no_dist=alone), folder, "save")
    return commit()


def verify(folder: Path) -> Contents:
    """Check every file of a step folder against its contents.json, without unpickling anything;
    :class:`CheckpointError` names the file and the problem (missing, extra, truncated, altered, not a
    plain file, or a contents.json that is damaged or names a path outside the folder)."""
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{folder}: not a step folder (missing, or a symlink, which is never followed)")
    contents = _read_contents(folder)
    extra = sorted({p.name for p in folder.iterdir()} - set(contents.files) - {CONTENTS})
    if extra:
        raise CheckpointError(f"{folder / extra[0]}: not listed in {CONTENTS}: added after the commit")
    if METADATA not in contents.files:
        raise CheckpointError(f"{folder / CONTENTS}: lists no {METADATA}, so DCP cannot read this folder")
    for name, (size, digest) in sorted(contents.files.items()):
        actual, actual_digest = _record(folder / name)
        if actual != size:
            raise CheckpointError(f"{folder / name}: {actual} bytes, {CONTENTS} records {size}: truncated")
        if actual_digest != digest:
            raise CheckpointError(f"{folder / name}: its {ALGORITHM} differs from {CONTENTS}'s: altered")
    return contents


def load_latest(root: Path, state: dict[str, Any], *, recipe_digest: str) -> Loaded:
    """Load the newest committed checkpoint under ``root`` that verifies into ``state``, in place.

    ``latest``'s target first; a bad one is named in a warning and the previous one tried. DCP reshards
    (saved at N ranks, loaded at M). On every rank; rank 0 chooses. :class:`CheckpointError` if nothing
    was committed, none verifies, the recipe differs or DCP failed."""
    loaded = _agree(lambda: _choose(root, recipe_digest))
    reader, alone = FileSystemReader(loaded.folder), not _grouped()
    _dcp(lambda: state_dict_loader.load(state, storage_reader=reader, no_dist=alone), loaded.folder, "load")
    return loaded


def model_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The DCP state of a model (DDP-wrapped or plain: keys without ``module.``) and its optimizer;
    a fresh optimizer's state is first created by a zero-lr step (DCP loads into allocated tensors)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {MODEL_KEY: model_sd, OPTIMIZER_KEY: optim_sd}


def load_model_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put a state shaped like :func:`model_state`'s (e.g. after :func:`load_latest`) into both."""
    set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIMIZER_KEY])


def loaded_digest(state: Mapping[str, Any]) -> str:
    """One digest over every tensor and value of a nested state: equal exactly when two states are
    bitwise equal (names, dtypes, shapes, bytes; other values by ``repr``)."""
    return combine_digests(dict(_leaf_digests("", state)))


def _leaf_digests(name: str, value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, torch.Tensor):
        yield name, tensor_digest(name, value)
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _leaf_digests(f"{name}.{key}" if name else str(key), value[key])
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _leaf_digests(f"{name}.{i}", item)
    else:
        yield name, xxhash.xxh3_128_hexdigest(f"{type(value).__name__}:{value!r}".encode())


def _check_args(step: int, world_size: int, keep_last: int | None) -> None:
    if step < 0:
        raise ConfigError(f"step {step} is negative; checkpoint steps count from 0")
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"keep_last {keep_last} is below 1; pass an int >= 1, or None to keep every step")
    actual = dist.get_world_size() if _grouped() else 1
    if world_size != actual:
        raise ConfigError(f"world_size {world_size} is not the process group's {actual}; pass {actual}")
    if (crash := os.environ.get(CRASH_ENV)) and crash not in CRASH_POINTS:
        raise ConfigError(f"{CRASH_ENV}={crash!r} is not one of {', '.join(CRASH_POINTS)}; unset it")


def _crash_if(point: str) -> None:
    if os.environ.get(CRASH_ENV) == point:
        kill_self()


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def _agree(decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 and hand every rank its outcome, a value or the error, so that no rank
    waits in a collective for one that gave up (and none runs ahead before rank 0 is done)."""
    if not _grouped():
        return decide()
    outcome: list[Any] = [None, None]  # rank 0's value, or its error's message
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = decide()
        except Exception as e:  # any failure, so that the other ranks raise too instead of waiting
            error, outcome[1] = e, f"rank 0: {e}"
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:  # rank 0 re-raises its own exception, with its traceback
        raise error or CheckpointError(outcome[1])
    return outcome[0]  # type: ignore[no-any-return]


def _dcp(call: Callable[[], T], folder: Path, verb: str) -> T:
    try:
        with warnings.catch_warnings():  # one process without a group is a supported mode here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return call()
    except (CheckpointException, Exception) as e:  # CheckpointException is a BaseException
        detail = {r: f[0] for r, f in e.failures.items()} if isinstance(e, CheckpointException) else e
        raise CheckpointError(f"{folder}: dcp.{verb} failed ({detail!r})") from e


def _step_folders(root: Path) -> list[Path]:  # newest first; symlinks and temporary names excluded
    found = [p for p in root.iterdir() if _STEP.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def _latest_step(root: Path) -> int | None:  # None: missing, or it names no step folder
    try:
        match = _STEP.fullmatch((root / LATEST).read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None
    return int(match[1]) if match else None


def _prepare(root: Path, step: int) -> Path:
    """The new folder for ``step``: refused if committed and sound, else a leftover moved aside (a
    folder newer than ``latest`` is not committed, whatever it holds: a crash came before the commit)."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"step-{step:07d}"
    if not (folder.exists() or folder.is_symlink()):
        return folder
    latest = _latest_step(root)
    if (folder / CONTENTS).exists() and latest is not None and step <= latest:
        try:
            verify(folder)
        except CheckpointError as e:
            warnings.warn(f"{e}; re-saving step {step} in its place", stacklevel=5)
        else:
            raise CheckpointError(f"{folder}: step {step} is committed and never overwritten; save another")
    _discard(folder)  # a crash's leftover (never reached latest), or damaged
    return folder


def _discard(path: Path) -> None:
    """Rename out of the step names first (atomic), so a half-removed folder never looks like a step."""
    trash = path.with_name(f".tmp-trash-{path.name}-{uuid.uuid4().hex[:8]}")
    path.rename(trash)
    shutil.rmtree(trash) if trash.is_dir() and not trash.is_symlink() else trash.unlink()


def _open_plain(path: Path) -> io.BufferedReader:
    """Open a regular file without following a symlink (one could point out of the folder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # NONBLOCK: a FIFO does not hang
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing, though {CONTENTS} records it") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened as a plain file ({e.strerror}; no symlinks)") from e
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise CheckpointError(f"{path}: not a regular file")
    return f


def _record(path: Path) -> tuple[int, str]:
    with _open_plain(path) as f:  # refuses symlinks and anything but a regular file
        size = os.fstat(f.fileno()).st_size
    return size, file_digest(path, size)


def _gather_records(folder: Path) -> dict[str, tuple[int, str]]:
    """Each rank digests its own shards (rank 0 also the rest), in parallel; all get the union."""
    rank = dist.get_rank() if _grouped() else 0
    shards = {p: _SHARD.fullmatch(p.name) for p in sorted(folder.iterdir())}
    mine = [p for p, m in shards.items() if (int(m[1]) if m else 0) == rank]  # .metadata etc.: rank 0
    records = {p.name: _record(p) for p in mine}
    if not _grouped():
        return records
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return {name: rec for part in gathered for name, rec in part.items()}


def _commit(root: Path, folder: Path, contents: Contents, keep_last: int | None) -> None:
    present = {p.name for p in folder.iterdir()}
    if present != set(contents.files):
        raise CheckpointError(f"{folder}: {sorted(present ^ set(contents.files))} changed during the save")
    body = {"format": FORMAT_VERSION, "step": contents.step, "world_size": contents.world_size,
            "recipe_digest": contents.recipe_digest, "algorithm": ALGORITHM,
            "files": {name: {"bytes": n, ALGORITHM: d} for name, (n, d) in sorted(contents.files.items())}}
    body["contents_digest"] = _body_digest(body)  # so that an edit to any field is caught
    atomic_write_bytes(folder / CONTENTS, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    _fsync_dir(root)
    _crash_if("after-contents")
    atomic_write_bytes(root / LATEST, f"{folder.name}\n".encode())  # the commit point; fsyncs root
    if keep_last is not None:
        _prune(root, contents.step, keep_last)


def _prune(root: Path, latest: int, keep_last: int) -> None:
    """Keep ``latest``'s and ``keep_last - 1`` earlier committed folders; newer ones may be in flight."""
    older = [p for p in _step_folders(root) if int(p.name[5:]) < latest]
    committed = [p for p in older if (p / CONTENTS).exists()]
    for path in committed[keep_last - 1:] + [p for p in older if p not in committed]:
        _discard(path)


def _read_contents(folder: Path) -> Contents:
    try:
        with _open_plain(path := folder / CONTENTS) as f:
            data = json.loads(f.read())
    except CheckpointError:
        raise CheckpointError(f"{path}: missing or not a plain file, so the save never committed") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable as JSON ({e})") from e
    if not isinstance(data, dict) or data.get("contents_digest") != _body_digest(data):
        raise CheckpointError(f"{path}: its contents_digest does not match its fields: edited or damaged")
    try:
        files = {str(n): (int(r["bytes"]), str(r[ALGORITHM])) for n, r in data["files"].items()}
        contents = Contents(int(data["step"]), int(data["world_size"]), str(data["recipe_digest"]), files)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: lacks or mistypes field {e}; not a reprokit DCP checkpoint") from e
    for name in files:
        if name in ("", ".", "..", CONTENTS) or any(c in name for c in "/\\\0"):
            raise CheckpointError(f"{path}: names {name!r}, not a plain file name inside {folder}")
    return contents


def _body_digest(data: dict[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != "contents_digest"}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True).encode())


def _choose(root: Path, recipe_digest: str) -> Loaded:
    """Rank 0: the newest committed folder that verifies, ``latest``'s target first."""
    pointer = root / LATEST
    if not pointer.exists():
        raise CheckpointError(f"{pointer}: missing, so no checkpoint was committed under {root}")
    latest = _latest_step(root)
    if latest is None:
        warnings.warn(f"{pointer}: names no step folder; trying each one, newest first", stacklevel=5)
    target = [] if latest is None else [root / f"step-{latest:07d}"]  # first, even if missing: verify says so
    candidates = target + [p for p in _step_folders(root) if latest is None or int(p.name[5:]) < latest]
    for folder in candidates:
        try:
            contents = verify(folder)
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=5)
            continue
        if contents.recipe_digest != recipe_digest:
            raise CheckpointError(f"{folder / CONTENTS}: saved by recipe {contents.recipe_digest}, this "
                                  f"run's is {recipe_digest}; resume with the same recipe or use a new root")
        return Loaded(contents.step, folder)
    raise CheckpointError(f"{root}: no committed checkpoint verifies (the warnings name each problem)")
