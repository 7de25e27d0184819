"""Per-step fingerprints: what went into a step, so two runs that split can say why.

For a recorded step, ``fingerprints.csv`` holds (see :data:`FINGERPRINT_COLUMNS`):

- ``indices``: the sample indices of the batches ``run.loader`` yielded since the previous step,
  with each loader's index, in order;
- ``batch``: an order-aware digest of those batches as they left the loader (inputs and
  targets; every tensor's dtype, shape and bytes, in sequence; a reordered batch changes it,
  which an XOR of per-element hashes would not);
- ``python``, ``numpy``, ``torch``, ``cuda``: a digest of each global RNG stream's state when the
  step's last batch was yielded (before the forward pass: what dropout draws from), or at the end
  of the previous step when no ``run.loader`` batch came;
- ``loss``: the bits of the loss ``run.step`` was given (a float64's 16 hex digits);
- ``grads``: one digest over the step's per-tensor gradient digests (``grads.csv``), taken just
  before the update (the first tracked optimizer's step pre-hook).

``digests.csv`` keeps the parameters after the update; its step 0 is the initial model, and the
step-0 row here holds the streams when the run began. An empty cell: not taken at that step.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xxhash

from reprokit.digests import DigestMemo, named_digests, update_with_tensor
from reprokit.globalrng import global_streams

FINGERPRINTS = "fingerprints.csv"
GRADS = "grads.csv"
STREAMS = ("python", "numpy", "torch", "cuda")
FINGERPRINT_COLUMNS = ("step", "indices", "batch", *STREAMS, "loss", "grads")
GRAD_COLUMNS = ("step", "tensor", "digest")
NO_GRAD = "none"  # grads.csv: the parameter had no gradient at the update


_TENSOR_HEADS: dict[tuple[torch.dtype, torch.Size], bytes] = {}  # a batch's tensors come in a few shapes


def _feed(h: Any, value: Any) -> None:
    """``value``'s content into the hasher, in order, with its types and shapes."""
    if isinstance(value, torch.Tensor):
        key = (value.dtype, value.shape)
        head = _TENSOR_HEADS.get(key)
        if head is None:
            head = f"T{value.dtype}{tuple(value.shape)}".encode()
            if len(_TENSOR_HEADS) < 1 << 12:
                _TENSOR_HEADS[key] = head
        h.update(head)
        update_with_tensor(h, value)
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).data)
    elif value is None or isinstance(value, bool | int | float | complex | str | bytes):
        h.update(f"V{type(value).__name__}:{value!r};".encode())
    else:
        _feed_container(h, value)


def _feed_container(h: Any, value: Any) -> None:
    if isinstance(value, Mapping):
        h.update(f"M{len(value)}".encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, list | tuple):
        h.update(f"S{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(f"D{type(value).__qualname__}".encode())
        for f in dataclasses.fields(value):
            _feed(h, getattr(value, f.name))
    else:  # an object of the user's: its attributes, or only its type when it has none
        h.update(f"O{type(value).__qualname__}".encode())
        if hasattr(value, "__dict__"):
            _feed(h, dict(sorted(vars(value).items())))


class BatchHasher:
    """The ``indices`` and ``batch`` digests of the batches yielded since the last step."""

    def __init__(self) -> None:
        self._indices = xxhash.xxh3_128()
        self._batches = xxhash.xxh3_128()
        self.count = 0

    def add(self, loader: int, indices: Sequence[int], batch: Any) -> None:
        self._indices.update(struct.pack(f"<qq{len(indices)}q", loader, self.count, *indices))
        self._batches.update(struct.pack("<q", loader))
        _feed(self._batches, batch)
        self.count += 1

    def digests(self) -> tuple[str, str]:
        return (self._indices.hexdigest(), self._batches.hexdigest()) if self.count else ("", "")


def stream_digests() -> dict[str, str]:
    """A digest of each global RNG stream's state: python, numpy, torch CPU, CUDA (every device,
    when CUDA is initialised; empty otherwise). python's and numpy's are digests of their
    fingerprints (:mod:`reprokit.globalrng`: the position, four key words and the normal cache,
    which tell two states apart as surely as the whole 2.5 KB would), torch's of its state."""
    streams = global_streams()
    state = torch.default_generator.get_state()
    out = {"python": xxhash.xxh3_64_hexdigest(repr(streams.python.fingerprint()).encode()),
           "numpy": xxhash.xxh3_64_hexdigest(repr(streams.numpy.fingerprint()).encode()),
           "torch": _digest64(state)}
    if torch.cuda.is_initialized():
        h = xxhash.xxh3_64()
        for state in torch.cuda.get_rng_state_all():
            update_with_tensor(h, state)
        out["cuda"] = h.hexdigest()
    else:
        out["cuda"] = ""
    return out


def _digest64(tensor: torch.Tensor) -> str:
    h = xxhash.xxh3_64()
    update_with_tensor(h, tensor)
    return h.hexdigest()


def loss_bits(value: float) -> str:
    """A float64's bits as 16 hex digits (big-endian: they read as the number's sign, exponent, mantissa)."""
    return struct.pack(">d", value).hex()


def grad_digests(parameters: Mapping[str, torch.Tensor], memo: DigestMemo | None = None) -> dict[str, str]:
    """Per-tensor digests of the parameters' ``.grad`` (:data:`NO_GRAD` where there is none);
    ``memo`` remembers what it can from step to step (:class:`reprokit.digests.DigestMemo`)."""
    grads = [(name, p.grad) for name, p in parameters.items()]
    present = [(name, g) for name, g in grads if g is not None]
    digests = memo.digests(present) if memo is not None else named_digests(present)
    if len(present) == len(grads):
        return digests
    return {name: digests.get(name, NO_GRAD) for name, _ in grads}

