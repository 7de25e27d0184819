"""Durable, read-back-verified file writes that bypass the page cache (``O_DIRECT``), for checkpoints.

A checkpoint must reach the disk (fsync) and be checked before older ones are pruned. Through the
page cache that costs three passes: copy into the cache, write back to the disk, fsync; on a
virtual disk the write-back can also stall now and then. ``O_DIRECT`` sends
the bytes from our own aligned buffers straight to the device (the approach of DeepSpeed's
FastPersist), so durability costs one pass and no cache pages are dirtied or evicted:

    serializer --copy--> staging buffer --pwrite(O_DIRECT)--> disk --pread(O_DIRECT)--> read-back
        |                  (DEPTH of them, recycled)         (writer thread, then the same thread)
        +-- xxh3-128 of what the serializer produced ==?== xxh3-128 of what the disk returns

Once the last chunk is written the file is read back from the device, so the check is of the bytes
the disk holds, not of a cached copy.
Reading chunks back while later ones are still being written was measured and is slower (reads
and writes compete on a virtual disk; the figures are in README, "How the save got here"). Meanwhile the
caller writes and fsyncs its small files (:meth:`DirectWriter.written` returns before the read-back).
The first chunks are small (``RAMP``, doubling up to ``CHUNK``) so the disk starts early.
The tail chunk is padded to the block size for the write and the file truncated to its true length.

Where ``O_DIRECT`` is refused (tmpfs and some network file systems, other OSes) :func:`open_direct`
returns ``None`` and callers fall back to the buffered :class:`reprokit.fsio.HashingWriter`.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from reprokit.errors import ReprokitError
from reprokit.faults import kill_self

ALIGN = 4096  # O_DIRECT offset/length/address alignment: a multiple of any logical block size in use
CHUNK = 8 << 20  # bytes per staging buffer: large writes for the device, small enough to pipeline
DEPTH = 4  # staging buffers per writer: the serializer fills one while the disk takes the others
RAMP = 1 << 20  # the first chunk; each next one twice as large up to CHUNK, so the disk starts early


class ReadBackError(ReprokitError):
    """The bytes read back from the disk are not the bytes written."""


class _Pool:
    """Page-aligned anonymous buffers of CHUNK bytes, pre-faulted and reused from save to save
    (first-touch page faults would otherwise be paid on every save)."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> list[mmap.mmap]:
        with self._lock:  # buffers of another size (CHUNK changed, as tests do) are dropped
            fit = [b for b in self._free if len(b) == CHUNK]
            got, self._free = fit[:n], fit[n:]
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        return got + [mmap.mmap(-1, CHUNK, flags=flags) for _ in range(n - len(got))]

    def give(self, buffers: list[mmap.mmap]) -> None:
        with self._lock:
            self._free.extend(b for b in buffers if len(b) == CHUNK)


_pool = _Pool()


