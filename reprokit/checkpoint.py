"""Checkpoints: full training state, committed atomically, verified on every load.

    RUN_DIR/checkpoints/step-0000060/state.pt       tensors and plain values (torch.load weights_only)
    RUN_DIR/checkpoints/step-0000060/meta.json      step, epoch, batch, config, digests, architecture
    RUN_DIR/checkpoints/step-0000060/contents.json  size and xxh3-128 of the two files above
    RUN_DIR/checkpoints/latest                      name of the newest committed checkpoint

Commit protocol: write into ``.tmp-step-...`` next to the target, fsync every file and the
directory, write ``contents.json`` last, rename the directory into place, fsync the parent, then
replace ``latest``. A kill at any moment leaves either no ``step-...`` directory or a complete one,
so readers never trust ``latest`` alone: they scan the directories and take the newest that verifies.
Loading never unpickles arbitrary objects: ``state.pt`` goes through ``torch.load(weights_only=True)``
and everything else is JSON.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import xxhash

from reprokit.config import config_differences
from reprokit.errors import ReprokitError
from reprokit.rundir import _fsync_dir, atomic_write_bytes

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONTENTS_FILE = "contents.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
# keys of state.pt, named once so writer and reader cannot disagree
MODEL_KEY, OPTIMIZER_KEY, SCHEDULER_KEY, RNG_KEY, CALLBACKS_KEY = (
    "model", "optimizer", "scheduler", "rng", "callbacks",
)


class CheckpointError(ReprokitError):
    """A checkpoint is damaged, foreign to the run, or cannot be written."""


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself (meta.json)."""

    step: int
    epoch: int
    batch: int  # batches of ``epoch`` already consumed
    config: dict[str, Any]
    data_digest: str
    code_version: str
    manifest_digest: str
    model_digest: str
    architecture: dict[str, list[Any]]  # tensor name -> [dtype, shape]
    run_files: dict[str, int]  # byte length of the run's append-only files at this step
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Snapshot:
    """A checkpoint held in memory, ready to be written (by this thread or another)."""

    meta: CheckpointMeta
    state: dict[str, Any] = field(repr=False)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def architecture(state: Mapping[str, torch.Tensor]) -> dict[str, list[Any]]:
    """Name -> [dtype, shape] of every tensor in a state_dict: what a compatible model must have."""
    return {name: [str(t.dtype), list(t.shape)] for name, t in state.items()}


