"""Digests: a fingerprint per tensor and per model, and where two digest histories first differ.

xxh3-128 rather than sha256 because digests run on the training step's hot path: xxh3 hashes at
memory speed (see benchmarks/bench_digest.py), and collision resistance against an adversary is
not the point here; telling two honest runs apart is.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

_HEADS: dict[tuple[str, torch.dtype, torch.Size], bytes] = {}  # name, dtype, shape -> the digest's header
_CHARS: dict[int, Any] = {}  # byte count -> a ctypes char array type of that size
_STRIDED = torch.strided


def _plain(t: torch.Tensor) -> bool:
    """Laid out plainly: a strided, contiguous CPU tensor without a conjugate or negative bit.
    ``is_cpu`` and ``nbytes`` rather than ``device.type`` and ``numel() * element_size()``: the
    per-step digests ask this of every tensor, and ``device`` builds a new object each time."""
    return t.is_cpu and t.layout is _STRIDED and t.is_contiguous() and not t.is_conj() and not t.is_neg()


def _resolved(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().resolve_conj().resolve_neg().contiguous()


def _chars(size: int) -> Any:
    chars = _CHARS.get(size)
    if chars is None:
        chars = _CHARS[size] = ctypes.c_char * size
    return chars


def update_with_tensor(h: Any, tensor: torch.Tensor) -> None:
    """Feed the tensor's bytes to the hasher ``h``. A CPU tensor laid out plainly (strided,
    contiguous, no conjugate or negative bit) is read where it lies, through a ctypes array at its
    address, while ``tensor`` (this call's argument) keeps that memory alive: cheaper than
    ``.numpy()``, which builds a detached tensor and an array each time. Anything else is first
    made into such a tensor (bfloat16 included: bytes are bytes)."""
    t = tensor if _plain(tensor) else _resolved(tensor)
    size = t.nbytes
    if size:
        h.update(_chars(size).from_address(t.data_ptr()))


def _head(name: str, tensor: torch.Tensor) -> bytes:
    key = (name, tensor.dtype, tensor.shape)
    head = _HEADS.get(key)
    if head is None:
        head = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode()
        if len(_HEADS) < 1 << 16:  # per-step digests meet the same few hundred tensors again and again
            _HEADS[key] = head
    return head


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """xxh3-128 hex digest over a tensor's name, dtype, shape and bytes."""
    h = xxhash.xxh3_128(_head(name, tensor))
    update_with_tensor(h, tensor)
    return h.hexdigest()


def named_digests(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """``{name: tensor_digest(name, t)}`` for every pair, in order: the same values, with
    :func:`tensor_digest`'s steps inlined, since a step's digests pay them per tensor (a small
    tensor costs more in these Python-level calls than in hashing its bytes)."""
    out = {}
    heads, xxh3_128 = _HEADS, xxhash.xxh3_128
    for name, tensor in tensors:
        head = heads.get((name, tensor.dtype, tensor.shape))
        h = xxh3_128(head if head is not None else _head(name, tensor))
        t = tensor if _plain(tensor) else _resolved(tensor)
        size = t.nbytes
        if size:
            h.update(_chars(size).from_address(t.data_ptr()))
        out[name] = h.hexdigest()
    return out


class DigestMemo:
    """:func:`named_digests` for the tensors a run digests at every step: the same values, with
    the per-tensor work that does not change from step to step done once.

    Two things are remembered per name. For a tensor met again (the same object at the same
    address, shape and layout: a parameter between two updates), its header and the ctypes array
    over its memory, so hashing it is the only work left. For a new tensor under a known name, dtype
    and shape (a gradient: ``zero_grad`` drops it and backward makes a new one), its header and
    array type. The tensor itself is held only by a weak reference: the memo never keeps memory
    alive. A step's digests pay these Python-level calls per tensor right after the training step
    has evicted them from the caches, which makes them several times dearer than in a loop of their own.
    """

    def __init__(self) -> None:
        # weak ref, address, shape, dtype, head, array
        self._same: dict[str, tuple[Any, int, torch.Size, torch.dtype, bytes, Any]] = {}
        # dtype, shape, head, array type, whether complex
        self._kind: dict[str, tuple[torch.dtype, torch.Size, bytes, Any, bool]] = {}

    def digests(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
        """``{name: tensor_digest(name, t)}`` for every pair, in order."""
        out = {}
        same, kind, xxh3_128 = self._same, self._kind, xxhash.xxh3_128
        for name, t in tensors:
            seen = same.get(name)
            if seen is not None and seen[0]() is t and t.data_ptr() == seen[1] and t.shape == seen[2] \
                    and t.dtype is seen[3] and t.is_contiguous() and not t.is_neg():
                h = xxh3_128(seen[4])
                if seen[5] is not None:
                    h.update(seen[5])
                out[name] = h.hexdigest()
                continue
            known = kind.get(name)
            if known is not None and t.dtype is known[0] and t.shape == known[1] and t.is_cpu \
                    and t.layout is _STRIDED and t.is_contiguous() and not t.is_neg() \
                    and not (known[4] and t.is_conj()):
                head, chars = known[2], known[3]
            else:
                head = _head(name, t)
                if not _plain(t):
                    h = xxh3_128(head)
                    update_with_tensor(h, t)
                    out[name] = h.hexdigest()
                    continue
                chars = _chars(t.nbytes)
                kind[name] = (t.dtype, t.shape, head, chars, t.is_complex())
            array = chars.from_address(t.data_ptr()) if t.nbytes else None
            h = xxh3_128(head)
            if array is not None:
                h.update(array)
            out[name] = h.hexdigest()
            same[name] = (weakref.ref(t), t.data_ptr(), t.shape, t.dtype, head, array)
        return out


def state_digests(state: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Digest of every parameter and buffer, keyed by its ``state_dict`` name, in that order."""
    tensors = state.state_dict() if isinstance(state, torch.nn.Module) else state
    return named_digests(tensors.items())


def combine_digests(digests: Mapping[str, str]) -> str:
    """One digest over named digests (order-sensitive, as ``state_dict`` order is fixed)."""
    return xxhash.xxh3_128_hexdigest("".join([f"{name}={d}\n" for name, d in digests.items()]).encode())


def model_digest(state: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Digest over every parameter and buffer: equal exactly when the two models are bitwise equal."""
    return combine_digests(state_digests(state))


@dataclass(frozen=True)
class Divergence:
    """Where two digest histories first differ."""

    step: int
    tensors: tuple[str, ...]


def first_divergence(
    a: Sequence[tuple[int, Mapping[str, str]]], b: Sequence[tuple[int, Mapping[str, str]]]
) -> Divergence | None:
    """The first step (present in both histories) at which any tensor digest differs.

    Each history is a sequence of ``(step, {tensor name: digest})``. Tensors present in only one
    history count as differing. Returns ``None`` when every shared step matches.
    """
    other = dict(b)
    for step, digests in a:
        if step not in other:
            continue
        theirs = other[step]
        names = list(digests) + [n for n in theirs if n not in digests]
        differing = tuple(n for n in names if digests.get(n) != theirs.get(n))
        if differing:
            return Divergence(step=step, tensors=differing)
    return None


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest elementwise |a - b| over all tensors.

    ``inf`` if a name is in only one state or a shape differs; ``nan`` if a value is NaN in one
    state and not at the same place in the other (a run that blew up is not "0 away").
    """
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for name, ta in a.items():
        tb = b[name]
        if tb.shape != ta.shape:
            return float("inf")
        da, db = ta.detach().double(), tb.detach().double()
        if not torch.equal(da.isnan(), db.isnan()):
            return float("nan")
        diff = (da - db).abs().nan_to_num(nan=0.0)  # NaN in both at the same place: no difference
        if diff.numel():
            worst = max(worst, float(diff.max()))
    return worst


@functools.cache
def source_digest() -> str:
    """xxh3-128 over the reprokit package's own source files: the code version a checkpoint records.

    Independent of git, so it also tells an installed copy from an edited one.
    """
    root = Path(__file__).parent
    h = xxhash.xxh3_128()
    for path in sorted(root.rglob("*.py")):
        h.update(f"{path.relative_to(root).as_posix()}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()
