"""Direct (O_DIRECT) checkpoint writes: same bytes as the buffered path, read back from the disk,
failures reach the caller and commit nothing, and the buffered fallback where O_DIRECT is refused."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from reprokit import checkpoint, directio, fsio
from reprokit.checkpoint import (
    MODEL_KEY,
    OPTIMIZER_KEY,
    RNG_KEY,
    TENSORS_FILE,
    CheckpointError,
    CheckpointMeta,
    Snapshot,
    write_checkpoint,
)
from reprokit.checkpointreader import list_checkpoints, read_checkpoint


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 KiB chunks after 16 and 32 KiB ones, 2 in flight: a 1.2 MB state crosses many chunk
    boundaries and recycles buffers."""
    monkeypatch.setattr(directio, "CHUNK", 64 << 10)
    monkeypatch.setattr(directio, "RAMP", 16 << 10)
    monkeypatch.setattr(directio, "DEPTH", 2)


def _state() -> dict[str, Any]:
    # odd sizes: records and the file end off any 4 KiB boundary
    return {"a": torch.arange(300_001, dtype=torch.float32), "b": torch.ones(7), "c": {"n": 3}}


def _save(path: Path, state: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    writer = fsio.open_tensor_writer(path)
    try:
        torch.save(state, writer)
    except BaseException:
        writer.abort()
        raise
    return writer.close(), writer.verified


def _direct_or_skip(tmp_path: Path) -> None:
    fd = directio.open_direct(tmp_path / "probe")
    if fd is None:
        pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT (the buffered path is tested below)")
    os.close(fd)


def test_direct_write_gives_the_bytes_the_buffered_path_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _direct_or_skip(tmp_path)
    state = _state()
    record, verified = _save(tmp_path / "direct.pt", state)
    assert verified  # the direct path was taken and read its chunks back
    data = (tmp_path / "direct.pt").read_bytes()
    assert len(data) % 4096 != 0  # the padded tail was truncated to the true size
    assert record == {"bytes": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    monkeypatch.setattr(fsio, "open_direct", lambda path: None)  # a file system without O_DIRECT
    buffered, verified = _save(tmp_path / "buffered.pt", state)
    assert not verified and buffered == record
    assert torch.equal(torch.load(tmp_path / "direct.pt", weights_only=True)["a"], state["a"])


def _snapshot(step: int) -> Snapshot:
    meta = CheckpointMeta(step=step, epoch=0, batch=0, config={}, data_digest="d", code_version="c",
                          manifest_digest="m", run_files={})
    model = torch.nn.Linear(300, 200)
    return Snapshot(meta, {MODEL_KEY: model.state_dict(), OPTIMIZER_KEY: {}, RNG_KEY: {}})


def test_a_byte_the_disk_returns_wrong_fails_the_save_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _direct_or_skip(tmp_path)
    write_checkpoint(tmp_path, _snapshot(1))
    real_preadv = os.preadv
    calls = []

    def flaky_disk(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = real_preadv(fd, buffers, offset)
        calls.append(offset)
        if len(calls) == 3:
            buffers[0][100] ^= 0x01  # one bit flipped on its way back from the disk
        return got

    monkeypatch.setattr(directio.os, "preadv", flaky_disk)
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors: the bytes read back from the disk"):
        write_checkpoint(tmp_path, _snapshot(2))
    assert len(calls) > 3  # the whole file, chunk by chunk
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")] == []


def test_a_read_error_during_the_read_back_reaches_the_caller_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _direct_or_skip(tmp_path)

    def failing_disk(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(directio.os, "preadv", failing_disk)
    with pytest.raises(OSError, match="Input/output error"):
        write_checkpoint(tmp_path, _snapshot(1))
    assert list(os.scandir(tmp_path / "checkpoints")) == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("reprokit_")] == []


def test_a_failed_fsync_reaches_the_caller_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files are fsynced in a thread during the read-back; its error must not be lost there."""
    write_checkpoint(tmp_path, _snapshot(1))

    def failing_fsync(paths: Any) -> None:
        raise OSError(errno.EIO, "fsync: Input/output error")

    monkeypatch.setattr(checkpoint, "fsync_files", failing_fsync)
    with pytest.raises(OSError, match="fsync: Input/output error"):
        write_checkpoint(tmp_path, _snapshot(2))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["latest", "step-0000001"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000001\n"


def test_written_gives_the_record_before_the_read_back_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``written()`` returns once the bytes are written; ``close()`` then waits for the read-back."""
    _direct_or_skip(tmp_path)
    release = threading.Event()
    real_preadv = os.preadv

    def slow_disk(fd: int, buffers: list[memoryview], offset: int) -> int:
        release.wait(timeout=30)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(directio.os, "preadv", slow_disk)
    writer = fsio.open_tensor_writer(tmp_path / "t.bin")
    data = os.urandom(300_001)
    writer.write(data)
    record = writer.written()  # does not wait for the (held) read-back
    assert record == {"bytes": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    assert (tmp_path / "t.bin").stat().st_size == len(data)  # already truncated to the true size
    release.set()
    assert writer.close() == record


def test_a_write_error_reaches_the_caller_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _direct_or_skip(tmp_path)
    real_pwrite = os.pwrite

    def full_disk(fd: int, data: memoryview, offset: int) -> int:
        if offset >= 2 * directio.CHUNK:  # the 4th of 5 chunks (16, 32, 64, 64, 60 KiB)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(directio.os, "pwrite", full_disk)
    with pytest.raises((OSError, RuntimeError), match="No space left on device"):
        write_checkpoint(tmp_path, _snapshot(1))
    assert list(os.scandir(tmp_path / "checkpoints")) == []
    alive = [t.name for t in threading.enumerate() if t.name.startswith("reprokit_")]
    assert alive == []  # the writer thread ended


def test_concurrent_direct_saves_share_the_buffer_pool_safely(tmp_path: Path) -> None:
    _direct_or_skip(tmp_path)
    snaps = {i: _snapshot(i) for i in range(1, 5)}
    errors: list[BaseException] = []

    def save(i: int) -> None:
        try:
            write_checkpoint(tmp_path / f"run{i}", snaps[i])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in snaps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, snap in snaps.items():
        _, state = read_checkpoint(list_checkpoints(tmp_path / f"run{i}")[0])
        assert torch.equal(state[MODEL_KEY]["weight"], snap.state[MODEL_KEY]["weight"])


def test_without_o_direct_the_buffered_writer_commits_the_same_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system that refuses O_DIRECT the tensors go through the page cache: same bytes, same load."""
    snap = _snapshot(1)
    direct = write_checkpoint(tmp_path / "direct", snap)
    monkeypatch.setattr(fsio, "open_direct", lambda path: None)
    buffered = write_checkpoint(tmp_path / "buffered", snap)
    assert (buffered / TENSORS_FILE).read_bytes() == (direct / TENSORS_FILE).read_bytes()
    _, state = read_checkpoint(buffered)
    assert torch.equal(state[MODEL_KEY]["weight"], snap.state[MODEL_KEY]["weight"])


def test_the_pool_hands_out_buffers_of_the_current_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffers pooled while CHUNK was smaller (this module's fixture) never serve a larger CHUNK."""
    small = directio._pool.take(2)  # 64 KiB: the fixture's CHUNK
    directio._pool.give(small)
    monkeypatch.setattr(directio, "CHUNK", 128 << 10)
    assert [len(b) for b in directio._pool.take(3)] == [128 << 10] * 3