def clone_state(obj: Any) -> Any:
    """A deep copy in which every tensor is cloned, so training can go on while it is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(clone_state(v) for v in obj)
    return obj


def write_checkpoint(run_dir: str | Path, snap: Snapshot, *, crash_midway: bool = False) -> Path:
    """Commit ``snap`` under ``run_dir/checkpoints`` atomically and return its directory.

    Args:
        run_dir: the run directory.
        snap: the state and metadata to write.
        crash_midway: fault injection: SIGKILL this process after half of ``state.pt`` is written.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(snap.meta.step)
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}-{threading.get_ident()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    buffer = io.BytesIO()
    torch.save(snap.state, buffer)
    files: dict[str, bytes | memoryview] = {STATE_FILE: buffer.getbuffer(),
             META_FILE: (json.dumps(snap.meta.to_dict(), indent=1, sort_keys=True) + "\n").encode()}
    contents = {}
    for fname, data in files.items():
        contents[fname] = {"bytes": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
        with open(tmp / fname, "wb") as f:
            if crash_midway and fname == STATE_FILE:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    # contents.json last: its presence (and matching digests) is what makes the checkpoint whole
    with open(tmp / CONTENTS_FILE, "wb") as f:
        f.write(json.dumps({"files": contents}, indent=1, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    target = root / name
    if target.exists():  # an older attempt at this step (a resume went back past it): replace it
        old = root / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(root)
    atomic_write_bytes(root / LATEST, f"{name}\n".encode())
    return target


def read_checkpoint(path: str | Path) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Verify a checkpoint directory and load it; any damage raises :class:`CheckpointError`.

    Checks that every file listed in ``contents.json`` is present with its recorded size and
    digest, then loads ``state.pt`` with ``weights_only=True`` (a pickle that would run code is
    refused before anything runs).
    """
    path = Path(path)
    data = _verified_files(path)
    try:
        meta = CheckpointMeta(**json.loads(data[META_FILE]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / META_FILE}: not a reprokit checkpoint meta file ({e})") from e
    try:
        state: dict[str, Any] = torch.load(io.BytesIO(data[STATE_FILE]), weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path / STATE_FILE}: refused to load: it holds objects other than tensors and plain "
            f"values, which could run code when unpickled; do not load it with weights_only=False "
            f"unless you made it yourself ({str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: cannot be read as a torch file ({e})") from e
    missing = {MODEL_KEY, OPTIMIZER_KEY, RNG_KEY} - set(state)
    if missing:
        raise CheckpointError(f"{path / STATE_FILE}: lacks {sorted(missing)}; not a reprokit checkpoint")
    return meta, state


def _verified_files(path: Path) -> dict[str, bytes]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    contents_path = path / CONTENTS_FILE
    if not contents_path.is_file():
        raise CheckpointError(f"{contents_path}: missing, so the checkpoint was never committed")
    try:
        listed = json.loads(contents_path.read_bytes())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{contents_path}: unreadable ({e})") from e
    for required in (STATE_FILE, META_FILE):
        if required not in listed:
            raise CheckpointError(f"{contents_path}: does not list {required}")
    out = {}
    for fname, expect in sorted(listed.items()):
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: missing")
        data = fpath.read_bytes()
        if len(data) != expect["bytes"]:
            raise CheckpointError(
                f"{fpath}: truncated or extended: {len(data)} bytes, {expect['bytes']} recorded"
            )
        if xxhash.xxh3_128_hexdigest(data) != expect["xxh3_128"]:
            raise CheckpointError(f"{fpath}: content digest does not match contents.json (corrupted)")
        out[fname] = data
    return out


def check_compatible(
    meta: CheckpointMeta, path: Path, *, config: Mapping[str, Any], model_state: Mapping[str, torch.Tensor]
) -> None:
    """Refuse a checkpoint written for another config or another model architecture.

    Fields that only say how the run is recorded (``RECORDING_FIELDS``) may differ.
    """
    diffs = config_differences(meta.config, dict(config))
    if diffs:
        raise CheckpointError(f"{path}: written for a different config ({'; '.join(diffs)})")
    have = architecture(model_state)
    if have != meta.architecture:
        names = sorted(n for n in set(have) | set(meta.architecture)
                       if have.get(n) != meta.architecture.get(n))
        shown = ", ".join(
            f"{n} (checkpoint {meta.architecture.get(n)}, model {have.get(n)})" for n in names[:3]
        )
        raise CheckpointError(
            f"{path}: written for a different model architecture: {len(names)} tensor(s) differ: {shown}"
        )


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed-looking checkpoint directories, newest step first (temporary ones excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def latest_pointer(run_dir: str | Path) -> str | None:
    """The checkpoint name ``latest`` points to, if the pointer exists."""
    path = Path(run_dir) / CHECKPOINTS / LATEST
    return path.read_text().strip() if path.is_file() else None


def verify_run(run_dir: str | Path, *, config: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per checkpoint: name, step, status ("ok" or "bad"), size, and what is wrong.

    With ``config`` (the run's), a checkpoint written for another config counts as bad too.
    """
    rows = []
    pointer = latest_pointer(run_dir)
    for path in list_checkpoints(run_dir):
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        row: dict[str, Any] = {"checkpoint": path.name, "step": int(path.name[len(PREFIX):]),
                               "latest": path.name == pointer, "bytes": size}
        try:
            meta, _ = read_checkpoint(path)
            diffs = config_differences(meta.config, dict(config)) if config is not None else []
            if diffs:
                raise CheckpointError(f"{path}: written for a different config ({'; '.join(diffs)})")
            row.update(status="ok", problem="")
        except CheckpointError as e:
            row.update(status="bad", problem=str(e))
        rows.append(row)
    return pd.DataFrame(rows, columns=["checkpoint", "step", "latest", "bytes", "status", "problem"])


def prune(run_dir: str | Path, keep: int, *, newest: Path) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; call only after ``newest`` verified.

    ``newest`` is never deleted, so the run always keeps at least one valid checkpoint.
    """
    removed = []
    for path in list_checkpoints(run_dir)[keep:]:
        if path != newest:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def clean_temporaries(run_dir: str | Path) -> None:
    """Remove half-written ``.tmp-*`` directories a killed writer left behind."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


class Checkpointer:
    """Saves every ``every`` steps and/or ``seconds`` seconds, optionally in a background thread.

    With ``background=True`` the training step is blocked only while the state is cloned into
    memory; a thread serialises, writes, verifies and prunes. One save is in flight at a time.
    """

    def __init__(
        self, run_dir: str | Path, *, every: int, seconds: float, keep: int, background: bool,
        crash_during_save: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.every, self.seconds, self.keep, self.background = every, seconds, keep, background
        self.crash_during_save = crash_during_save
        self._last = time.monotonic()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.saved: list[int] = []
        self.blocked_seconds: list[float] = []  # how long each save held up the training step

    def due(self, step: int) -> bool:
        if self.every and step % self.every == 0:
            return True
        return bool(self.seconds) and time.monotonic() - self._last >= self.seconds

    def save(self, make_snapshot: Callable[[bool], Snapshot]) -> None:
        """Take a snapshot (cloned if it will be written in the background) and commit it."""
        started = time.perf_counter()
        self.wait()
        snap = make_snapshot(self.background)
        crash = snap.meta.step == self.crash_during_save
        if self.background and not crash:
            self._thread = threading.Thread(target=self._commit_in_thread, args=(snap,),
                                            name=f"reprokit-checkpoint-{snap.meta.step}", daemon=True)
            self._thread.start()
        else:
            self._commit(snap, crash)
        self._last = time.monotonic()
        self.blocked_seconds.append(time.perf_counter() - started)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"background checkpoint save failed: {error}") from error

    def _commit_in_thread(self, snap: Snapshot) -> None:
        try:
            self._commit(snap, False)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def _commit(self, snap: Snapshot, crash: bool) -> None:
        path = write_checkpoint(self.run_dir, snap, crash_midway=crash)
        read_checkpoint(path)  # verify what landed on disk before deleting anything older
        self.saved.append(snap.meta.step)
        if self.keep:
            prune(self.run_dir, self.keep, newest=path)
