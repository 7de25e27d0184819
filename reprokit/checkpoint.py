"""Checkpoints: full training state, committed atomically, verified on every load.

    RUN_DIR/checkpoints/step-0000060/tensors.safetensors  every tensor of the state
    RUN_DIR/checkpoints/step-0000060/state.pt        the rest, tensors as placeholders (weights_only)
    RUN_DIR/checkpoints/step-0000060/meta.json       step, epoch, batch, config, digests, architecture
    RUN_DIR/checkpoints/step-0000060/contents.json   size and xxh3-128 of the files above
    RUN_DIR/checkpoints/latest                      name of the newest committed checkpoint
    RUN_DIR/checkpoints/.tmp-spare-tensors.safetensors  a pruned checkpoint's tensors file, which the
                                                    next save overwrites in place (while training)

Commit protocol: write into ``.tmp-step-...`` next to the target with ``contents.json`` (size and
digest of every file, computed while writing) and the new ``latest`` into a temporary file.
The tensors go to the disk first, directly, and are read back from it (:mod:`reprokit.tensorfile`,
:mod:`reprokit.directio`; where the file system refuses direct I/O: through the page cache with
early writeback, :mod:`reprokit.fsio`); while the tensors file is read back, write the other files,
fsync every file and the directory in a thread and check the small files; then rename the directory
into place, rename the pointer over ``latest``, fsync the parent. Older checkpoints are pruned only
after that. A kill at any moment leaves either no ``step-...`` directory or a complete one, so
readers never trust ``latest`` alone: they scan the directories and take the newest that verifies.
Loading never unpickles arbitrary objects: ``state.pt`` goes through ``torch.load(weights_only=True)``,
the tensors through safetensors, and everything else is JSON. Checkpoints of format 1 (every
tensor inside ``state.pt``, no tensors file) still load.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch

from reprokit import tensorfile, untrusted
from reprokit.differences import config_differences
from reprokit.digests import model_digest
from reprokit.directio import ReadBackError
from reprokit.errors import ReprokitError, RunDirError
from reprokit.fsio import file_digest, fsync_files, open_tensor_writer, write_hashed
from reprokit.rundir import _fsync_dir

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.pt"
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
CONTENTS_FILE = "contents.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"  # half-written or retired directories and files: never read
TRASH_PREFIX = f"{TMP_PREFIX}trash-"
# a pruned checkpoint's tensors file, kept for the next save to overwrite in place (see write_checkpoint)
SPARE = f"{TMP_PREFIX}spare-{TENSORS_FILE}"
FORMAT_VERSION = 2  # 1: every tensor inside state.pt
_NAME = re.compile(rf"{PREFIX}[0-9]{{1,19}}")  # what ``latest`` may name: a checkpoint directory of this run
_MAX_POINTER = 64  # bytes of a ``latest`` file ("step-0000060\n" is 13)
_SMALL_JSON = 16 << 20  # contents.json and meta.json: a few KB, a large config's meta ~100 KB
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
    run_files: dict[str, int]  # byte length of the run's append-only files at this step
    created: str = ""
    # filled in by write_checkpoint from the state it writes (in the writer thread when async)
    model_digest: str = ""
    architecture: dict[str, list[Any]] = field(default_factory=dict)  # name -> [dtype, shape]
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Snapshot:
    """A checkpoint held in memory, ready to be written (by this thread or another)."""

    meta: CheckpointMeta
    state: dict[str, Any] = field(repr=False)
    # data pointers of the tensors in ``state`` that only the optimizer step changes (parameters,
    # optimizer state): an async save may go on copying them while the next forward/backward runs
    update_only: frozenset[int] = frozenset()


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def architecture(state: Mapping[str, torch.Tensor]) -> dict[str, list[Any]]:
    """Name -> [dtype, shape] of every tensor in a state_dict: what a compatible model must have."""
    return {name: [str(t.dtype), list(t.shape)] for name, t in state.items()}


def write_checkpoint(run_dir: str | Path, snap: Snapshot, *, crash_midway: bool = False) -> Path:
    """Commit ``snap`` under ``run_dir/checkpoints`` atomically and return its directory.

    Args:
        run_dir: the run directory.
        snap: the state and metadata to write.
        crash_midway: fault injection: SIGKILL this process once about half of ``state.pt`` is
            written (and fsynced), before anything is committed.
    """
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(snap.meta.step)
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}-{threading.get_ident()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    pointer = root / f"{TMP_PREFIX}{LATEST}-{os.getpid()}-{threading.get_ident()}"
    try:
        # the tensors are streamed to the disk at once, no pickling first and no second copy in
        # memory; what is left of the state is pickled afterwards, while their tail is written
        tensors: list[torch.Tensor] = []
        skeleton = tensorfile.split(snap.state, tensors)
        kill_after = tensorfile.nbytes(tensors) // 2 if crash_midway else None
        take_spare(root, tmp / TENSORS_FILE)
        writer = open_tensor_writer(tmp / TENSORS_FILE, kill_after)
        try:
            tensorfile.write(writer, tensors)
            skeleton_bytes = io.BytesIO()
            torch.save(skeleton, skeleton_bytes)
            # the model digest is taken while a direct writer's last chunks reach the disk
            weights = snap.state[MODEL_KEY]
            meta = replace(snap.meta, model_digest=model_digest(weights), architecture=architecture(weights))
            # the other files are written and made durable while a direct writer reads its file back
            contents = {TENSORS_FILE: writer.written()}
            contents[STATE_FILE] = write_hashed(tmp / STATE_FILE, skeleton_bytes.getvalue())
            contents[META_FILE] = write_hashed(
                tmp / META_FILE, (json.dumps(meta.to_dict(), indent=1, sort_keys=True) + "\n").encode())
            listing = json.dumps({"files": contents}, indent=1, sort_keys=True)
            (tmp / CONTENTS_FILE).write_bytes(listing.encode())
            # the new pointer, written now so that one fsync batch and one journal commit cover it too
            pointer.write_bytes(f"{name}\n".encode())
            files = [tmp / n for n in (TENSORS_FILE, STATE_FILE, META_FILE, CONTENTS_FILE)] + [pointer]
            with _Durable(files, tmp):
                # check the small files (and a buffered tensors file) as the disk will hand them out
                _verified_files(tmp, read_back={TENSORS_FILE} if writer.verified else set())
                writer.close()  # a direct writer: what the disk returns is what was written
        except ReadBackError as e:
            raise CheckpointError(str(e)) from e
        finally:
            writer.abort()  # a no-op after close(); after an error it ends the threads, closes the file
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        pointer.unlink(missing_ok=True)
        raise
    target = root / name
    if target.exists():  # an older attempt at this step (a resume went back past it): replace it
        old = root / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)  # both renames are durable: the checkpoint is committed (``latest`` is a hint)
    return target


def take_spare(root: Path, path: Path) -> None:
    """Move the spare tensors file (a pruned checkpoint's, see :func:`keep_spare`) to ``path``, if
    there is one. Overwriting its blocks in place is much faster than writing a new file on ext4:
    no block allocation and no unwritten-extent conversion (figures in README, "How the save got
    here"), as PostgreSQL recycles its WAL segments. Its old bytes never count:
    the writer overwrites the file from the start, cuts it to the new size and reads it back."""
    spare = root / SPARE
    if spare.is_symlink() or (spare.exists() and not spare.is_file()):
        # not one this run kept: overwriting "its blocks" would write wherever the link points
        _remove(spare)
        return
    with contextlib.suppress(FileNotFoundError):
        os.replace(spare, path)


def keep_spare(root: Path, retired: Path) -> None:
    """Keep the tensors file of the retired checkpoint directory ``retired`` as the spare, unless
    there is one already. Disk use between saves is then that of ``keep + 1`` checkpoints, the
    same as during a save."""
    if not (root / SPARE).exists():
        with contextlib.suppress(FileNotFoundError):
            os.replace(retired / TENSORS_FILE, root / SPARE)


def drop_spare(run_dir: str | Path) -> None:
    """Delete the spare tensors file: the run will save no more checkpoints."""
    (Path(run_dir) / CHECKPOINTS / SPARE).unlink(missing_ok=True)


class _Durable:
    """Context manager: fsync ``files``, then their directory, in a thread while the body runs;
    on exit wait for it and raise its error (a failed fsync means the data may not be on the disk)."""

    def __init__(self, files: list[Path], directory: Path) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(files, directory), name="reprokit_fsync")

    def _run(self, files: list[Path], directory: Path) -> None:
        try:
            fsync_files(files)
            _fsync_dir(directory)
        except BaseException as e:  # raised in the caller's thread by __exit__
            self._error = e

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error


def read_checkpoint(path: str | Path) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Verify a checkpoint directory and load it; any damage raises :class:`CheckpointError`.

    Checks that every file listed in ``contents.json`` is present with its recorded size and
    digest, then loads ``state.pt`` with ``weights_only=True`` (a pickle that would run code is
    refused before anything runs). A checkpoint may come from someone else: every field is checked
    (types, ranges, file names inside the checkpoint, safetensors header against the file size).
    """
    path = Path(path)
    if path.is_symlink():
        raise CheckpointError(f"{path}: a symbolic link, not a checkpoint directory (it may lead out of the "
                              "run directory); remove it")
    listed = _verified_files(path)
    meta = _read_meta(path)
    try:
        state: Any = torch.load(path / STATE_FILE, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path / STATE_FILE}: refused to load: it holds objects other than tensors and plain "
            f"values, which could run code when unpickled; do not load it with weights_only=False "
            f"unless you made it yourself ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # RuntimeError, EOFError, ValueError...: what torch.load raises varies
        raise CheckpointError(f"{path / STATE_FILE}: cannot be read as a torch file ({_one_line(e)})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE}: holds {type(state).__name__}, not a dict; "
                              "not a reprokit checkpoint")
    if TENSORS_FILE in listed:
        try:
            state = tensorfile.join(state, tensorfile.read(path / TENSORS_FILE))
        except Exception as e:  # a forged file: its digest matched, its content is not ours
            raise CheckpointError(f"{path / TENSORS_FILE}: its tensors do not fit state.pt ({_one_line(e)})"
                                  ) from e
    missing = {MODEL_KEY, RNG_KEY} - set(state)  # a script run's optimizers are among its tracked objects
    if missing:
        raise CheckpointError(f"{path / STATE_FILE}: lacks {sorted(missing)}; not a reprokit checkpoint")
    return meta, state


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:600]}" if text else type(e).__name__