def open_direct(path: Path) -> int | None:
    """Open ``path`` for direct writing, creating it if needed; ``None`` where the OS or file system
    refuses O_DIRECT. An existing file is not truncated: its blocks are overwritten in place (faster
    than new ones, see :func:`reprokit.checkpoint.take_spare`) and :class:`DirectWriter` cuts it to size."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | flag, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:  # e.g. tmpfs before Linux 6.6
            return None
        raise


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class DirectWriter:
    """File-like sink (for :mod:`reprokit.tensorfile`): a writer thread writes with O_DIRECT, then reads the
    file back from the disk. :meth:`written` waits for the writes only and gives the contents record,
    so the caller can write and fsync its other files during the read-back; :meth:`close` waits
    for the read-back and checks the two digests. The caller fsyncs the file (its data is on the
    device; its size and block map are not durable yet). ``kill_after`` (fault injection)
    SIGKILLs the process once that many bytes are durable. Use :meth:`abort` when the serializer
    fails, so the thread ends."""

    verified = True  # close() checks what the disk returns

    def __init__(self, fd: int, path: Path, kill_after: int | None = None) -> None:
        self.fd, self.path, self.kill_after = fd, path, kill_after
        self.rfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        self.hash, self.read_hash = xxhash.xxh3_128(), xxhash.xxh3_128()  # what we wrote, what the disk has
        self.size = self._offset = self._fill = 0
        self._limit = min(RAMP, CHUNK)  # the first chunks are small, so the disk starts early
        self._buffers = _pool.take(DEPTH + 1)
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for buf in self._buffers[1:]:
            self._free.put(buf)
        self._buf = self._buffers[0]
        self._todo: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._record: dict[str, Any] | None = None
        self._writes_done, self._aborted = threading.Event(), False
        self._thread = threading.Thread(target=self._write_loop, name="reprokit_direct_writer", daemon=True)
        self._thread.start()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self.kill_after is not None and self.size + n >= self.kill_after:
            self._copy(view[: max(0, self.kill_after - self.size)])
            self.written()
            os.fsync(self.fd)
            kill_self()
        self.hash.update(view)
        self._copy(view)
        self.size += n
        return n

    def flush(self) -> None:
        pass

    def _copy(self, view: memoryview) -> None:
        pos, source = 0, np.frombuffer(view, dtype=np.uint8)
        while pos < len(view):
            k = min(self._limit - self._fill, len(view) - pos)
            # numpy copies without holding the GIL: a training thread next to an async save keeps running
            staged = np.frombuffer(self._buf, dtype=np.uint8, count=k, offset=self._fill)
            np.copyto(staged, source[pos : pos + k])
            self._fill += k
            pos += k
            if self._fill == self._limit:
                self._submit()
                self._limit = min(2 * self._limit, CHUNK)
                self._buf = self._free.get()  # blocks while DEPTH chunks are on their way to the disk

    def _submit(self) -> None:
        if self._error is not None:
            raise self._error
        self._todo.put((self._buf, self._offset, self._fill))
        self._offset += self._fill
        self._fill = 0

    def _write_loop(self) -> None:
        """Write the chunks as they come; once the last is written, read the file back from the disk."""
        while (item := self._todo.get()) is not None:
            buf, offset, n = item
            if self._error is None:
                try:
                    view, done = memoryview(buf)[: _padded(n)], 0
                    while done < len(view):  # O_DIRECT writes may be short; continue where it stopped
                        done += os.pwrite(self.fd, view[done:], offset + done)
                except BaseException as e:  # handed to the serializer's thread
                    self._error = e
            self._free.put(buf)
        try:
            if self._error is None:
                # before the read-back: a truncate waits for direct I/O in flight
                os.ftruncate(self.fd, self._offset)
        except BaseException as e:
            self._error = e
        self._writes_done.set()
        if self._error is None and not self._aborted:
            try:
                self._read_back(self._offset)
            except BaseException as e:
                self._error = e

    def _read_back(self, end: int) -> None:
        """Digest ``[0, end)`` as the disk returns it (O_DIRECT: not from a cache). Reading ahead in a
        second thread while this one hashes was measured slower (README, "How the save got here")."""
        view, offset = memoryview(self._buffers[0]), 0
        while offset < end:
            n = min(CHUNK, end - offset)
            got = os.preadv(self.rfd, [view[: _padded(n)]], offset)
            self.read_hash.update(view[: min(n, got)])
            offset += n

    def written(self) -> dict[str, Any]:
        """Write the tail, wait until every byte is written and the file cut to its true size; return the
        contents record (size and digest of what was written). The read-back goes on."""
        if self._record is None:
            if self._fill:
                self._submit()
            self._todo.put(None)
            self._writes_done.wait()
            if self._error is not None:
                self._thread.join()
                self._release()
                raise self._error
            self._record = {"bytes": self.size, "xxh3_128": self.hash.hexdigest()}
        return self._record

    def close(self) -> dict[str, Any]:
        """Wait for the read-back, check it, and return the contents record (size and digest)."""
        try:
            record = self.written()
            self._thread.join()
            if self._error is not None:
                raise self._error
        finally:
            self._release()
        read_back = self.read_hash.hexdigest()
        if read_back != record["xxh3_128"]:
            raise ReadBackError(f"{self.path}: the bytes read back from the disk differ from those written "
                                f"(xxh3-128 {read_back}, written {record['xxh3_128']}); the disk or file "
                                f"system is corrupting data")
        return record

    def abort(self) -> None:
        """Stop after a failed serialization: end the thread, close the files (no verification)."""
        if self._buffers:
            self._aborted = True  # no read-back
            self._todo.put(None)
            self._thread.join()
            self._release()

    def _release(self) -> None:
        for fd in (self.fd, self.rfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.rfd = -1
        _pool.give(self._buffers)
        self._buffers = []
