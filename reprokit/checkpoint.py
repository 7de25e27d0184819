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
readers never trust ``latest`` alone: they scan the directories and take the newest that verifies
(reading and verifying: :mod:`reprokit.checkpointreader`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch

from reprokit import tensorfile, untrusted
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
SMALL_JSON = 16 << 20  # contents.json and meta.json: a few KB, a large config's meta ~100 KB
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
                verify_contents(tmp, read_back={TENSORS_FILE} if writer.verified else set())
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


def verify_contents(path: Path, *, read_back: set[str] | None = None) -> dict[str, Any]:
    """Check every file contents.json lists and return the listing; those in ``read_back`` (already
    checked against the disk by their writer) only for their size. A listed name must be a plain
    file of ``path``. The writer's read-back and :mod:`reprokit.checkpointreader` both use it."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    contents_path = path / CONTENTS_FILE
    if not contents_path.is_file():
        raise CheckpointError(f"{contents_path}: missing, so the checkpoint was never committed")
    try:
        listed = untrusted.expect(untrusted.read_json(contents_path, max_bytes=SMALL_JSON), "files", dict,
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


def checkpoints_root(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints``, refused if it is a symbolic link: what a run directory says must not
    make reprokit read or write outside it."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_symlink():
        raise CheckpointError(f"{root}: a symbolic link (to {os.readlink(root)!r}); a run directory's "
                              "checkpoints lie inside it: replace the link by the directory it names")
    return root


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
