"""Low-level file I/O for checkpoints: hash while writing, start disk writeback early, fsync, digest.

Large files (a checkpoint's tensors) go through :func:`open_tensor_writer`: direct I/O with a read-back check
(:mod:`reprokit.directio`) where the file system allows it, else the buffered writer below.

Why the buffered writer starts writeback early: a bare ``write`` only fills the page cache, and
the final ``fsync`` then waits for the whole file to reach the disk. Linux
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues each chunk for writeback as soon as it is
written, so the disk works while the serializer still runs and the final ``fsync`` (kept: it is
what makes the file durable, including its metadata) finds little left to do.
See sync_file_range(2); elsewhere it is simply skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import xxhash

from reprokit.directio import DirectWriter, open_direct
from reprokit.faults import kill_self

WRITEBACK_CHUNK = 8 << 20  # bytes written between writeback kicks: big enough to be cheap, small to overlap
_SYNC_FILE_RANGE_WRITE = 2  # from <fcntl.h>: start writeback of the range's dirty pages, do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` to disk; returns without waiting.

    Only a head start for a later ``fsync``, which alone guarantees durability: where the call
    is unavailable or refused (another OS, a filesystem without support) nothing happens.
    """
    global _sync_file_range
    if _sync_file_range is not None and _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) != 0:
        _sync_file_range = None  # e.g. ENOSYS in a sandbox: stop trying


class HashingWriter:
    """Buffered file writer that digests what passes through and starts its writeback every few MB.

    The fallback where O_DIRECT is refused (see :func:`open_tensor_writer`). It is handed views of
    the tensors' own memory (:func:`reprokit.tensorfile.write`), so nothing is copied before the write.
    ``kill_after`` (fault injection) SIGKILLs the process once that many bytes are written and
    fsynced. The file is not fsynced by :meth:`close`, nor read back: the caller does both.
    """

    verified = False  # close() has not read the file back

    def __init__(self, path: Path, kill_after: int | None = None) -> None:
        self.f, self.kill_after = open(path, "wb"), kill_after  # noqa: SIM115 - closed by close()/abort()
        self.hash, self.size, self._kicked = xxhash.xxh3_128(), 0, 0

    def write(self, data: bytes | memoryview) -> int:
        if self.kill_after is not None and self.size + len(data) >= self.kill_after:
            self.f.write(data[: max(0, self.kill_after - self.size)])
            self.f.flush()
            os.fsync(self.f.fileno())
            kill_self()
        self.hash.update(data)
        self.size += len(data)
        written = self.f.write(data)
        if self.size - self._kicked >= WRITEBACK_CHUNK:
            self.f.flush()
            start_writeback(self.f.fileno(), self._kicked, self.size - self._kicked)
            self._kicked = self.size
        return written

    def flush(self) -> None:
        self.f.flush()

    def written(self) -> dict[str, Any]:
        """Close the file and return its contents record (size and digest)."""
        self.f.close()
        return {"bytes": self.size, "xxh3_128": self.hash.hexdigest()}

    close = written  # nothing is read back here

    def abort(self) -> None:
        self.f.close()


def open_tensor_writer(path: Path, kill_after: int | None = None) -> DirectWriter | HashingWriter:
    """A writer for a large new file: direct, durable and read back on ``close()`` where the file
    system allows O_DIRECT (``verified`` True), else buffered (the caller fsyncs and verifies)."""
    fd = open_direct(path)
    return HashingWriter(path, kill_after) if fd is None else DirectWriter(fd, path, kill_after)


def write_hashed(path: Path, data: bytes) -> dict[str, Any]:
    """Write a small file (not yet fsynced) and return its contents record (size and digest)."""
    path.write_bytes(data)
    return {"bytes": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}


def fsync_files(paths: Iterable[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_digest(path: Path, size: int) -> str:
    """xxh3-128 of a file, hashed straight from the page cache through mmap (no copy).

    ``MAP_POPULATE`` maps every page in one call instead of one page fault per 4 KiB.
    """
    if size == 0:
        return xxhash.xxh3_128_hexdigest(b"")
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ) as mm:
        return xxhash.xxh3_128_hexdigest(mm)