def _read_meta(path: Path) -> CheckpointMeta:
    """meta.json with every field of the type and range a checkpoint of ``path``'s step has."""
    where = path / META_FILE
    try:
        raw = untrusted.read_json(where, max_bytes=_SMALL_JSON)
        if not isinstance(raw, dict):
            raise RunDirError(f"{where}: holds {type(raw).__name__}, not a JSON object")
        unknown = sorted(set(raw) - {f.name for f in fields(CheckpointMeta)})
        if unknown:
            raise RunDirError(f"{where}: unknown fields {unknown[:5]}; not a reprokit checkpoint meta file")
        checked: dict[str, Any] = {key: untrusted.expect(raw, key, int, path=where, lo=0)
                                   for key in ("step", "epoch", "batch")}
        for key in ("data_digest", "code_version", "manifest_digest"):
            checked[key] = untrusted.expect(raw, key, str, path=where, max_len=256)
        for key in ("created", "model_digest"):
            if key in raw:
                checked[key] = untrusted.expect(raw, key, str, path=where, max_len=256)
        checked["config"] = untrusted.expect(raw, "config", dict, path=where)
        files = untrusted.expect(raw, "run_files", dict, path=where, max_len=64)
        checked["run_files"] = {name: untrusted.expect(files, name, int, path=f"{where} run_files", lo=0)
                                for name in files}
        layout = untrusted.expect(raw, "architecture", dict, path=where, max_len=1 << 20) \
            if "architecture" in raw else {}
        checked["architecture"] = {name: _layout_entry(f"{where} architecture", layout, name)
                                   for name in layout}
        if "format_version" in raw:
            checked["format_version"] = untrusted.expect(raw, "format_version", int, path=where, lo=1,
                                                         hi=FORMAT_VERSION + 1)
    except RunDirError as e:
        raise CheckpointError(str(e)) from e
    meta = CheckpointMeta(**checked)
    if _NAME.fullmatch(path.name) and int(path.name[len(PREFIX):]) != meta.step:
        raise CheckpointError(f"{where}: says step {meta.step}, but the directory is {path.name}; the "
                              "checkpoint was moved or forged")
    return meta


