"""Checkpoint tensors outside the pickle: split/join round trip, a standard safetensors file, a
forged header refused, and checkpoints of format 1 (every tensor inside state.pt) still load."""

from __future__ import annotations

import io
import json
import shutil
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import xxhash

from reprokit import tensorfile
from reprokit.checkpoint import (
    CONTENTS_FILE,
    STATE_FILE,
    TENSORS_FILE,
    CheckpointError,
    CheckpointMeta,
    Snapshot,
    write_checkpoint,
)
from reprokit.checkpointreader import read_checkpoint


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "model": OrderedDict(w=torch.randn(3, 4), b=torch.zeros(0),
                             scalar=torch.tensor(2.5, dtype=torch.float64)),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5).to(torch.bfloat16)}},
                      "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.999)}]},
        "rng": {"torch_cpu": torch.randint(0, 255, (17,), dtype=torch.uint8),
                "python": (3, tuple(range(5)), None)},
        "odd": [torch.ones(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.tensor([True, False]),
                torch.eye(3).to_sparse()],
    }


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.to_dense(), b.to_dense())
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b)


def test_split_write_read_join_gives_the_state_back(tmp_path: Path) -> None:
    state = _state()
    tensors: list[torch.Tensor] = []
    skeleton = tensorfile.split(state, tensors)
    assert len(tensors) == 8  # every dense tensor; the sparse one stays in the skeleton
    sink = io.BytesIO()
    tensorfile.write(sink, tensors)
    path = tmp_path / "t.safetensors"
    path.write_bytes(sink.getvalue())
    back = tensorfile.join(skeleton, tensorfile.read(path))
    assert _equal(state, back)
    standard = safetensors.torch.load_file(path)  # any safetensors reader takes the file
    assert torch.equal(standard["0"], state["model"]["w"])
    elsewhere = torch.empty(2, device="meta")  # stands for a GPU tensor: torch.save keeps its device
    kept: list[torch.Tensor] = []
    assert tensorfile.split({"x": elsewhere}, kept)["x"] is elsewhere and kept == []


def test_a_header_that_does_not_fit_the_data_is_refused(tmp_path: Path) -> None:
    sink = io.BytesIO()
    tensorfile.write(sink, [torch.ones(4), torch.ones(2)])
    data = sink.getvalue()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header["1"]["shape"] = [3]  # 12 bytes claimed for 8
    forged = json.dumps(header).encode()
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(forged)) + forged + data[8 + length:])
    with pytest.raises(ValueError, match=r"tensor '1': offsets 16\.\.24 do not fit its shape and dtype"):
        tensorfile.read(path)


def _meta(step: int) -> CheckpointMeta:
    return CheckpointMeta(step=step, epoch=0, batch=0, config={}, data_digest="d", code_version="c",
                          manifest_digest="m", run_files={})


def test_a_forged_tensors_file_is_named_in_the_checkpoint_error(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, Snapshot(_meta(1), _state()))
    data = (path / TENSORS_FILE).read_bytes()
    shortened = data[:-8]  # a forger who also updates contents.json
    (path / TENSORS_FILE).write_bytes(shortened)
    contents = json.loads((path / CONTENTS_FILE).read_text())
    contents["files"][TENSORS_FILE] = {"bytes": len(shortened),
                                       "xxh3_128": xxhash.xxh3_128_hexdigest(shortened)}
    (path / CONTENTS_FILE).write_text(json.dumps(contents))
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors: its tensors do not fit state\.pt"):
        read_checkpoint(path)


def test_a_format_1_checkpoint_still_loads(tmp_path: Path) -> None:
    """Format 1 kept every tensor in state.pt and had no tensors file."""
    state = _state()
    path = write_checkpoint(tmp_path, Snapshot(_meta(1), state))
    old = tmp_path / "old"
    shutil.copytree(path, old)
    (old / TENSORS_FILE).unlink()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (old / STATE_FILE).write_bytes(buffer.getvalue())
    contents = json.loads((old / CONTENTS_FILE).read_text())
    del contents["files"][TENSORS_FILE]
    contents["files"][STATE_FILE] = {"bytes": len(buffer.getvalue()),
                                     "xxh3_128": xxhash.xxh3_128_hexdigest(buffer.getvalue())}
    (old / CONTENTS_FILE).write_text(json.dumps(contents))
    _, loaded = read_checkpoint(old)
    _, current = read_checkpoint(path)
    assert _equal(loaded, state) and _equal(current, state)
