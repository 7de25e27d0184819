"""Disk full and other I/O errors while a run writes: one clear error, the run left resumable.

A write that fails with ENOSPC (disk full), EDQUOT (quota), EIO or EROFS (read-only filesystem)
becomes a :class:`DiskError` naming what was being written, the path and the free space. The
writers keep the run directory consistent either way (atomic files, a checkpoint committed only
once verified, its temporary directory removed or swept at the next start), so once space is freed
the same command resumes from the newest checkpoint that verifies, bit-exact.

``REPROKIT_DISK_FULL_AT=KIND[:N]`` (``checkpoint``, ``metrics``, ``manifest``, ``result``; N-th
write of that kind in the process, default the first) injects an ENOSPC there, for fault-injection
tests; a relaunch without it is the "space freed" case.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reprokit.errors import ConfigError, ReprokitError

INJECT_ENV = "REPROKIT_DISK_FULL_AT"
REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EIO: "an I/O error", errno.EROFS: "the filesystem is read-only"}
KINDS = ("checkpoint", "metrics", "manifest", "result")

__all__ = ["DiskError", "check_room", "free_bytes", "human", "writing"]


class DiskError(ReprokitError):
    """A run could not write a file: disk full, quota, I/O error, read-only filesystem."""

    def __init__(self, message: str, errno_: int) -> None:
        super().__init__(message)
        self.errno = errno_


def human(n: float) -> str:
    """Bytes as ``12.3 MB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent); None if unknown."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


@contextmanager
def writing(kind: str, what: str, path: Path) -> Iterator[None]:
    """Turn a disk-full/quota/I/O/read-only ``OSError`` inside the block into a :class:`DiskError`
    naming ``what`` (e.g. "the checkpoint of step 60") and ``path``; ``kind`` is one of :data:`KINDS`
    (what ``REPROKIT_DISK_FULL_AT`` names)."""
    try:
        if _injected(kind):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: {INJECT_ENV})")
        yield
    except OSError as e:
        if e.errno not in REASONS:
            raise
        free = free_bytes(path)
        room = f"{human(free)} free on its filesystem" if free is not None else "free space unknown"
        raise DiskError(f"cannot write {what} to {str(path)!r}: {REASONS[e.errno]} ({e.strerror}; {room}); "
                        "the run stopped with its newest verified checkpoint intact: free space (or move "
                        "the run directory), then run the same command again to resume", e.errno) from e


_WRITES: dict[str, int] = {}  # kind -> writes so far in this process (for the injection)


def _injected(kind: str) -> bool:
    value = os.environ.get(INJECT_ENV)
    if not value:
        return False
    name, _, nth = value.partition(":")
    if name not in KINDS or not (nth or "1").isdigit() or int(nth or "1") < 1:
        raise ConfigError(f"{INJECT_ENV}={value!r}: expected KIND or KIND:N with KIND one of {list(KINDS)} "
                          "and N >= 1, e.g. checkpoint:2")
    if name != kind:
        return False
    _WRITES[kind] = _WRITES.get(kind, 0) + 1
    return _WRITES[kind] == int(nth or "1")


def check_room(checkpoints: Path, one_checkpoint: int, keep_last: int | None) -> str | None:
    """At the first save: a warning if ``keep_last`` checkpoints of ``one_checkpoint`` bytes (plus
    the one being written) will not fit in the free space, else None. The warning is printed."""
    free = free_bytes(checkpoints)
    if free is None or one_checkpoint <= 0:
        return None
    kept = max(keep_last or 0, 1)  # keep_last 0/None keeps all: at least one more must fit
    need = kept * one_checkpoint  # the kept ones but the one just written, plus the one being written
    if need <= free:
        return None
    fits = 1 + free // one_checkpoint
    message = (f"reprokit: keep_last={keep_last or 'all'}: each checkpoint takes {human(one_checkpoint)}; "
               f"{kept} kept plus the one being written need {human(need)} beyond the one written, "
               f"but {human(free)} is free on {str(checkpoints)!r} (room for {fits} in all): the run will "
               "stop with a full disk; lower keep_last, checkpoint less often, or free space")
    print(message, file=sys.stderr, flush=True)
    return message
