"""One writer per run directory: an ``flock`` on ``RUN_DIR/.lock``, held for the writer's life.

Not a pid file: the kernel drops an flock when its last descriptor closes, so a SIGKILLed run leaves
no stale lock. The file names the holder (pid, host, since, argv) for a refused second writer;
readers never lock. The lock belongs to the open file description (flock(2)), which a forked child
(a DataLoader worker) would share, keeping a SIGKILLed writer's lock until its last worker noticed;
so a forked child closes its copy at once (``os.register_at_fork``) and never unlocks for its parent.
``subprocess`` children do not inherit it (PEP 446).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import shlex
import socket
import stat
import sys
import time
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reprokit.errors import RunDirError, RunLockedError

LOCK_FILE = ".lock"
_MAX_RECORD = 1 << 16  # a holder record is ~200 bytes; more is not ours and is not read
_RECORD_WAIT = 0.5  # seconds a refused writer waits for the winner to write its record
_FIX = "remove it if it is not a plain file, or pick another run directory"
# the locks this process holds, by run directory (device, inode): what the kernel knows, kept so that
# a relaunch's writer can take over the lock its opening took, and a forked child can let go of them
_HELD: weakref.WeakValueDictionary[tuple[int, int], RunLock] = weakref.WeakValueDictionary()


class RunLock:
    """The exclusive right to write one run directory, re-entrant within one object: ``acquire``
    raises :class:`RunLockedError` naming the holder if another process, or another open ``RunLock``
    of this one, holds it (one dropped unreleased, a notebook's earlier ``Run``, is collected first)."""

    def __init__(self, run_dir: str | Path) -> None:
        self._fd: int | None = None
        self._pid, self._count, self.run_dir = 0, 0, Path(run_dir)  # _pid: the only one to unlock

    def acquire(self) -> RunLock:
        """Take the lock (creating the run directory if needed) and record this process as holder."""
        if self._count:
            self._count += 1
            return self
        fd = _open_lock_file(self.run_dir / LOCK_FILE)
        try:
            if not _try_lock(fd):
                raise RunLockedError(_refusal(self.run_dir, fd))
            since = datetime.now(UTC).isoformat(timespec="seconds")
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "argv": sys.argv}
            with contextlib.suppress(OSError):  # a full disk: the lock holds all the same
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)  # unbuffered: nothing to flush
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._pid, self._count = fd, os.getpid(), 1
        _HELD[_key(self.run_dir)] = self
        return self

    def release(self) -> None:
        """Undo one ``acquire``; the last one clears the record and unlocks. Extra calls do nothing."""
        if self._count > 1:
            self._count -= 1
            return
        fd, self._fd, self._count = self._fd, None, 0
        if fd is not None:
            for key in [k for k, v in list(_HELD.items()) if v is self]:
                _HELD.pop(key, None)
            if self._pid == os.getpid():
                os.ftruncate(fd, 0)  # before unlocking: afterwards it may be the next holder's record
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self._count = min(self._count, 1)
        self.release()


def held(run_dir: str | Path) -> RunLock | None:
    """The :class:`RunLock` this process holds on ``run_dir`` (any spelling of it), if any."""
    try:
        return _HELD.get(_key(Path(run_dir)))
    except OSError:
        return None


def _key(run_dir: Path) -> tuple[int, int]:
    info = os.stat(run_dir)
    return info.st_dev, info.st_ino


def _forget_in_child() -> None:
    """In a forked child: close its copies of the lock descriptors (the parent's lock stays held)."""
    for lock in list(_HELD.values()):
        if lock._fd is not None:
            os.close(lock._fd)
        lock._fd, lock._count = None, 0
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who writes ``run_dir`` (pid, host, since, argv), without taking the lock; None if nobody. A
    record a killed process of this host left is known by its dead pid (a reused pid fools it)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    record = _read_record(fd)
    os.close(fd)
    mine = record is not None and record.get("host") == socket.gethostname()
    return None if record is None or (mine and not _alive(record["pid"])) else record


def _open_lock_file(path: Path) -> int:  # O_NOFOLLOW: truncate no file outside the run directory
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise RunDirError(f"{path}: cannot open the lock file ({e.strerror}); {_FIX}") from e
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    raise RunDirError(f"{path}: the lock file is not a plain file; {_FIX}")


def _try_lock(fd: int) -> bool:
    for _ in range(2):
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        gc.collect()  # an unreachable RunLock of this process (a notebook's earlier Run) lets go
    return False


def _refusal(run_dir: Path, fd: int) -> str:
    deadline = time.monotonic() + _RECORD_WAIT
    while (record := _read_record(fd)) is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the winner has locked but not yet written its record
    fix = "wait for it to finish or stop it"
    if record is None:
        return f"run directory {str(run_dir)!r} is in use by another process (it has not said which); {fix}"
    if record["pid"] == os.getpid() and record.get("host") == socket.gethostname():
        fix = "release the earlier Run of this directory in this process first"
    return (f"run directory {str(run_dir)!r} is in use by pid {record['pid']} on host {record.get('host')} "
            f"since {record.get('since')} (command {shlex.join(map(str, record['argv']))[:200]}); {fix}")


def _read_record(fd: int) -> dict[str, Any] | None:  # None: empty, partial or not ours
    try:
        record = json.loads(os.pread(fd, _MAX_RECORD, 0))
    except (ValueError, OSError, RecursionError):
        return None
    if not isinstance(record, dict) or type(record.get("pid")) is not int:
        return None
    return record | {"argv": record["argv"] if isinstance(record.get("argv"), list) else []}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks
    except PermissionError:
        return pid > 0  # someone else's
    except (ProcessLookupError, OverflowError):
        return False
    return pid > 0  # kill(0 or -1, 0) asks about process groups