def _layout_entry(where: str, layout: dict[str, Any], name: str) -> list[Any]:
    entry = untrusted.expect(layout, name, list, path=where, max_len=2)
    dtype = untrusted.expect(entry, 0, str, path=f"{where} {name!r}", max_len=64)
    shape = untrusted.expect(entry, 1, list, path=f"{where} {name!r}", max_len=64)
    return [dtype, [untrusted.expect(shape, i, int, path=f"{where} {name!r} shape", lo=0)
                    for i in range(len(shape))]]


def _verified_files(path: Path, *, read_back: set[str] | None = None) -> dict[str, Any]:
    """Check every file contents.json lists; those in ``read_back`` (already checked against the
    disk by their writer) only for their size. A listed name must be a plain file of ``path``."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    contents_path = path / CONTENTS_FILE
    if not contents_path.is_file():
        raise CheckpointError(f"{contents_path}: missing, so the checkpoint was never committed")
    try:
        listed = untrusted.expect(untrusted.read_json(contents_path, max_bytes=_SMALL_JSON), "files", dict,
                                  path=contents_path, max_len=64)
        for required in (STATE_FILE, META_FILE):
            if required not in listed:
                raise CheckpointError(f"{contents_path}: does not list {required}")
        for fname in sorted(listed):
            fpath = untrusted.safe_member(path, fname)
            expect = untrusted.expect(listed, fname, dict, path=contents_path)
            recorded = untrusted.expect(expect, "bytes", int, path=f"{contents_path} {fname!r}", lo=0)
            digest = untrusted.expect(expect, "xxh3_128", str, path=f"{contents_path} {fname!r}", max_len=64)
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: missing")
            size = fpath.stat().st_size
            if size != recorded:
                raise CheckpointError(f"{fpath}: truncated or extended: {size} bytes, {recorded} recorded")
            if fname not in (read_back or ()) and file_digest(fpath, size) != digest:
                raise CheckpointError(f"{fpath}: content digest does not match contents.json (corrupted)")
    except RunDirError as e:
        raise CheckpointError(str(e)) from e
    return cast(dict[str, Any], listed)


def check_compatible(
    meta: CheckpointMeta, path: Path, *, config: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor] | None, ignore: frozenset[str] = frozenset(),
    layout: Mapping[str, Any] | None = None,
) -> None:
    """Refuse a checkpoint written for another config or another model architecture (that of
    ``model_state``, or ``layout`` as :func:`architecture` gives it; neither: not checked).

    The config fields in ``ignore`` (how the run is recorded: checkpoint cadence, workers) may differ.
    """
    diffs = config_differences(meta.config, dict(config), ignore=ignore)
    if diffs:
        raise CheckpointError(f"{path}: written for a different config ({'; '.join(diffs)})")
    if model_state is not None:
        layout = architecture(model_state)
    if layout is None:
        return
    have = dict(layout)
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
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def checkpoints_root(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints``, refused if it is a symbolic link: what a run directory says must not
    make reprokit read or write outside it."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_symlink():
        raise CheckpointError(f"{root}: a symbolic link (to {os.readlink(root)!r}); a run directory's "
                              "checkpoints lie inside it: replace the link by the directory it names")
    return root


def latest_pointer(run_dir: str | Path) -> str | None:
    """The checkpoint name ``latest`` points to, if the pointer exists: a plain file holding the
    name of a checkpoint directory of this run (``step-N``), else a :class:`CheckpointError`.
    It may name a checkpoint since deleted: readers scan the directories and never trust it alone."""
    path = checkpoints_root(run_dir) / LATEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        fd, _ = untrusted.open_plain(path)
        with os.fdopen(fd, "rb") as f:
            data = f.read(_MAX_POINTER + 1)
    except RunDirError as e:
        raise CheckpointError(str(e)) from e
    name = data.decode("utf-8", "replace").strip()
    if len(data) > _MAX_POINTER or not _NAME.fullmatch(name):
        raise CheckpointError(f"{path}: names {name[:60]!r}, not a checkpoint of this run (expected "
                              f"{PREFIX}NNNNNNN); delete it: the next save writes it again")
    return name


def verify_run(run_dir: str | Path, *, config: Mapping[str, Any] | None = None,
               model_state: Mapping[str, torch.Tensor] | None = None,
               ignore: frozenset[str] = frozenset()) -> pd.DataFrame:
    """One row per checkpoint: name, step, status ("ok" or "bad"), size, and what is wrong.

    With ``config`` (the run's), a checkpoint written for another config (the ``ignore`` fields
    aside) counts as bad too, and with ``model_state`` one of another model architecture.
    """
    rows = []
    pointer = latest_pointer(run_dir)
    for path in list_checkpoints(run_dir):
        size = 0 if path.is_symlink() else sum(f.lstat().st_size for f in path.iterdir() if f.is_file())
        row: dict[str, Any] = {"checkpoint": path.name, "step": int(path.name[len(PREFIX):]),
                               "latest": path.name == pointer, "bytes": size}
        try:
            meta, _ = read_checkpoint(path)
            if config is not None:
                check_compatible(meta, path, config=config, model_state=model_state, ignore=ignore)
            row.update(status="ok", problem="")
        except CheckpointError as e:
            row.update(status="bad", problem=str(e))
        rows.append(row)
    return pd.DataFrame(rows, columns=["checkpoint", "step", "latest", "bytes", "status", "problem"])


def clean_temporaries(run_dir: str | Path) -> None:
    """Remove half-written ``.tmp-*`` directories and pointers a killed writer left behind (the
    spare tensors file stays if it is a plain file: the resumed run's next save overwrites it), and
    a ``latest`` that is not a plain file. Links are removed, never followed."""
    root = checkpoints_root(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            plain = p.is_file() and not p.is_symlink()
            swept = p.name.startswith(TMP_PREFIX) and not (p.name == SPARE and plain)
            if swept or (p.name == LATEST and not plain):  # such a ``latest`` the next save could not replace
                _remove(p)


def _remove(path: Path) -> None:  # a link itself, never what it points to
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
