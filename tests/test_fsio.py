"""Low-level checkpoint I/O: the hashing writer's record matches the file, with or without writeback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import xxhash

from reprokit import fsio


def _write(path: Path) -> dict[str, object]:
    state = {"a": torch.arange(3_000_000, dtype=torch.float32), "b": torch.ones(5)}  # 12 MB: crosses a kick
    writer = fsio.HashingWriter(path)
    torch.save(state, writer)
    return writer.close()


def test_hashing_writer_records_the_bytes_on_disk(tmp_path: Path) -> None:
    """Size and xxh3-128 recorded while writing equal those of the file read back (mmap digest too)."""
    path = tmp_path / "s.pt"
    record = _write(path)
    data = path.read_bytes()
    assert record == {"bytes": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    assert fsio.file_digest(path, len(data)) == record["xxh3_128"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3_000_000, dtype=torch.float32))


def test_refused_writeback_is_skipped_and_changes_no_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where sync_file_range fails (say ENOSYS), writing goes on without it and gives the same file."""
    with_writeback = _write(tmp_path / "a.pt")
    monkeypatch.setattr(fsio, "_sync_file_range", lambda *args: -1)
    assert _write(tmp_path / "b.pt") == with_writeback
    assert fsio._sync_file_range is None  # disabled after the first refusal
