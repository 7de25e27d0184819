"""A checkpoint's tensors outside its pickle: one safetensors file, written as a raw stream.

Why: ``torch.save`` pickles the whole state before it writes the first tensor byte (for resnet18
+ Adam, 312 tensors), and the disk waits. Split out, the tensors' bytes start
flowing at once and what is left to pickle (optimizer hyper-parameters, RNG states, counters) is a
few KB. The file is standard safetensors (8-byte header length, JSON header, raw little-endian
data), so any safetensors tool can read it; loading it runs no code.

    state  --split-->  skeleton (each tensor replaced by {MARK: "i"})  +  tensors 0..N-1
    skeleton + tensors  --join-->  state

Tensors safetensors cannot hold (sparse, quantized, dtypes without a safetensors name) and tensors
not on the CPU (GPU optimizer state: ``torch.load`` puts them back on their device) stay in the
skeleton, where ``torch.save`` handles them as before.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch

from reprokit import untrusted
from reprokit.errors import RunDirError

MARK = "__reprokit_tensor__"  # the key of a placeholder dict in the skeleton
_NAMES = {dtype: name for name, dtype in safetensors.torch._TYPES.items()}  # torch dtype -> "F32" ...


class _Sink(Protocol):
    def write(self, data: Any) -> int: ...


def split(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """``obj`` with every storable tensor appended to ``tensors`` and replaced by a placeholder."""
    if isinstance(obj, torch.Tensor):
        if (obj.device.type != "cpu" or obj.layout != torch.strided or obj.dtype not in _NAMES
                or obj.is_quantized):
            return obj
        tensors.append(obj.detach())
        return {MARK: str(len(tensors) - 1)}
    if isinstance(obj, dict):
        return type(obj)((k, split(v, tensors)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(split(v, tensors) for v in obj)
    return obj


def join(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Put the tensors back in place of their placeholders; a missing one raises KeyError."""
    if isinstance(obj, dict):
        if len(obj) == 1 and MARK in obj:
            return tensors[obj[MARK]]
        return type(obj)((k, join(v, tensors)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(join(v, tensors) for v in obj)
    return obj


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def write(sink: _Sink, tensors: list[torch.Tensor]) -> None:
    """Stream ``tensors`` as a safetensors file (named "0", "1", ...) into ``sink``."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "written_by": "reprokit checkpoint"}}
    offset = 0
    for i, t in enumerate(tensors):
        size = t.numel() * t.element_size()
        header[str(i)] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    sink.write(struct.pack("<Q", len(encoded)) + encoded)
    for t in tensors:
        if t.numel():
            sink.write(t.contiguous().view(-1).view(torch.uint8).numpy())


def read(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, by name, each read straight into its own memory.

    Not ``safetensors.torch.load_file``: its tensors map the file, so truncating or rewriting the
    file later crashes whoever holds them (SIGBUS), and an optimizer keeps them as its state.
    The header is checked against the file first (:func:`reprokit.untrusted.check_safetensors_header`:
    its length, dtypes, shapes and offsets), so a forged shape allocates nothing; a file that is
    not what its header says raises :class:`reprokit.errors.RunDirError`.
    """
    header = untrusted.check_safetensors_header(path)
    tensors: dict[str, torch.Tensor] = {}
    fd, _ = untrusted.open_plain(path)
    with os.fdopen(fd, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        start = 8 + length
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = safetensors.torch._TYPES.get(entry["dtype"])
            if dtype is None:
                raise RunDirError(f"{path}: tensor {name!r} has dtype {entry['dtype']} that this torch "
                                  "cannot hold")
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=dtype)
            if end > begin:
                f.seek(start + begin)
                if f.readinto(tensor.view(-1).view(torch.uint8).numpy().data) != end - begin:
                    raise RunDirError(f"{path}: tensor {name!r}: the file ends inside it (it was cut "
                                      "while being read)")
            tensors[name] = tensor
    return tensors
